#!/usr/bin/env bash
# Every GPU number in the README, on one card; each stage but `all` fits one 10-minute call on an H200:
#   bash results/gpu.sh OUT_DIR [all|bench|fast|autotune|default|study|curve]   (OUT_DIR gets gpu-STAGE.log and gpu_results.tar.gz)
# bench: stages 1 and 3 (about 4 minutes); default: stage 2 (2 minutes); study: stage 4 (42 runs: not yet timed on a GPU; the 24-run shapes study took 6 minutes); curve: stage 5
# 1. bench.py, ViT-B/16 224 px batch 256 bf16: ours eager, ours compiled, and the timm-Block MAE run eagerly
# 2. the default command on CUDA (compile + AMP), whole, with its wall time
# 3. bench.py --loader on an ImageFolder of JPEGs it writes, 16 workers
# 4. the glyphs study (results/study.py: 7 arms, a 4-value blr sweep each, 3 seeds), the CPU preset in bf16: a study
#    of its own (OUT/study), never mixed with the fp32 CPU runs
# 5. results/curve.py, none and linear-0.6 side by side, 12 and then 24 epochs of the GPU default recipe, each
#    probed and ranked at 4 checkpoints (about 3 + 5 minutes: give it BUDGET_S=560)
# 6. fast (issue 14): vit_m4_32 at batch 1024 on glyphs, the device data path against the DataLoader, each timed
#    by pretrain.py's own img/s (compiled, bf16), and bench.py --loader beside them (about 3 minutes)
# 7. autotune (not in all, under 10 minutes): ViT-B/16 compiled at batch 256 and 384, then max-autotune at 256
# Each stage has its own time limit, so one that overruns leaves the rest standing; the study gets what is left
# of BUDGET_S (default 540 s, counted from the start) less 60 s, kept for summarising and packing its files.
set -u
OUT=${1:?usage: bash results/gpu.sh OUT_DIR [all|bench|fast|autotune|default|study|curve]}
STAGE=${2:-all}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-540} - 60 ))
mkdir -p "$OUT"
PY=${PY:-python3}
QUICK=${QUICK:-0}  # QUICK=1: a tiny CPU dry run of this script's plumbing, no numbers
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu-$STAGE.log") 2>&1
stamp() { echo "=== $(date -u +%H:%M:%S) $*"; }

stamp env
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
nproc

if [ "$QUICK" = 1 ]; then
  BENCH="--model vit_p4_32 --batch-size 32 --steps 2"; DEFAULT="--max-steps 5"; N_JPEG=300; WORKERS=2
  STUDY="--epochs 1 --seeds 0 --arms none linear-0.6 --blrs 1.5e-3"; CURVE_EPOCHS="4"; CAP="--max-steps 3"
  PROBE="--n-train 300 --n-test 200"; RANK="--n 256 --n-tokens 32"
else
  BENCH="--model vit_b16 --batch-size 256 --steps 30"; DEFAULT=""; N_JPEG=8192; WORKERS=16
  STUDY="--epochs 2"; CURVE_EPOCHS="12 24"
  PROBE=""; RANK=""; CAP=""
fi

if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
stamp "bench eager (ours vs timm Block)"
timeout 120 $PY bench.py --no-compile $BENCH
stamp "bench compiled (ours) vs timm Block eager"
timeout 240 $PY bench.py --compile $BENCH

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
timeout 90 $PY bench.py --loader --data "$OUT/jpegs" --workers $WORKERS --batch-size 256 --steps 25
timeout 60 $PY bench.py --loader --workers $WORKERS --batch-size 256 --steps 25
rm -rf "$OUT/jpegs"

fi

[ "$STAGE" = bench ] || $PY -c "import glyphs; glyphs.make_glyphs('train'); glyphs.make_glyphs('test')"  # the embedded data, cached once

if [ "$STAGE" = all ] || [ "$STAGE" = fast ]; then
for PATH_FLAG in --device-data --no-device-data; do
  stamp "fast: vit_m4_32, batch 1024, $PATH_FLAG"
  timeout 150 $PY pretrain.py --alpha-schedule none --batch-size 1024 --epochs ${FAST_EPOCHS:-12} $PATH_FLAG \
    --log-every 12 --out-dir "$OUT/fast$PATH_FLAG" $CAP | grep -E "img/s|done" | tail -4
done
timeout 60 $PY bench.py --loader --batch-size 1024 --steps 20 --workers 8
fi

if [ "$STAGE" = autotune ]; then  # not in `all`: compiling ViT-B/16 with max-autotune takes minutes
stamp "bench compiled: batch 256 and 384 in the default mode, then batch 256 with max-autotune (issue 14's levers)"
timeout 150 $PY bench.py --compile --model vit_b16 --batch-size 256 --steps 30
timeout 150 $PY bench.py --compile --model vit_b16 --batch-size 384 --steps 30
timeout 280 $PY bench.py --compile --compile-mode max-autotune --model vit_b16 --batch-size 256 --steps 30
fi

if [ "$STAGE" = all ] || [ "$STAGE" = default ]; then
stamp "the default command, on this machine's default device"
T0=$(date +%s)
timeout 100 $PY pretrain.py --alpha-schedule linear --out-dir "$OUT/default" --log-every 100 $DEFAULT \
  && echo "default command wall: $(( $(date +%s) - T0 )) s" \
  && timeout 60 $PY probe.py "$OUT/default/ckpt.pt" $PROBE | tail -4
fi

if [ "$STAGE" = all ] || [ "$STAGE" = study ]; then
stamp "study: the CPU preset, 7 arms x (4 blr + 2 seeds), 10 runs at once"
STUDY_S=$(( DEADLINE - $(date +%s) ))
echo "study time limit: $STUDY_S s"
timeout $STUDY_S $PY results/study.py --out "$OUT/study" --jobs 10 $STUDY \
  --pretrain-args="--no-compile --workers 2 --batch-size 128 $CAP" --probe-args="--workers 1 $PROBE" --rank-args="--workers 1 $RANK" \
  || $PY results/study.py --out "$OUT/study" --collect $STUDY | tail -12  # cut short: summarise what finished
fi

if [ "$STAGE" = all ] || [ "$STAGE" = curve ]; then
for EPOCHS in $CURVE_EPOCHS; do  # the GPU default recipe (batch 256, compiled, bf16), none and linear-0.6 side by side
  stamp "curve: $EPOCHS epochs, a checkpoint probed every $(( EPOCHS / 4 ))"
  timeout $(( DEADLINE - $(date +%s) )) $PY results/curve.py --out "$OUT/curve$EPOCHS" --arms none linear-0.6 \
    --epochs $EPOCHS --every $(( EPOCHS / 4 )) --train-seconds $(( DEADLINE - $(date +%s) - 90 )) \
    --pretrain-args="--workers 6 $CAP" --probe-args="--workers 2 $PROBE" --rank-args="--workers 2 $RANK"
done
fi

if [ "$STAGE" != bench ]; then
stamp "pack"
find "$OUT" -name "ckpt*.pt" -delete
tar -czf "$OUT/gpu_results.tar.gz" -C "$OUT" $(cd "$OUT" && ls -d default study curve* fast* 2>/dev/null)
fi
stamp done
