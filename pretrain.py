"""MAE pretraining with decayed identity shortcuts.

    python pretrain.py --alpha-schedule linear                     # embedded data, laptop CPU, minutes
    torchrun --nproc_per_node 8 pretrain.py --model vit_b16 --data /path/to/imagenet --epochs 800 ...

Every random choice of a step (crop, flip, mask) is a function of (seed, epoch, image index), so a resumed
run, or one spread over several processes, sees exactly the images and masks of an uninterrupted one.
"""
import argparse
import contextlib
import glob
import io
import json
import math
import os
import random
import shlex
import signal
import sys
import time
from dataclasses import asdict

if __name__ == "__mp_main__":  # a loader worker started by spawn imports this file first; from here on, the stop
    # signals (common.STOP_SIGNALS, named here: this runs before the slow imports) are the main process's alone
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)

try:
    import fcntl
except ImportError:  # Windows: runs go unlocked
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import device_data
from common import (COMPILE_MODES, SEED, STOP_SIGNALS, WORKERS, Parser, alpha_pairs, autocast, default_workers,
                    describe_machine, fail, flops_per_image, fraction, iter_holding_signals, load_checkpoint, lr_at,
                    nearest_folder, non_negative, non_negative_int, outlive_closed_pipes, peak_flops, pick_device,
                    plateau_note, positive, positive_int, real, rng_states, save_atomic, save_bytes, set_rng_states,
                    try_writing_in)
from model import MAE, PRESETS, SCHEDULES, check_alphas, encoder_alphas, patchify, preset, stream_scales, unpatchify

CPU_PRESET, CPU_EPOCHS = "vit_m4_32", 2  # the default command: 2 CPU cores train it in under 10 minutes


# ----------------------------------------------------------------------------- recipe pieces

def param_groups(model, weight_decay, eps=1e-8):
    """Weight decay on matrices and tokens (dim >= 2); biases and norm gains (1-D) are not decayed. Under
    --decay-as-lr each re-scaled tensor (model.decay_scales) has a group of its own: lr x s, eps / s, decay / s."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper prefixes every name
    scales, plain, scaled = model.decay_scales(), {True: [], False: []}, []
    for name, p in model.named_parameters():
        decay = weight_decay if p.dim() >= 2 else 0.0
        if name in scales:
            s = scales[name]
            scaled.append({"params": [p], "weight_decay": decay / s, "eps": eps / s, "lr_scale": s})
        elif p.requires_grad:
            plain[p.dim() >= 2].append(p)
    return [{"params": plain[True], "weight_decay": weight_decay}, {"params": plain[False], "weight_decay": 0.0}, *scaled]


def optimizer_and_scaler(model, weight_decay, device):
    """MAE's AdamW (betas 0.9, 0.95; fused on CUDA) and a GradScaler that only fp16 needs; the lr is set per step."""
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=0.0, betas=(0.9, 0.95), eps=1e-8, fused=cuda)
    return optimizer, torch.amp.GradScaler("cuda", enabled=cuda and not torch.cuda.is_bf16_supported())


class Stop:
    """Ctrl-C, SIGTERM (what `timeout`, a cluster's scheduler at its time limit, or `kill` sends) or SIGHUP (a closed
    terminal or ssh session): the step under way finishes, is saved, and the run stops (exit 130, 143 or 129).
    Under torchrun the processes agree on the step at the next log line (stop_agreed), the loop's only host syncs.
    A second Ctrl-C stops at once; a second SIGTERM or SIGHUP changes nothing (SIGKILL is what stops at once)."""
    asked, by, exit_code = False, "Ctrl-C", 130

    @classmethod
    def ask(cls, signum, frame):
        # A second Ctrl-C raises KeyboardInterrupt, but not under torchrun, which passes the terminal's Ctrl-C on
        # to processes that had it already. A SIGTERM or SIGHUP from now on, even as Python shuts down, is ignored.
        again_stops = signum == signal.SIGINT and "RANK" not in os.environ
        signal.signal(signum, signal.default_int_handler if again_stops else signal.SIG_IGN)
        says = os.environ.get("RANK", "0") == "0"
        again = " (Ctrl-C again stops at once, unsaved)" if again_stops else ""
        if cls.asked:
            if signum == signal.SIGINT and says:  # after a SIGTERM or SIGHUP
                print(f"\nCtrl-C: already saving after this step{again}", flush=True)
            return
        cls.asked = True
        cls.by, cls.exit_code = STOP_SIGNALS[signum]
        if says:
            print(f"\n{cls.by}: saving after this step, then stopping{again}", flush=True)


def catch_stop_signals():
    for s in STOP_SIGNALS:
        signal.signal(s, Stop.ask)


def stop_agreed(device, world):
    """Whether to stop now: Stop.asked, or under torchrun whether any process had a signal by the vote (a
    collective: every process must call it); then every process takes the strongest signal's name and exit code
    (SIGTERM, Ctrl-C, SIGHUP). A signal that lands during the vote counts at the next one: the processes must agree."""
    if world == 1:
        return Stop.asked
    code = torch.tensor(float(Stop.exit_code if Stop.asked else 0), device=device)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    if not (code := int(code.item())):  # one host sync
        return False
    Stop.asked, Stop.exit_code = True, code
    Stop.by = next(name for name, exit_code in STOP_SIGNALS.values() if exit_code == code)
    for s in STOP_SIGNALS:  # as if each process had the signal: torchrun passes one on to the others when the first
        signal.signal(s, signal.SIG_IGN)  # exits, and one landing as Python shuts down would kill a saved process
    return True


def ignore_stop_signals(worker_id):  # loader workers leave the stop signals to the main process, which saves
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class SeededItems(torch.utils.data.Dataset):
    """Item i of epoch e is augmented and masked under its own seed, so its randomness never depends on
    which process, worker or resumed run loads it. Yields (image, mask noise over patches)."""

    def __init__(self, dataset, seed, n_patches):
        self.dataset, self.seed, self.n_patches, self.epoch = dataset, seed, n_patches, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):  # default_generator: torch.manual_seed is 20x slower per item
            torch.default_generator.manual_seed(((self.seed * 1_000_003 + self.epoch) * len(self.dataset) + i) % 2**64)
            img, _ = self.dataset[i]
            return img, torch.rand(self.n_patches)


def epoch_order(n_items, seed, epoch, start, batch, accum, rank, world):
    """This process's item indices for one epoch, from micro-batch `start` on (a resumed epoch skips ahead).

    Only whole optimizer steps of accum micro-batches are kept: a leftover micro-batch would add its gradient
    to the next epoch's first step (and be lost by a resume at the epoch boundary)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_items, generator=g)[: (n_items // (batch * accum)) * batch * accum]
    per_batch = order.view(-1, batch)[start:, rank * (batch // world): (rank + 1) * (batch // world)]
    return per_batch.flatten().tolist()


# ----------------------------------------------------------------------------- pictures

@torch.no_grad()
def reconstruction_grid(model, imgs, noise, mean_std, path):
    """Rows of original / masked / reconstruction (visible patches pasted back) for a few held-out images."""
    from torchvision.utils import save_image
    model.eval()
    _, pred, mask = model(imgs, noise=noise)
    cfg, p = model.config, model.config.patch_size
    target = patchify(imgs, p)
    if cfg.norm_pix_loss:  # predictions are in per-patch normalised units: undo with the target's own stats
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    hidden = mask[..., None]
    masked = unpatchify(target * (1 - hidden), p)
    recon = unpatchify(target * (1 - hidden) + pred * hidden, p)
    mean, std = (torch.tensor(v, device=imgs.device).view(1, 3, 1, 1) for v in mean_std)
    rows = torch.cat([imgs, masked, recon]) * std + mean
    zoom = max(1, math.ceil(800 / (len(imgs) * (imgs.shape[-1] + 2))))  # small images: nearest-neighbour, >= 800 px wide
    rows = rows.repeat_interleave(zoom, -1).repeat_interleave(zoom, -2)
    png = io.BytesIO()
    save_image(rows.clamp(0, 1), png, format="png", nrow=len(imgs), padding=2 * zoom)
    save_bytes(png.getvalue(), path)
    model.train()


# ----------------------------------------------------------------------------- command line

# Flags that shape the run: a resumed run takes them from its checkpoint and refuses different values.
RUN_FLAGS = dict(model=None, img_size=None, alpha_schedule="linear", alpha_min=0.6, decay_as_lr=False, decoder_skips=True, mask_ratio=0.75,
                 data=data.EMBEDDED, epochs=None, max_steps=None, batch_size=None, accum_steps=1, blr=None,
                 weight_decay=0.05, warmup_epochs=None, seed=0, device_data=None)
# Flags free to change between a run and its resumption; left out, log/save/keep-every stay the run's.
RUNTIME_FLAGS = dict(out_dir="out", device="auto", compile=None, compile_mode=None, resume=None, workers=None,
                     log_every=20, save_every=None, keep_every=0, download=False, data_root="./data")


def build_parser():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", help=f"preset: {', '.join(PRESETS)} (default: {CPU_PRESET} on the embedded data, else vit_b16)")
    a("--img-size", type=positive_int, help="image side in pixels, a multiple of the patch size (default: the preset's)")
    a("--alpha-schedule", help=f"shortcut decay with depth: {', '.join(SCHEDULES)} (default: linear)")
    a("--alpha-min", type=real(0, 1, low_open=True), help="shortcut weight of the last encoder sub-layer, in (0, 1] (default: 0.6)")
    a("--decay-as-lr", action="store_true", default=None,
      help="train the residual encoder with the per-layer learning rates that make it the decayed one (README)")
    a("--decoder-skips", action=argparse.BooleanOptionalAction, help="encoder-to-decoder skips (default: on)")
    a("--mask-ratio", type=fraction, help="fraction of patches hidden, in (0, 1) (default: 0.75)")
    a("--data", help=f"{data.EMBEDDED} (embedded, default), {', '.join(data.DATASETS[1:])}, or an ImageFolder "
                     "root with train/ and val/")
    a("--download", action="store_true", default=None, help="let torchvision download a named dataset")
    a("--data-root", help="where torchvision datasets live (default: ./data)")
    a("--epochs", type=positive_int, help=f"default: {CPU_EPOCHS} on the embedded data, else 800")
    a("--max-steps", type=positive_int, help="cap on optimizer steps; the lr schedule is fitted to the capped run "
      "(default: none)")
    a("--batch-size", type=positive_int, help="GLOBAL batch per micro-step, split over processes (default: 128 on CPU, 256 on GPU)")
    a("--accum-steps", type=positive_int, help="micro-steps per optimizer step; effective batch = batch-size * accum-steps "
      "(default: 1)")
    a("--blr", type=positive, help="base lr; lr = blr * effective batch / 256 (default: 1.5e-4, the MAE recipe; "
                                "1.5e-3 for the short embedded-data runs)")
    a("--weight-decay", type=non_negative, help="AdamW weight decay on matrices (default: 0.05)")
    a("--warmup-epochs", type=non_negative, help="linear warm-up length (default: 5%% of the epochs, 40 of 800)")
    a("--seed", type=SEED, help="a whole number from 0 to 2**32 - 1 (default: 0)")
    a("--out-dir", help="checkpoint, log and pictures go here (default: out)")
    a("--device", help="auto (cuda, then mps, then cpu), or a torch device name (default: auto)")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (default: on CUDA only)")
    a("--compile-mode", choices=COMPILE_MODES, help="torch.compile's mode, implies --compile: reduce-overhead (CUDA "
      "graphs) suits small models whose steps wait on kernel launches (default: torch's default)")
    a("--device-data", action=argparse.BooleanOptionalAction, help="keep the train set on the device and augment "
      "whole batches there (device_data.py; default: on CUDA for the named in-memory sets, else off)")
    a("--resume", nargs="?", const="auto", help="continue a run: a checkpoint (the run goes on in its folder unless "
      "--out-dir says otherwise), or (no value) the ckpt.pt in --out-dir")
    a("--workers", type=WORKERS, help="data loader processes (default: 0 on CPU, 8 on GPU)")
    a("--log-every", type=positive_int, help="optimizer steps between log lines; every save and epoch end logs too "
      "(default: 20)")
    a("--save-every", type=non_negative_int, help="checkpoint every N optimizer steps instead of at each epoch end; 0: "
      "only at the end (default: each epoch end; the last step always)")
    a("--keep-every", type=non_negative_int, help="also keep ckpt_epochNNN.pt every N epochs, to probe the run's trajectory (default: 0, none)")
    return p


def parse_args(argv=None):
    given = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    return argparse.Namespace(**{**RUN_FLAGS, **RUNTIME_FLAGS, **given}), given


def resolve_resume(args, given):
    """Merge the checkpoint's run flags into args; returns the checkpoint or None. A run never writes over another
    one's checkpoints: a new run needs a folder without any, a resumed one goes on in its checkpoint's folder."""
    if args.resume not in (None, "auto") and "out_dir" not in given:
        args.out_dir = os.path.dirname(args.resume) or "."
    path = os.path.join(args.out_dir, "ckpt.pt") if args.resume in (None, "auto") else args.resume
    held = sorted(glob.glob(os.path.join(glob.escape(args.out_dir), "ckpt*.pt")))
    if held and args.resume is None:
        fail(f"--out-dir {args.out_dir} already holds a run ({os.path.basename(held[0])}): add --resume to go on "
             "with it, or choose another --out-dir")
    if held and os.path.realpath(os.path.dirname(path)) != os.path.realpath(args.out_dir):
        fail(f"--out-dir {args.out_dir} already holds another run ({os.path.basename(held[0])}): resuming {path} "
             "there would write over it; choose another --out-dir")
    if args.resume is None:
        return None
    if args.resume == "auto" and not os.path.isfile(path):
        fail(f"--resume: nothing to resume in {args.out_dir} (no ckpt.pt); start a new run without --resume")
    ckpt = load_checkpoint(path)
    if not {"args", "optimizer", "step"} <= ckpt.keys():
        fail(f"--resume: {path} has no training state; it is not a pretrain.py checkpoint")
    latest = os.path.join(args.out_dir, "ckpt.pt")  # e.g. a finished run's, when one of its kept copies is resumed
    if os.path.isfile(latest) and not os.path.samefile(latest, path) and (why := in_the_way(latest, path, ckpt)):
        fail(f"--resume: {latest} {why}, and going on in {args.out_dir} would write over it: add --out-dir to branch "
             "off in a new folder, or move it away to go back here")
    try:
        check_alphas(ckpt)
    except ValueError as error:
        fail(f"--resume: {path} was {error}")
    recorded = ckpt["args"] | {"img_size": ckpt["config"]["img_size"]}  # the args hold None for "the preset's size"
    clashes = [k for k in RUN_FLAGS if k in given and k in recorded and not same_flag(k, given[k], recorded[k])]
    if clashes:
        length = [f"--{k.replace('_', '-')}" for k in clashes if k in ("epochs", "max_steps")]
        why = (f" (the lr schedule is fitted to the run's length, so {' and '.join(length)} cannot change on resume, "
               "nor can a finished run be lengthened: start a new run with the length you want)") if length else ""
        fail(f"--resume: flags do not fit the checkpoint {path}: "
             + ", ".join(f"--{k.replace('_', '-')} {given[k]} (checkpoint: {recorded[k]})" for k in clashes)
             + f"; drop them to resume{why}")
    for k in RUN_FLAGS:
        setattr(args, k, ckpt["args"].get(k, getattr(args, k)))
    for k in ("log_every", "save_every", "keep_every"):  # which files the run writes: as before, unless given again
        if k not in given:
            setattr(args, k, ckpt["args"].get(k, getattr(args, k)))
    args.data = given.get("data", args.data)  # the folder where it is now
    if data.missing_folder(args.data):
        fail(f"--resume: {path} trained on the image folder {args.data}, which is not there: pass --data with where "
             "it is now")
    return ckpt


def in_the_way(latest, path, ckpt):
    """Why resuming ckpt (read from path) must not write over its folder's ckpt.pt, `latest`: that is further
    along, or another run's: other flags or image count (aside: --max-steps, which a checkpoint edited by hand may
    raise to go on, as the tests do, and the data's path, which may move; a key only one of them records, from an
    older version, tells nothing).
    A file torch cannot read may go."""
    try:
        theirs = torch.load(latest, map_location="cpu", mmap=True, weights_only=True)
        step, facts = theirs["step"], run_facts(theirs)
    except Exception:
        return None
    if step > ckpt["step"]:
        return f"is further along (step {step}) than {path} (step {ckpt['step']})"
    mine = run_facts(ckpt)
    differ = [f"{k} {facts[k]}" for k in sorted(facts.keys() & mine.keys()) if facts[k] != mine[k]]
    return f"belongs to another run ({', '.join(differ)})" if differ else None


def run_facts(ckpt):
    facts = {f"--{k.replace('_', '-')}": v for k, v in ckpt["args"].items()
             if k in RUN_FLAGS and k not in ("max_steps", "data")}
    return facts | ({"training images": ckpt["n_train"]} if "n_train" in ckpt else {})


def same_flag(name, given, recorded):
    """A resume's flag says what the checkpoint holds: equal, another spelling of its image folder's path, or
    the folder's new place once the recorded one is gone (build() checks the image count). A named set is only
    its name: ./glyphs would be a folder."""
    if name == "data" and recorded not in data.DATASETS:
        moved = os.path.isdir(given) and data.missing_folder(recorded)
        return moved or os.path.realpath(given) == os.path.realpath(recorded)
    return given == recorded


def fill_defaults(args, device):
    """Defaults that depend on the data and the device. A flag left out is None, so a given 0 never lands here."""
    embedded, gpu = args.data == data.EMBEDDED, device.type == "cuda"
    defaults = dict(model=CPU_PRESET if embedded else "vit_b16", epochs=CPU_EPOCHS if embedded else 800,
                    batch_size=256 if gpu else 128, blr=1.5e-3 if embedded else 1.5e-4, workers=default_workers(device),
                    compile=gpu or args.compile_mode is not None, device_data=gpu and args.data in data.DATASETS)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.warmup_epochs is None:
        args.warmup_epochs = 0.05 * args.epochs


def setup_distributed(device):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is one process on `device`."""
    if "RANK" not in os.environ:
        return 0, 1, device
    backend = "nccl" if device.type == "cuda" else "gloo"  # --device cpu stays on the CPU on a GPU machine
    dist.init_process_group(backend)
    catch_stop_signals()  # not before: a process waiting for the others (torchrun's SIGTERM after a failure) dies
    local = int(os.environ["LOCAL_RANK"])
    if backend == "nccl":
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), (torch.device("cuda", local) if backend == "nccl" else device)


def build(args, world):
    """Config, data and model from the flags; every bad input ends here with one line and exit 2."""
    if args.batch_size % world:  # the flags' own ranges were checked as they were parsed (common.py)
        fail(f"batch size {args.batch_size} must be a positive multiple of the {world} processes")
    if args.device_data and args.data not in data.DATASETS:
        fail(f"--device-data takes the named in-memory sets ({', '.join(data.DATASETS)}), not a folder of files")
    if args.compile_mode == "reduce-overhead" and args.accum_steps > 1:  # a replay would overwrite the summed grads
        fail("--compile-mode reduce-overhead cannot accumulate gradients: use --accum-steps 1 or another mode")
    if args.warmup_epochs > args.epochs:
        fail(f"--warmup-epochs {args.warmup_epochs:g} is longer than the run ({args.epochs} epoch"
             f"{'' if args.epochs == 1 else 's'}): "
             "the lr would never reach its peak")
    if args.data not in data.DATASETS and os.path.isdir(args.data):
        args.data = os.path.abspath(args.data)  # so recorded: probe.py and --resume find it from any folder
    cfg = model_config(args)
    try:
        train_set = data.get_dataset(args.data, "pretrain", cfg.img_size, train_aug=True,
                                     download=args.download, root=args.data_root)
        held_out = data.get_dataset(args.data, "test", cfg.img_size, train_aug=False, root=args.data_root)
        train_set[0]  # a folder of files that cannot be decoded fails here, not inside the loop
        # the reconstruction figures' images, spread over the split: a folder's val/ is sorted by class
        spread = torch.linspace(0, len(held_out) - 1, min(8, len(held_out))).long().tolist()
        preview = torch.stack([held_out[i][0] for i in spread])
    except data.DataError as e:
        fail(str(e))
    if len(train_set) < args.batch_size * args.accum_steps:
        fail(f"{len(train_set)} training images are fewer than one effective batch of --batch-size {args.batch_size} "
             f"x --accum-steps {args.accum_steps}; lower one of them")
    return cfg, train_set, preview


def model_config(args):
    size = {} if args.img_size is None else {"img_size": args.img_size}  # None: the preset's
    try:
        return preset(args.model, alpha_schedule=args.alpha_schedule, alpha_min=args.alpha_min, decay_as_lr=args.decay_as_lr,
                      decoder_skips=args.decoder_skips, mask_ratio=args.mask_ratio, **size)
    except ValueError as e:
        fail(str(e))


def config_changes(cfg, recorded):
    """The model's fields that differ from the checkpoint's, as one string ('' when none). A field only one side
    has, from an older version, tells nothing."""
    now = asdict(cfg)
    return ", ".join(f"{k} {now[k]} (checkpoint: {v})" for k, v in recorded.items() if k in now and now[k] != v)


def claim_out_dir(path, create):
    """Stop now if the run's folder cannot be written or another run is writing it. create=False, before the data
    are built (a scan of ImageNet takes minutes): nothing is made or changed, so a bad input found later leaves the
    disk as it was. create=True, once every input has passed: the folder and its lock are made."""
    try:
        existing = nearest_folder(path)
        try_writing_in(path if create else existing)
    except OSError as e:
        fail(f"cannot write to --out-dir {path} ({e.strerror}); choose a folder you can write")
    if create or existing == os.path.abspath(path):
        FolderLock.take(path, create)


class FolderLock:
    """An exclusive flock on <out_dir>/.lock while the run lives: a second run into the same folder (a requeued
    job beside the first) stops in one line instead of mixing its log and checkpoints with the first's. The
    kernel drops the lock when the process ends, even by kill -9, so no stale lock is ever left."""
    held = None

    @classmethod
    def take(cls, path, create=True):
        """create=False: only where a run has left a .lock (a folder's first run makes it): a check alters nothing."""
        lock = os.path.join(path, ".lock")
        same_file = lambda held: os.path.isfile(lock) and os.path.samestat(os.fstat(held.fileno()), os.stat(lock))
        if cls.held is not None and same_file(cls.held):
            return  # taken already (by the check before the data), on the file that is there now
        if cls.held is not None:  # an earlier run of this process (the tests call main() again)
            cls.held.close()
            cls.held = None
        if fcntl is None or not (create or os.path.isfile(lock)):
            return
        cls.held = open(lock, "a" if create else "r")
        try:
            fcntl.flock(cls.held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            cls.held.close()
            cls.held = None
            fail(f"--out-dir {path} is in use by another pretrain.py run: wait for it to end, or choose another --out-dir")
        except OSError:  # a file system without locks (some network mounts): the run goes on unlocked
            pass


def main(argv=None):
    args, given = parse_args(argv)
    ckpt = resolve_resume(args, given)
    device = pick_device(args.device)
    fill_defaults(args, device)
    if os.environ.get("RANK", "0") == "0":
        claim_out_dir(args.out_dir, create=False)
    cfg, train_set, preview = build(args, int(os.environ.get("WORLD_SIZE", 1)))
    if ckpt is not None and ckpt.get("n_train", len(train_set)) != len(train_set):  # the epochs would shift silently
        fail(f"--resume: the run trained on {ckpt['n_train']} images, the data now holds {len(train_set)}; "
             "resume on the same data or start a new run")
    if ckpt is not None and (changed := config_changes(cfg, ckpt["config"])):  # e.g. a preset edited since
        fail(f"--resume: the preset {args.model} now builds another model than the checkpoint's ({changed}); "
             "put the preset back in model.py, or start a new run")
    rank, world, device = setup_distributed(device)  # only once every input has been checked
    if rank == 0:
        claim_out_dir(args.out_dir, create=True)
        print(f"model {args.model}: {cfg.depth} blocks x {cfg.width} wide, {cfg.img_size} px, patch {cfg.patch_size}; "
              f"data {args.data}; device {device}; {world} process(es)")
        threads = f"; {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
        print(f"  on {describe_machine(device)}{threads} (the last digits of a run depend on these)")
        if ckpt is None and args.data != data.EMBEDDED and "model" not in given:
            kind = "an image folder" if args.data not in data.DATASETS else "a torchvision set"
            print(f"  {kind} gets the paper's model, epochs and blr by default (vit_b16 at 224 px, 800 epochs, "
                  "blr 1.5e-4); small images or a small set want glyphs' preset: --model vit_m4_32 --blr 1.5e-3 and "
                  "fewer --epochs")
        schedule = "none" if cfg.alpha_schedule == "none" else f"{cfg.alpha_schedule} to {cfg.alpha_min}"
        if cfg.alpha_schedule == "none" and "alpha_min" in given:
            schedule += f"; --alpha-min {cfg.alpha_min:g} does nothing under it"
        print(f"  encoder shortcut weights (attn, mlp) per block, {schedule}: "
              + alpha_pairs(encoder_alphas(cfg.depth, cfg.alpha_schedule, cfg.alpha_min)))
        if cfg.decay_as_lr:
            print(f"  --decay-as-lr: those weights are 1 here; instead each branch output trains at lr x 1/c_k, "
                  f"up to x{1 / stream_scales(cfg.depth, cfg.alpha_schedule, cfg.alpha_min)[-1]:.0f} (README)")
    train(args, cfg, train_set, preview, device, rank, world, ckpt)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def train(args, cfg, train_set, preview, device, rank, world, ckpt):
    master, cuda = rank == 0, device.type == "cuda"
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    model = MAE(cfg).to(device)  # the same initial weights on every process
    optimizer, scaler = optimizer_and_scaler(model, args.weight_decay, device)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty when the run was saved without a loss scaler (CPU, bf16)
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_states(ckpt["rng"])
        step = ckpt["step"]
    runner = DDP(model, device_ids=[device.index] if cuda else None) if world > 1 else model
    runner = torch.compile(runner, mode=args.compile_mode) if args.compile else runner

    steps_per_epoch = len(train_set) // (args.batch_size * args.accum_steps)
    planned = args.epochs * steps_per_epoch
    total = min(planned, args.max_steps or planned)
    epochs = math.ceil(total / steps_per_epoch)  # as the log counts them: a capped run's
    # a capped run keeps the schedule's shape; the rounding keeps 0.29 epochs of 100 steps (28.999...) at 29 steps
    warmup = int(round(args.warmup_epochs * steps_per_epoch * total / planned, 6))
    peak_lr = args.blr * args.batch_size * args.accum_steps / 256
    n_patches = (cfg.img_size // cfg.patch_size) ** 2
    items = SeededItems(train_set, args.seed, n_patches)
    fast = device_data.DeviceBatches(train_set, data.MEAN_STD[args.data], cfg.img_size, device) if args.device_data else None
    ckpt_path, log_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "log.jsonl")
    show_imgs = preview.to(device)
    show_noise = torch.rand(len(show_imgs), n_patches, generator=torch.Generator().manual_seed(0)).to(device)
    flops, peak = 3 * flops_per_image(cfg, cfg.mask_ratio), peak_flops(device)
    if master:
        keep_log_until(log_path, step)
        print(f"{total} steps of {args.batch_size * args.accum_steps} images ({steps_per_epoch} per epoch), "
              f"peak lr {peak_lr:.2e}, warm-up {warmup} steps" + (f"; resuming at step {step}" if step else "")
              + ("\n  torch.compile: the first step waits a minute or more while the model compiles" if args.compile
                 else ""), flush=True)

    loss_sum, bad_step = torch.zeros((), device=device), torch.full((), -1, device=device)
    if stop_agreed(device, world):  # during start-up: no step to save, and the folder stays free
        if master:
            print(f"stopped by {Stop.by} before the first step; nothing was saved", file=sys.stderr)
        sys.exit(Stop.exit_code)
    t_start = t_log = t_wall = time.time()  # img/s from t_log (training alone), the eta from t_wall (saves too)
    steps_at_log = first_step = step
    mean_loss = None
    while step < total:
        epoch, start = divmod(step, steps_per_epoch)
        items.epoch = epoch
        micro_done = start * args.accum_steps  # micro-batches of this epoch already done
        if fast:  # whole global batches, each sliced per rank on the device
            order = torch.tensor(epoch_order(len(items), args.seed, epoch, micro_done, args.batch_size, args.accum_steps,
                                             0, 1))
            batches = (fast.batch(index, args.seed, epoch, micro_done + b, n_patches, rank, world)
                       for b, index in enumerate(order.view(-1, args.batch_size)))
        else:
            order = epoch_order(len(items), args.seed, epoch, micro_done, args.batch_size, args.accum_steps, rank, world)
            batches = torch.utils.data.DataLoader(torch.utils.data.Subset(items, order), batch_size=args.batch_size // world,
                                                  num_workers=args.workers, pin_memory=cuda,  # this process's share
                                                  worker_init_fn=ignore_stop_signals)
        for i, (imgs, noise) in enumerate(iter_holding_signals(batches)):
            imgs, noise = imgs.to(device, non_blocking=True), noise.to(device, non_blocking=True)
            last_micro = (i + 1) % args.accum_steps == 0
            no_sync = contextlib.nullcontext if last_micro or world == 1 else runner.no_sync  # a fresh one per use
            with no_sync(), autocast(device):
                loss = runner(imgs, noise=noise)[0]
            with no_sync():
                scaler.scale(loss / args.accum_steps).backward()
            loss_sum += loss.detach() / args.accum_steps
            if not last_micro:
                continue
            lr = lr_at(step, total, warmup, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            optimizer_step(optimizer, scaler)
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss_sum), step, bad_step)  # on the device: no sync
            step += 1
            end_of_epoch = step % steps_per_epoch == 0 or step == total
            periodic = end_of_epoch if args.save_every is None else (args.save_every and step % args.save_every == 0)
            save_due = step == total or periodic  # alike on every process
            log_due = step % args.log_every == 0 or end_of_epoch or save_due
            # read once: a signal after this line stops the run at the next step, saved; under torchrun one process's
            # signal stops them all, at a log step (a host sync there already)
            stop = (world == 1 or log_due) and stop_agreed(device, world)
            save_now = save_due or stop
            keep_now = step % steps_per_epoch == 0 and args.keep_every and (epoch + 1) % args.keep_every == 0  # whole epochs
            log_now = log_due or save_now  # a resume's log line starts at a save too
            if log_now:  # the only host syncs of the loop; before a save the weights are checked too
                stop_if_not_finite(bad_step, lr, ckpt_path, master, world, (model, step) if save_now or keep_now else None)
                now = time.time()
                if world > 1:  # each process summed its own share of the batch
                    dist.all_reduce(loss_sum)
                    loss_sum /= world
                img_s = (step - steps_at_log) * args.batch_size * args.accum_steps / (now - t_log)
                mean_loss = loss_sum.item() / (step - steps_at_log)
                if master:
                    mfu = f" | mfu {flops * img_s / (peak * world):5.1%}" if peak else ""
                    eta = duration((total - step) * (now - t_wall) / (step - steps_at_log))
                    print(f"epoch {epoch + 1}/{epochs} step {step}/{total} | loss {mean_loss:.4f} | lr {lr:.2e} | "
                          f"{img_s:7.1f} img/s{mfu} | eta {eta}", flush=True)
                    append_log(log_path, dict(step=step, epoch=epoch, loss=mean_loss, lr=lr, img_per_s=img_s))
                loss_sum.zero_()
                t_wall = now
            if save_now and master:
                save(model, optimizer, scaler, args, epoch, step, len(train_set), mean_loss, ckpt_path)
            if keep_now and master:
                kept_path = os.path.join(args.out_dir, f"ckpt_epoch{epoch + 1:03d}.pt")
                save(model, optimizer, scaler, args, epoch, step, len(train_set), mean_loss, kept_path)
            if master and end_of_epoch and ((epoch + 1) % max(1, epochs // 10) == 0 or step >= total):  # ten per run
                reconstruction_grid(model, show_imgs, show_noise, data.MEAN_STD[data.own_stats(args.data)],
                                    os.path.join(args.out_dir, f"recon_epoch{epoch + 1:03d}.png"))
            if log_now:  # the next interval starts after the saves and the figure: img/s counts training alone
                t_log, steps_at_log = time.time(), step
            if stop and step < total:  # asked during the last step: the run ends as usual
                if world > 1:
                    dist.barrier()  # the others wait for the master's save
                if master:
                    print(f"stopped by {Stop.by} after step {step}, saved to {ckpt_path}; the same command with "
                          "--resume goes on from there", file=sys.stderr)
                sys.exit(Stop.exit_code)
            if step >= total:
                break
    if master:
        session = f"{step - first_step} in this session, {(time.time() - t_start) / 60:.1f} min" if step > first_step \
            else "finished before this command: nothing left to train"
        unsaved_move = ckpt is not None and step == first_step and ckpt["args"].get("data") != args.data  # --data NEW
        where = f" --data {shlex.quote(args.data)}" if unsaved_move else ""
        print(f"done: step {step} of {total} ({session}); checkpoint {ckpt_path}\n"
              f"next: python probe.py {shlex.quote(ckpt_path)}{where}   and   python rank.py {shlex.quote(ckpt_path)}{where}")
        if note := plateau_note(mean_loss if step > first_step else (ckpt or {}).get("loss"), cfg):
            print(note)


def duration(seconds):
    """h:mm:ss, with whole days in front past 24 h (a ViT-B/16 run's eta is days)."""
    days, seconds = divmod(int(seconds), 86400)
    return (f"{days}d " if days else "") + time.strftime("%H:%M:%S", time.gmtime(seconds))


def optimizer_step(optimizer, scaler):
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def stop_if_not_finite(bad_step, lr, ckpt_path, master, world, weights_after=None):
    """Every process stops at the same check, before anything is saved. A loss that turns non-finite on one
    process reaches the other processes' weights one step later, so they agree on the first bad step. With
    weights_after = (model, step), the weights are checked too: a finite loss can still leave non-finite
    weights (an overflowing gradient), and those must never be saved."""
    bad = torch.where(bad_step < 0, 2**62, bad_step)
    if weights_after is not None:
        model, step = weights_after
        finite = torch.stack([p.isfinite().all() for p in model.parameters()]).all()
        bad = torch.where(finite, bad, torch.clamp(bad, max=step - 1))
    if world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MIN)
    if (bad := bad.item()) < 2**62:
        if master:
            last = f"the last good checkpoint {ckpt_path} is untouched" if os.path.exists(ckpt_path) else "no checkpoint was written"
            print(f"error: the loss or the weights became non-finite at step {bad + 1} (lr {lr:.2e}); stopping; "
                  f"{last}; try a lower --blr or a larger --alpha-min", file=sys.stderr)
        sys.exit(1)


def save(model, optimizer, scaler, args, epoch, step, n_train, loss, path):
    """loss: the mean over the log interval that ends here, for probe.py and rank.py's plateau note."""
    state = model.checkpoint(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), args=vars(args).copy(),
                             epoch=epoch, step=step, n_train=n_train, loss=loss, rng=rng_states())
    try:
        save_atomic(state, path)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def append_log(log_path, record):
    try:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:  # a full disk: stop as a failed save does, the last checkpoint untouched
        print(f"error: could not write {log_path} ({e.strerror or e}); the last checkpoint is unchanged", file=sys.stderr)
        sys.exit(1)


def keep_log_until(log_path, step):
    """A resumed run drops the log lines that the interrupted run wrote after its checkpoint, and any line that
    is not a whole record (a write cut by a kill, a hand edit). Rewritten through a temp file, as checkpoints are."""
    if os.path.exists(log_path):
        with open(log_path) as f:
            kept = [line for line in f if (record := log_record(line)) and record["step"] <= step]
        save_bytes("".join(kept).encode(), log_path)


def log_record(line):
    try:
        record = json.loads(line) if line.endswith("\n") else None
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


if __name__ == "__main__":
    outlive_closed_pipes()
    if "RANK" not in os.environ:  # under torchrun: once the processes have met (setup_distributed)
        catch_stop_signals()
    try:
        main()
    except KeyboardInterrupt:
        print("error: stopped by a second Ctrl-C; nothing was saved after the last checkpoint", file=sys.stderr)
        sys.exit(130)
