"""How the features grow with training: one longer run per arm, probed and ranked at the checkpoints it keeps.

    python results/curve.py --arms none linear-0.6 --epochs 24 --every 4 --out results/curve

Each arm is `pretrain.py --keep-every EVERY`; every kept checkpoint then gets probe.py (probe_eNNN.json) and all of
them one rank.py table. The summary (curve.json) and the figure (curve.png: last-block linear probe, best-block
linear probe and last-block effective rank against epochs, with the raw-pixel floor of baselines.json) go to <out>.
--train-seconds caps each pretraining: the checkpoints kept by then are still probed, and the next call resumes
the run from its last checkpoint (resume is exact, so a run split over calls is one run). An arm whose last
checkpoint (ckpt_epoch<EPOCHS>.pt) exists is not retrained, only probed.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from study import ARMS, machine, probe_summary, sh  # noqa: E402


def train(name, args, extra):
    out = os.path.join(args.out, "runs", name)
    if os.path.exists(os.path.join(out, f"ckpt_epoch{args.epochs:03d}.pt")):  # finished before: probe only
        return sorted(glob.glob(os.path.join(out, "ckpt_epoch*.pt")))
    flags = ARMS[name] + (["--blr", args.arm_blr[name]] if name in args.arm_blr else []) + ["--seed", args.seed, "--epochs", args.epochs, "--keep-every", args.every, "--out-dir", out,
                          "--log-every", 100, *extra["pretrain"]]
    if os.path.exists(os.path.join(out, "ckpt.pt")):  # cut short before (--train-seconds): go on where it stopped
        flags.append("--resume")
    try:
        sh("pretrain.py", *flags, timeout=args.train_seconds)
    except subprocess.TimeoutExpired:
        print(f"{name}: pretraining stopped at --train-seconds {args.train_seconds}; probing what it kept", flush=True)
    except subprocess.CalledProcessError as error:
        print(f"failed: {name} (exit {error.returncode})", flush=True)
    return sorted(glob.glob(os.path.join(out, "ckpt_epoch*.pt")))


def epoch_of(path):
    return int(os.path.basename(path)[len("ckpt_epoch"):-len(".pt")])


def probe(path, extra):
    out = path.replace("ckpt_epoch", "probe_e").replace(".pt", ".json")
    if not os.path.exists(out):
        sh("probe.py", path, "--out", out, *extra["probe"])
    return dict(epoch=epoch_of(path), **probe_summary(out))


def rank(paths, extra):
    out = os.path.join(os.path.dirname(paths[0]), "rank_curve.json")
    compare = ["--compare", *paths[1:]] if len(paths) > 1 else []
    sh("rank.py", paths[0], *compare, "--out", out, *extra["rank"])
    tables = json.load(open(out))["checkpoints"]
    return [table["layers"][-1] for table in tables]  # same order as paths


def figure(curves, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: figure skipped (pip install matplotlib)")
        return
    with open(os.path.join(HERE, "glyphs", "baselines.json")) as f:
        floor = json.load(f)["raw_pixels"]["linear_probe"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, points in curves.items():
        epochs = [p["epoch"] for p in points]
        for ax, key in zip(axes, ("lp_last", "lp_best", "erank_last")):
            ax.plot(epochs, [p[key] for p in points], marker="o", label=name)
    titles = ("linear probe, last block (%)", "linear probe, best block (%)", "effective rank, last block")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("pretraining epochs")
        if "probe" in title:
            ax.axhline(floor, color="k", ls=":", label=f"raw pixels {floor:.1f}%")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curve.png"), dpi=110)
    print("figure:", os.path.join(out, "curve.png"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=["none", "linear-0.6"], choices=list(ARMS))
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--every", type=int, default=4, help="keep, probe and rank a checkpoint every N epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arm-blr", nargs="+", default=[], metavar="ARM=BLR",
                   help="an arm's own blr, e.g. none=1.5e-3 linear-0.6=5e-4 (the study's choice; default: pretrain.py's)")
    p.add_argument("--train-seconds", type=float, help="stop each pretraining after this long; probe what was kept")
    p.add_argument("--out", default=os.path.join(HERE, "curve"))
    for stage in ("pretrain", "probe", "rank"):
        p.add_argument(f"--{stage}-args", default="", help=f"more flags for {stage}.py, in one quoted string")
    args = p.parse_args()
    if any("best" in name for name in args.arms):
        p.error("curve.py takes arms with a fixed alpha_min (e.g. linear-0.6), not the study's *-best arms")
    try:
        args.arm_blr = {arm: float(blr) for arm, blr in (pair.split("=") for pair in args.arm_blr)}
    except ValueError:
        p.error("--arm-blr takes ARM=BLR pairs, e.g. none=1.5e-3")
    extra = {stage: getattr(args, f"{stage}_args").split() for stage in ("pretrain", "probe", "rank")}
    start = time.time()
    with ThreadPoolExecutor(len(args.arms)) as pool:
        kept = dict(zip(args.arms, pool.map(lambda name: train(name, args, extra), args.arms)))
    curves = {}
    with ThreadPoolExecutor(4) as pool:
        for name, paths in kept.items():
            if not paths:
                continue
            points = list(pool.map(lambda path: probe(path, extra), paths))
            for point, ranks in zip(points, rank(paths, extra)):
                point["erank_last"] = ranks[point["pooling"]]
            curves[name] = points
            print(name, " ".join(f"e{q['epoch']}: LP {q['lp_last']:.1f} (best {q['lp_best']:.1f}) "
                                 f"rank {q['erank_last']:.1f}" for q in points), flush=True)
    json.dump({"curves": curves, "epochs": args.epochs, "every": args.every, "seed": args.seed,
               "minutes": round((time.time() - start) / 60, 1), "machine": machine(), "command": " ".join(sys.argv)},
              open(os.path.join(args.out, "curve.json"), "w"), indent=1)
    figure(curves, args.out)


if __name__ == "__main__":
    main()
