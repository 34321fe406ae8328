"""What more than one script needs: one-line errors, typed flags, the device and autocast, checkpoint files and
random states, loader workers that leave signals to their main process, the warm-up + cosine learning-rate schedule,
the early-plateau note, the FLOP count behind MFU, JSON and plot output, and output that outlives a closed pipe.
Imports no stage, so evaluation never loads the training script."""
import argparse
import contextlib
import errno
import io
import json
import math
import multiprocessing.resource_tracker
import os
import random
import signal
import sys
import threading

import numpy as np
import torch

from model import read_checkpoint, skip_blocks


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class OutlivesItsReader:
    """sys.stdout or sys.stderr that goes on once its reader has gone: `python pretrain.py | tee log`, then a Ctrl-C,
    which ends tee too (EPIPE), or a closed terminal (EIO), whose SIGHUP pretrain.py answers by saving its step. The
    next print would raise before the run saved; from the first such error on, the stream writes to
    /dev/null instead (log.jsonl and the JSON reports keep the record)."""
    GONE = (errno.EPIPE, errno.EIO)

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except OSError as error:
            self.to_devnull_if_gone(error)
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except OSError as error:
            self.to_devnull_if_gone(error)

    def to_devnull_if_gone(self, error):
        if error.errno not in self.GONE:
            raise error
        self.to_devnull()

    def to_devnull(self):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, self.stream.fileno())  # what the stream still buffers goes there too, at its next flush
        os.close(null)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def outlive_closed_pipes():
    """For a script's entry point (not main(), which tests call under their own capture): run_script, pretrain.py."""
    if sys.stdout is not None:  # None: started with the descriptor closed, and print() then writes nothing
        sys.stdout = OutlivesItsReader(sys.stdout)
    if sys.stderr is not None:
        sys.stderr = OutlivesItsReader(sys.stderr)


def run_script(main):
    """probe.py's, rank.py's and bench.py's entry point: main(), its output outliving a closed pipe, and Ctrl-C
    stopping it with one line and exit 130, not a traceback (its files are written through temp files, so none is
    left half-written)."""
    outlive_closed_pipes()
    try:
        main()
    except KeyboardInterrupt:
        print("stopped by Ctrl-C", file=sys.stderr)
        sys.exit(130)


# The signals that stop a run, saving the step under way (pretrain.py): their name in messages, and the exit code
# (128 + the signal's number) the process ends with. A stop under torchrun takes the highest code of its processes'.
STOP_SIGNALS = {signal.SIGINT: ("Ctrl-C", 130), signal.SIGTERM: ("SIGTERM", 143)}
if hasattr(signal, "SIGHUP"):  # a closed terminal or ssh session (not on Windows)
    STOP_SIGNALS[signal.SIGHUP] = ("SIGHUP", 129)


def iter_holding_signals(loader):
    """iter(loader), holding back the stop signals the main process acts on (Ctrl-C; pretrain.py's SIGTERM and
    SIGHUP too) while it starts its workers, which keep them held: one sent to the whole process group (a terminal's
    Ctrl-C or hang-up, a scheduler's SIGTERM) is the main process's alone to act on, and cannot kill a worker as it
    starts, which hung or crashed the run. Workers inherit the hold through fork or spawn's exec (macOS), as does a
    fork server (Python 3.14's Linux default) first started here, and its workers. The main process acts once they
    are up."""
    workers = getattr(loader, "num_workers", 0)  # the device data path's batches are a generator, no workers
    acted_on = [s for s in STOP_SIGNALS if callable(signal.getsignal(s))]
    if not workers or not acted_on or not hasattr(signal, "pthread_sigmask"):  # (Windows has no pthread_sigmask)
        return iter(loader)
    if (loader.multiprocessing_context or torch.multiprocessing).get_start_method() != "fork":
        # the resource tracker's first start lifts the hold in this process (CPython before gh-127586, as 3.11)
        multiprocessing.resource_tracker.ensure_running()
    # The hold is this thread's: the kernel may hand a signal to another thread (torch's), and Python would still
    # run its handler here mid-start. So until the workers are up a signal is only written down.
    arrived, handlers, held = [], {}, None
    swap = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    try:
        for s in acted_on if swap else ():
            handlers[s] = signal.signal(s, lambda signum, frame: arrived.append(signum))
        held = signal.pthread_sigmask(signal.SIG_BLOCK, acted_on)
        return iter(loader)
    finally:
        if held is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a signal held back till now runs the recorder
        for s, handler in handlers.items():
            try:
                signal.signal(s, handler)
            except KeyboardInterrupt:  # a Ctrl-C just now, run by the handler restored before: restore the rest
                arrived.append(signal.SIGINT)
                signal.signal(s, handler)
        for s in dict.fromkeys(arrived):
            signal.raise_signal(s)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other bad input
        fail(f"{message}{self.compare_hint(message)} (see --help)")

    def compare_hint(self, message):
        """probe.py and rank.py: --compare takes every path after it, so the first checkpoint goes before it."""
        if "--compare" not in self._option_string_actions:
            return ""
        if message.endswith("required: checkpoint"):
            return "; the first checkpoint goes before --compare, which takes every path after it"
        if message.startswith("unrecognized arguments:") and any(map(os.path.isfile, message.split()[2:])):
            return "; to compare checkpoints, give the first, then --compare and the others"
        return ""


# ---- typed flags: argparse calls these on the text, and a refusal names the flag. None means "not given",
# so 0 is always a value and never a stand-in for the default.

def whole(low, high=None):
    """A whole number in [low, high]."""
    span = f">= {low}" if high is None else f"from {low} to {high}"

    def parse(text):
        if not text.strip().lstrip("+-").isdigit() or int(text) < low or (high is not None and int(text) > high):
            raise argparse.ArgumentTypeError(f"needs a whole number {span}, got {text!r}")
        return int(text)
    return parse


def real(low=None, high=None, low_open=False, high_open=False):
    """A finite number in the interval given (None: unbounded on that side)."""
    if low is not None and high is not None:
        span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    else:
        span = f">{'' if low_open else '='} {low:g}" if low is not None else f"<{'' if high_open else '='} {high:g}"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (low is None or value > low or (value == low and not low_open)) \
            and (high is None or value < high or (value == high and not high_open))
        if not ok:
            raise argparse.ArgumentTypeError(f"needs a finite number {span}, got {text!r}")
        return value
    return parse


positive_int, non_negative_int = whole(1), whole(0)
positive, non_negative = real(0, low_open=True), real(0)
fraction = real(0, 1, low_open=True, high_open=True)  # in (0, 1)
SEED = whole(0, 2**32 - 1)  # numpy's seed range; a negative seed is refused rather than folded onto another
WORKERS = whole(0, 256)  # data loader processes
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's; reduce-overhead replays CUDA graphs


def json_file(text):
    """--out of probe.py and rank.py: a .json path that is not a folder (its plot goes beside it as .png), so a
    slip can never write over a checkpoint or a picture."""
    if not text.endswith(".json") or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"needs a file name ending in .json, got {text!r}")
    return text


# ---- device

def default_workers(device):
    """Loader processes when --workers is left out: a GPU outruns one process's decoding; on a CPU, workers would
    take the cores the model trains on."""
    return 8 if device.type == "cuda" else 0


def pick_device(name="auto"):
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            fail(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
        if device.type not in ("cpu", "cuda", "mps"):  # torch knows xpu, meta, hpu, ...; this code runs on these three
            fail(f"--device {name}: not supported here; use auto, cpu, cuda, cuda:N or mps")
        if device.type == "cuda" and not torch.cuda.is_available():
            fail(f"--device {name}: no CUDA device on this machine; use --device auto or cpu")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            fail(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 and up")
        if device.type == "mps" and not torch.backends.mps.is_available():
            fail(f"--device {name}: MPS (Apple GPUs) is not available here; use --device auto or cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe_machine(device, cpuinfo="/proc/cpuinfo"):
    """The chip a run's last digits depend on: the same command gives other float32 sums on another CPU generation
    (torch picks AVX2 or AVX-512 kernels) or GPU. VMs often name the CPU only "AMD EPYC", so family and model too."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    fields = {}
    with contextlib.suppress(OSError):
        for line in open(cpuinfo):
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    family = f"family {fields['cpu family']} model {fields.get('model', '?')}" if "cpu family" in fields else ""
    name = " ".join(filter(None, [fields.get("model name"), family])) or "unknown CPU"
    return f"{name}, {torch.backends.cpu.get_cpu_capability()} kernels, torch {torch.__version__}"


def autocast(device):
    """bf16 on CUDA (fp16 on cards without bf16); full fp32 everywhere else."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@contextlib.contextmanager
def one_thread(device):
    """For many tiny ops on a CPU, where thread hand-offs cost more than they save (10x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if torch.device(device).type == "cpu" else threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---- checkpoints, schedules, FLOPs

def save_atomic(obj, path, write=None):
    """write(obj, file) (default: torch.save) to a temp file in the same folder, fsync, rename: a crash never
    leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            (write or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, or a second Ctrl-C mid-write: no temp file left behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError) and e.__context__.errno:
            e = e.__context__  # how torch.save reports a full disk
        if not isinstance(e, OSError):
            raise
        raise OSError(f"could not save {path} ({e.strerror or e}); the file there before, if any, is unchanged") from e


def save_bytes(data, path):
    """An output file, written atomically, its folder made if need be (a results script's new --out)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_atomic(data, path, write=lambda data, f: f.write(data))


def load_checkpoint(path):
    if os.path.isdir(path):
        fail(f"{path} is a folder; pass the checkpoint file in it (e.g. {os.path.join(path, 'ckpt.pt')})")
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist; pass the ckpt.pt that pretrain.py wrote")
    try:
        ckpt = read_checkpoint(path)
    except Exception as e:
        fail(f"{path} is not a checkpoint torch can read ({type(e).__name__}); pass a ckpt.pt from pretrain.py")
    if not isinstance(ckpt, dict):
        fail(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def rng_states():
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    np.random.set_state((states["numpy"][0], np.array(states["numpy"][1], dtype=np.uint32), *states["numpy"][2:]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():  # a checkpoint from a machine with more GPUs: the ones here
        torch.cuda.set_rng_state_all(states["cuda"][:torch.cuda.device_count()])


def lr_at(step, total_steps, warmup_steps, peak_lr):
    """Linear warm-up (never 0 on the first step), then half-cycle cosine to 0; updated every step."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def flops_per_image(cfg, mask_ratio):
    """Matmul FLOPs of one forward pass of the masked MAE as run (x3 for forward + backward).

    A block on T tokens of width d: 2*T*d*d*(4 + 2*mlp_ratio) for qkv, proj and the MLP, plus 4*T*T*d for
    q@k and attn@v. Encoder: T = 1 + visible patches; decoder: T = 1 + all patches. ViT-B/16 at mask 0.75,
    plain decoder: 19.6 GFLOPs forward.
    """
    n = (cfg.img_size // cfg.patch_size) ** 2
    keep, pix = n - int(n * mask_ratio), cfg.patch_size ** 2 * cfg.in_chans
    d, dd, r = cfg.width, cfg.decoder_width, cfg.mlp_ratio

    def block(t, w):
        return 2 * t * w * w * (4 + 2 * r) + 4 * t * t * w

    total = 2 * n * pix * d + cfg.depth * block(1 + keep, d)  # patch embedding runs on every patch
    total += cfg.decoder_depth * block(1 + n, dd) + 2 * (1 + n) * dd * pix
    if cfg.decoder_skips:
        total += len(skip_blocks(cfg)) * 2 * (1 + n) * ((dd + d) * dd + dd * dd)
    else:
        total += 2 * (1 + keep) * d * dd
    return total


PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
                   "L40S": 362e12, "A10G": 70e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def plateau_note(loss, cfg, whose="the loss"):
    """A line for a run that ends on MAE's early plateau, near the loss of predicting every hidden patch flat (its
    own mean; in norm-pix units that is (d-1)/d for the d values of a patch, less on flat patches): there a probe
    of the encoder can read below an untrained one's (README). None for a run past it, or without norm-pix."""
    flat = 1 - 1 / (cfg.patch_size ** 2 * cfg.in_chans)
    if cfg.norm_pix_loss and loss is not None and loss > 0.95 * flat:
        return (f"note: {whose}, {loss:.3f}, is still near {flat:.3f}, what predicting each hidden patch flat gives: "
                "the encoder has barely begun to learn, and a probe of it can read below an untrained one's; train "
                "longer before comparing (README: the early plateau)")
    return None


# ---- output

def alpha_pairs(alphas):
    """'(attn,mlp)' shortcut weights per encoder block, as pretrain.py and rank.py print them."""
    return " ".join(f"({x:.3f},{y:.3f})" for x, y in zip(alphas[::2], alphas[1::2]))


def print_side_by_side(rows, width, diff_width):
    """--compare's table, checkpoints [0], [1], ... side by side: rows are (block, [(value, its difference to [0]),
    ...]) as text; each value right-aligned in width, each difference but [0]'s left-aligned after it."""
    lines = [("block", [(f"[{i}]", "") for i in range(len(rows[0][1]))]), *rows]
    for block, cells in lines:
        print((f"{block:>5}  " + "  ".join(f"{value:>{width}}" + (diff.ljust(diff_width) if i else "")
                                            for i, (value, diff) in enumerate(cells))).rstrip())


def beside(checkpoint, filename):
    """filename in the checkpoint's folder, named after any checkpoint but ckpt.pt, so that a kept ckpt_epoch010.pt
    (-> probe_epoch010.json) or a weights file does not share a report with the run's ckpt.pt."""
    folder, name = os.path.split(os.path.abspath(checkpoint))
    stem = os.path.splitext(name)[0]
    if stem != "ckpt":
        base, ext = os.path.splitext(filename)
        filename = f"{base}_{stem.removeprefix('ckpt_')}{ext}"
    return os.path.join(folder, filename)


def try_writing_in(folder):
    """Create folder and write (then remove) a file in it; raises OSError where that cannot be done."""
    os.makedirs(folder, exist_ok=True)
    open(probe := os.path.join(folder, f".write-test{os.getpid()}"), "w").close()
    os.remove(probe)


def nearest_folder(path):
    """The folder path, or else the nearest one above it that is there: a check made there changes nothing on the
    disk. Raises OSError where a file stands in the way of the folders still to make."""
    existing, below = os.path.abspath(path), None
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing, below = os.path.dirname(existing), existing
    if below is not None and os.path.lexists(below):
        raise NotADirectoryError(errno.ENOTDIR, f"{below} is a file, not a folder")
    return existing


def writable(path):
    """path, after checking that a report can be written there: called before the work, not after it, and
    without making its folder (a bad input found next leaves the disk as it was; save_json makes it)."""
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "it is a folder")
        try_writing_in(nearest_folder(os.path.dirname(os.path.abspath(path))))
    except OSError as e:
        fail(f"cannot write {path} ({e.strerror or e}); pass --out with a file in a folder you can write")
    return path


def note_if_replacing(path, checkpoints):
    """Say so, before the work, when path holds the report of other checkpoints (--compare of another set writes the
    same file name): it is about to be replaced."""
    try:
        with open(path) as f:
            before = [c["checkpoint"] for c in json.load(f)["checkpoints"]]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if [os.path.realpath(str(c)) for c in before] != [os.path.realpath(str(c)) for c in checkpoints]:
        print(f"note: {path} holds the report of {', '.join(map(str, before))}; this run replaces it (--out writes "
              "elsewhere)")


def save_json(path, report):
    try:
        save_bytes(json.dumps(report, indent=1).encode(), path)
    except OSError as e:
        fail(str(e) if e.strerror is None else f"could not write {path} ({e.strerror})")
    print(f"results -> {path}")
    return path


def save_figure(fig, path, dpi=120):
    """Save a matplotlib figure as a 256-colour PNG, close it, say where it went. A plot looks the same at a third
    of the bytes, which keeps the committed results small enough to travel to a GPU beside carried checkpoints."""
    from PIL import Image  # torchvision's own dependency
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    png = io.BytesIO()
    Image.open(buffer).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE) \
        .save(png, format="png", optimize=True)
    save_bytes(png.getvalue(), path)  # through a temp file, as every output: a stop mid-write leaves no broken PNG
    pyplot().close(fig)
    print(f"plot -> {path}")


def pyplot():
    """matplotlib.pyplot, or None after a one-line note: plots are optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)")
        return None
