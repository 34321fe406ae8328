#!/usr/bin/env bash
# Every GPU number in the README, on one card:
#   bash results/gpu.sh OUT_DIR ["STAGE STAGE ..." | all]   (OUT_DIR gets gpu-<stages>.log and gpu_results.tar.gz)
# bench: ViT-B/16 224 px batch 256 bf16, ours eager and compiled beside the timm-Block MAE run eagerly, then
#        bench.py --loader on an ImageFolder of JPEGs it writes, 16 workers (about 4 minutes)
# mfu: the compiled half of bench alone: ours compiled vs timm eager, one run, then a profile of our step (about 100 s);
#      skipped beside bench (as under all), whose compiled run gives the same numbers, without the profile
# fast (issue 14): vit_m4_32 at batch 1024 on glyphs, the device data path against the DataLoader, each timed by
#       pretrain.py's own img/s (compiled, bf16), then the device path with CUDA graphs (--compile-mode
#       reduce-overhead) and at batch 2048, bench.py --loader beside them (under 4 minutes on the H100); each run's steady img/s
#       is the median of its log lines after the first
# fast-step: the model step alone at batch 256 and 1024, compiled in the default mode and with CUDA graphs (bench.py),
#       then its kernels ranked by GPU time (about 4 minutes)
# levers (not in all; run it after mfu, whose batch-256 row is its baseline): ViT-B/16 levers one at a time, each a
#        bench.py run beside timm's eager MAE: batch 512, then at the target's batch 256 max-autotune (which adds
#        Triton GEMMs with fused epilogues to CUDA graphs), then batch 512 with CUDA graphs (about 100 s each,
#        max-autotune several minutes; each within what is left of BUDGET_S, so a short budget keeps the first).
#        CUDA graphs alone at batch 256 were measured at stop 37 (no gain: 30.4% MFU) and are not repeated.
# default: the default command on CUDA (compile + AMP), whole, with its wall time
# study: the glyphs study (results/study.py), the CPU preset in bf16: a study of its own (OUT/study), never mixed
#        with the fp32 CPU runs
# curve: results/curve.py, none and linear-0.8 at the study's blr, 200 epochs of the GPU default recipe (batch 256,
#        compiled, bf16), probe + rank every 25. Resumable across loans: it starts from CURVE_FROM (no default: the
#        curve to go on with, e.g. results/curve_glyphs_run2/seed1, whose runs/<arm>/ckpt.pt.gz the call must carry;
#        or CURVE_FRESH=1 for a new curve from epoch 0), trains until BUDGET_S runs out, and
#        sends back each arm's ckpt.pt.gz in 15 MiB parts (OUT/<arm>.ckpt.pt.gz.part-*: `cat` them back into
#        $CURVE_FROM/runs/<arm>/ckpt.pt.gz, and unpack the tar's curve/ over $CURVE_FROM).
#        A begun, unfinished arm whose checkpoint was not carried skips the stage (CURVE_FRESH=1: a new curve from 0).
#        CURVE_SEED (default 0) runs another seed of the same curve (with CURVE_FRESH=1 first, then on every resume of
#        it; unpack it into a folder of its own, e.g. results/curve_glyphs_run2/seed1, which results/spread.py reads).
#        CURVE_FLAGS adds runtime flags to pretrain.py (e.g. "--compile-mode reduce-overhead"); CURVE_FLAGS=auto takes
#        that one if `fast`, run before it in the same call, saw CUDA graphs beat the default compile by 10%
# Each stage has its own time limit, so one that overruns leaves the rest standing; mfu, study, curve and levers get what is
# left of BUDGET_S (default 540 s, counted from the start) less 30 s, kept for packing the files (it takes seconds);
# the fixed limits are cut to what is left too.
set -u
OUT=${1:?usage: bash results/gpu.sh OUT_DIR ["STAGE ..." | all], stages: bench mfu fast fast-step levers default study curve}
STAGES=${2:-all}
want() { { [ "$STAGES" = all ] && [ "$1" != levers ]; } || [[ " $STAGES " == *" $1 "* ]]; }
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-540} - 30 ))
mkdir -p "$OUT"
PY=${PY:-python3}
QUICK=${QUICK:-0}  # QUICK=1: a tiny CPU dry run of this script's plumbing, no numbers
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu-${STAGES// /-}.log") 2>&1
stamp() { echo "=== $(date -u +%H:%M:%S) $*"; }
left() { local s=$(( DEADLINE - $(date +%s) - ${1:-0} )); echo $(( s > 1 ? s : 1 )); }  # seconds to DEADLINE less $1
upto() { local s=$(left); echo $(( $1 < s ? $1 : s )); }  # $1 seconds, or what is left if less
steady() {  # the median img/s of a run's log lines after the first (which holds compiling); empty if none
  grep -o "[0-9.]* img/s" "$1" 2>/dev/null | tail -n +2 | sort -n | awk '{v[NR]=$1} END {if (NR) printf "%.0f\n", v[int((NR+1)/2)]}'
}

stamp env
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
nproc

if [ "$QUICK" = 1 ]; then
  BENCH="--model vit_p4_32 --batch-size 32 --steps 2"; DEFAULT="--max-steps 5"; N_JPEG=300; WORKERS=2
  STUDY="--epochs 1 --seeds 0 --arms none linear-0.6 --blrs 1.5e-3"; CURVE_EPOCHS=${CURVE_EPOCHS:-2}
  CURVE_EVERY=${CURVE_EVERY:-1}; CAP=${CAP-"--max-steps 3"}  # CAP= lets a run meet the time limit (its Ctrl-C save)
  PROBE="--n-train 300 --n-test 200"; RANK="--n 256 --n-tokens 32"; LEVER_MODEL="--model vit_p4_32 --steps 2"
else
  BENCH="--model vit_b16 --batch-size 256 --steps 30"; DEFAULT=""; N_JPEG=8192; WORKERS=16
  STUDY="--epochs 2"
  PROBE=""; RANK=""; CAP=""; LEVER_MODEL="--model vit_b16 --steps 30"
fi

if want bench; then
stamp "bench eager (ours vs timm Block)"
timeout $(upto 120) $PY bench.py --no-compile $BENCH
stamp "bench compiled (ours) vs timm Block eager"
timeout $(upto 240) $PY bench.py --compile $BENCH

stamp "bench-data: ImageFolder of $N_JPEG JPEGs, $WORKERS workers"
$PY - "$OUT/jpegs" "$N_JPEG" <<'EOF'
import os, sys
from multiprocessing import Pool
import numpy as np
from PIL import Image
root, n = sys.argv[1], int(sys.argv[2])
def write(i):  # ImageNet-like size and detail: smooth colour fields plus grain, quality 90
    rng = np.random.default_rng(i)
    base = np.asarray(Image.fromarray(rng.integers(0, 255, (12, 16, 3), np.uint8)).resize((500, 375), Image.BICUBIC))
    img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    split = "val" if i < 64 else "train"
    folder = os.path.join(root, split, f"class{i % 10}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(img).save(os.path.join(folder, f"{i}.jpg"), quality=90)
with Pool() as pool:
    pool.map(write, range(n + 64))
EOF
timeout $(upto 90) $PY bench.py --loader --data "$OUT/jpegs" --workers $WORKERS --batch-size 256 --steps 25
timeout $(upto 60) $PY bench.py --loader --workers $WORKERS --batch-size 256 --steps 25
rm -rf "$OUT/jpegs"

fi

{ want fast || want default || want study || want curve; } && $PY -c "import glyphs; glyphs.make_glyphs('train'); glyphs.make_glyphs('test')"  # the embedded data, cached once

if want mfu && ! want bench; then
stamp "mfu: ours compiled vs timm Block eager, then our step's kernels ranked by GPU time"
timeout $(upto 200) $PY bench.py --compile $BENCH --profile  # within BUDGET_S: levers follow
fi

if want fast; then
fast_run() {  # a name, then pretrain.py's flags; 48 steps an epoch at batch 1024, a log line every 12 (the first holds compiling)
  stamp "fast: vit_m4_32, ${*:2}"
  timeout $(upto 150) $PY pretrain.py --alpha-schedule none --epochs 3 --log-every 12 --out-dir "$OUT/fast-$1" "${@:2}" $CAP \
    | grep -E "img/s|done" | tee "$OUT/fast-$1.txt"
  echo "steady: $(steady "$OUT/fast-$1.txt") img/s (median of the log lines after the first)"
}
fast_run device --batch-size 1024 --device-data
fast_run loader --batch-size 1024 --no-device-data --max-steps 48
fast_run graphs --batch-size 1024 --device-data --compile-mode reduce-overhead  # the launch-bound step's lever
fast_run device-2048 --batch-size 2048 --device-data  # the other: fewer launches per image
timeout $(upto 60) $PY bench.py --loader --batch-size 1024 --steps 20 --workers 8
fi

if want fast-step; then
stamp "fast: the vit_m4_32 step alone (synthetic batch), default compile and CUDA graphs (reduce-overhead)"
for MODE in default reduce-overhead; do  # on the H100 the whole loop took 22 ms a step at batch 1024 and 30 at 256
  for B in 256 1024; do timeout $(upto 90) $PY bench.py --compile --compile-mode $MODE --model vit_m4_32 --batch-size $B --steps 50; done
done
timeout $(upto 90) $PY bench.py --compile --model vit_m4_32 --batch-size 1024 --steps 20 --profile | tail -22  # the kernels
fi

if want levers; then  # not in `all`: max-autotune compiles ViT-B/16 for minutes
for LEVER in "--batch-size 512" "--batch-size 256 --compile-mode max-autotune" \
             "--batch-size 512 --compile-mode reduce-overhead"; do  # the cheapest first
  [ "$(left)" -ge 90 ] || { echo "levers: BUDGET_S spent, not run: $LEVER"; continue; }
  stamp "levers: compiled, $LEVER_MODEL $LEVER"
  timeout $(upto 280) $PY bench.py --compile $LEVER_MODEL $LEVER
done
fi

if want default; then
stamp "the default command, on this machine's default device"
T0=$(date +%s)
timeout $(upto 100) $PY pretrain.py --alpha-schedule linear --out-dir "$OUT/default" --log-every 100 $DEFAULT \
  && echo "default command wall: $(( $(date +%s) - T0 )) s" \
  && timeout $(upto 60) $PY probe.py "$OUT/default/ckpt.pt" $PROBE | tail -4
fi

if want study; then
stamp "study: the CPU preset, 7 arms x (4 blr + 2 seeds), 10 runs at once"
STUDY_S=$(left)
echo "study time limit: $STUDY_S s"
timeout $STUDY_S $PY results/study.py --out "$OUT/study" --jobs 10 $STUDY \
  --pretrain-args="--no-compile --workers 2 --batch-size 128 $CAP" --probe-args="--workers 1 $PROBE" --rank-args="--workers 1 $RANK" \
  || $PY results/study.py --out "$OUT/study" --collect $STUDY | tail -12  # cut short: summarise what finished
fi

if want curve; then  # the GPU default recipe, none and the study's best linear arm, each at its chosen blr
if [ "${CURVE_FLAGS:-}" = auto ]; then  # CUDA graphs for the curve only if `fast` (this call) saw them pay by 10%
  G=$(steady "$OUT/fast-graphs.txt"); D=$(steady "$OUT/fast-device.txt")
  CURVE_FLAGS=$([ -n "$G" ] && [ -n "$D" ] && [ "$G" -gt $(( D * 11 / 10 )) ] && echo "--compile-mode reduce-overhead")
  echo "curve flags: '${CURVE_FLAGS}' (graphs ${G:-?} vs default ${D:-?} img/s)"
fi
CURVE="$OUT/curve"
mkdir -p "$CURVE"
CURVE_FROM=${CURVE_FROM:-}  # the curve this call goes on with: no default, since the finished ones must not be reopened
if [ "${CURVE_FRESH:-0}" != 1 ]; then  # an earlier call's JSONs and ckpt.pt.gz; a typo must not start a new curve
  [ -n "$CURVE_FROM" ] && [ -d "$CURVE_FROM" ] && cp -r "$CURVE_FROM"/. "$CURVE" || CURVE_MISSING=1
fi
for z in "$CURVE"/runs/*/ckpt.pt.gz; do [ -f "$z" ] && gunzip -f "$z" && echo "resuming from $z"; done
UNCARRIED=$(for run in "$CURVE"/runs/*; do  # begun (a log), not finished, and no checkpoint: it would restart at 0
  [ -f "$run/log.jsonl" ] && [ ! -f "$run/ckpt.pt" ] && [ ! -f "$run/probe_e$(printf %03d ${CURVE_EPOCHS:-200}).json" ] && basename "$run"; done)
if [ -n "${CURVE_MISSING:-}" ]; then
  echo "curve: skipped: CURVE_FROM='$CURVE_FROM' is not a curve here (name the one to go on with and carry its" \
       "checkpoints; or CURVE_FRESH=1 starts a new curve)"
elif [ -n "$UNCARRIED" ]; then
  echo "curve: skipped: no ckpt.pt.gz carried for" $UNCARRIED "(carry them; or CURVE_FRESH=1 starts a new curve)"
else
stamp "curve: 200 epochs, probe and rank every 25"
timeout $(left) $PY results/curve.py --out "$CURVE" --arms none linear-0.8 \
  --arm-blr none=1.5e-3 linear-0.8=1.5e-3 --epochs ${CURVE_EPOCHS:-200} --every ${CURVE_EVERY:-25} --seed ${CURVE_SEED:-0} \
  --train-seconds $(left 60) \
  --pretrain-args="--workers 6 $CAP ${CURVE_FLAGS:-}" --probe-args="--workers 2 $PROBE" --rank-args="--workers 2 $RANK"
for run in "$CURVE"/runs/*; do
  rm -f "$OUT/$(basename "$run").ckpt.pt.gz.part-"*  # an earlier call's parts into the same OUT would join these
  [ -f "$run/ckpt.pt" ] && gzip -1 "$run/ckpt.pt" && split -b 15M "$run/ckpt.pt.gz" "$OUT/$(basename "$run").ckpt.pt.gz.part-" \
    && rm "$run/ckpt.pt.gz"
done
fi
fi

stamp "pack"
for kept in "$OUT"/curve/runs/*/ckpt_epoch*.pt; do  # a resumed run never writes an earlier epoch's copy again
  e=${kept##*ckpt_epoch}; [ -f "$kept" ] && [ ! -f "$(dirname "$kept")/rank_e${e%.pt}.json" ] \
    && echo "warning: $kept was not measured before the deadline: that point of the curve is lost"
done
find "$OUT" -name "ckpt*.pt*" -delete  # kept checkpoints (measured: the JSONs hold them), .pt.tmpPID of a cut save
PACKED=$(cd "$OUT" && ls -d default study curve fast* 2>/dev/null)
# a reply brings back at most 8 files of 16 MiB: the log, this tar and the checkpoint parts (stop 22 lost a checkpoint
# to that count), so what the tar holds is removed
[ -n "$PACKED" ] && tar -czf "$OUT/gpu_results.tar.gz" -C "$OUT" $PACKED && (cd "$OUT" && rm -rf $PACKED)
ls "$OUT"
stamp done
