"""How the features grow with training: one longer run per arm, probed and ranked at the checkpoints it keeps.

    python results/curve.py --arms none linear-0.8 --arm-blr none=1.5e-3 linear-0.8=1.5e-3 --epochs 200 --every 25

Each arm is `pretrain.py --keep-every EVERY`; every kept checkpoint then gets probe.py (probe_eNNN.json) and rank.py
(rank_eNNN.json). The summary (curve.json) and the figure (curve.png: linear probe at the last and the best block,
k-NN and effective rank at the last block, against epochs, with the raw-pixel floor of baselines.json; blocks.png:
each arm's k-NN at every block, one line per checkpoint) go to <out>.
--train-seconds caps each pretraining (then a Ctrl-C: pretrain.py saves the step under way): the checkpoints kept by
then are still measured, and the next call resumes the run from its ckpt.pt (exact on CPU; on a GPU, up to the noise
of its non-deterministic kernels). The curve is read from the JSON files, so a kept checkpoint can be deleted once
measured; only ckpt.pt is needed to go on.
A folder whose curve.json records another --epochs, --every, --seed or --arm-blr is refused (its runs would be
taken as this request's); --collect takes those four from curve.json. curve.json lists each call that trained or
measured (`calls`: minutes, machine, command; a call killed before it writes curve.json is missing); its `minutes`
is their sum. A --collect adds no call, except to a folder that has no curve.json (then one marked "collect").
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
from study import arm_flags, ended, machine, probe_summary, resume_flag, sh, stop_in_one_line  # noqa: E402

from common import fail, pyplot, save_figure  # noqa: E402  (study put the repository root on the path)

RECORDED = ("epochs", "every", "seed", "arm_blr")  # what a curve.json records of the request that made it


def arm_name(name):
    try:
        arm_flags(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


def train(name, args, extra):
    """Pretrain (or go on with) one arm, in <out>/runs/<name>."""
    out = os.path.join(args.out, "runs", name)
    if os.path.exists(os.path.join(out, f"probe_e{args.epochs:03d}.json")):  # finished and measured before
        return
    if not os.path.exists(os.path.join(out, "ckpt.pt")) and glob.glob(os.path.join(out, "probe_e*.json")):
        print(f"{name}: {out} holds a begun run, measured, but no ckpt.pt: not restarting it from epoch 0 under its "
              "points (bring its ckpt.pt back, or choose another --out)", flush=True)
        return
    flags = arm_flags(name) + (["--blr", args.arm_blr[name]] if name in args.arm_blr else []) + ["--seed", args.seed, "--epochs", args.epochs, "--keep-every", args.every, "--out-dir", out,
                          "--log-every", 100, *extra["pretrain"], *resume_flag(out)]  # cut short before: go on
    try:
        sh("pretrain.py", *flags, timeout=args.train_seconds)
    except subprocess.TimeoutExpired:
        print(f"{name}: pretraining stopped at --train-seconds {args.train_seconds} (its ckpt.pt saved at the step under "
              "way); measuring what it kept", flush=True)
    except subprocess.CalledProcessError as error:
        print(f"{ended(error)}: {name} (exit {error.returncode})", flush=True)


def measure(path, extra):
    """probe.py and rank.py on one kept checkpoint, each skipped if its JSON exists (a rank JSON of before stop 34,
    measured in bf16 on CUDA, is redone in fp32)."""
    probe_out, rank_out = (path.replace("ckpt_epoch", f"{kind}_e").replace(".pt", ".json") for kind in ("probe", "rank"))
    try:
        if not os.path.exists(probe_out):
            sh("probe.py", path, "--out", probe_out, *extra["probe"])
        if not os.path.exists(rank_out) or "precision" not in json.load(open(rank_out)):
            sh("rank.py", path, "--out", rank_out, *extra["rank"])
    except subprocess.CalledProcessError as error:
        print(f"{ended(error)}: measuring {path} (exit {error.returncode})", flush=True)


def train_and_measure(args, extra):
    """The arms train side by side; each checkpoint they keep is measured as soon as it appears."""
    with ThreadPoolExecutor(len(args.arms)) as trainers, ThreadPoolExecutor(4) as measurers:
        training = [trainers.submit(train, name, args, extra) for name in args.arms]
        seen, jobs = set(), []
        try:
            while True:
                done = all(job.done() for job in training)  # read before the glob, so the last kept file is seen
                for name in args.arms:
                    for path in sorted(glob.glob(os.path.join(args.out, "runs", name, "ckpt_epoch*.pt"))):
                        if path not in seen:
                            seen.add(path)
                            jobs.append(measurers.submit(measure, path, extra))
                if done:
                    break
                time.sleep(5)
            for job in training + jobs:
                job.result()
        except BaseException:  # Ctrl-C or SIGTERM: what has not started never will
            for job in jobs:
                job.cancel()
            raise


def points(out):
    """The arm's curve, from every probe_eNNN.json with its rank_eNNN.json, in epoch order."""
    found = []
    for probe_path in sorted(glob.glob(os.path.join(out, "probe_e*.json"))):
        rank_path = probe_path.replace("probe_e", "rank_e")
        if not os.path.exists(rank_path):
            continue
        point = dict(epoch=int(os.path.basename(probe_path)[len("probe_e"):-len(".json")]), **probe_summary(probe_path))
        point["erank_last"] = json.load(open(rank_path))["checkpoints"][0]["layers"][-1][point["pooling"]]
        found.append(point)
    return found


def figure(curves, out, heading):
    if (plt := pyplot()) is None:
        return
    with open(os.path.join(HERE, "glyphs", "baselines.json")) as f:
        floor = json.load(f)["raw_pixels"]["linear_probe"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for name, points in curves.items():
        epochs = [p["epoch"] for p in points]
        for ax, key in zip(axes, ("lp_last", "lp_best", "knn_last", "erank_last")):
            ax.plot(epochs, [p[key] for p in points], marker="o", label=name)
    titles = ("linear probe, last block (%)", "linear probe, best block (%)", "k-NN, last block (%)",
              "effective rank, last block (the paper: lower = more abstract)")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("pretraining epochs")
        if "linear probe" in title:
            ax.axhline(floor, color="k", ls=":", label=f"raw pixels {floor:.1f}%")
        ax.legend()
    fig.suptitle(heading)
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "curve.png"), dpi=110)
    by_block_figure(plt, curves, out, heading)


def by_block_figure(plt, curves, out, heading):
    """blocks.png: each arm's k-NN at every encoder block, one line per checkpoint, darker = later."""
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), sharey=True, squeeze=False)
    for ax, (name, points) in zip(axes[0], curves.items()):
        for i, p in enumerate(points):
            shade = plt.cm.viridis_r(0.15 + 0.85 * (i + 1) / len(points))
            ax.plot(range(1, len(p["knn_by_layer"]) + 1), p["knn_by_layer"], color=shade, marker=".", label=f"epoch {p['epoch']}")
        ax.set_title(f"{name}: k-NN by block (%)")
        ax.set_xlabel("encoder block")
        if points:
            ax.legend(fontsize=7)
    fig.suptitle(heading)
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "blocks.png"), dpi=110)


def calls_so_far(summary):
    """The calls of curve.py that made a curve: a run resumed across GPU loans is one curve over several calls.
    A curve.json from before "calls" was recorded counts as its one call."""
    if "calls" in summary:
        return summary["calls"]
    return [{key: summary.get(key) for key in ("minutes", "machine", "command")}] if "command" in summary else []


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=["none", "linear-0.8"], type=arm_name,
                   help="the study's arms with a fixed alpha_min: none, linear-0.6, none-noskips, linear-0.8-noskips, ...")
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--every", type=int, default=4, help="keep, probe and rank a checkpoint every N epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arm-blr", nargs="+", default=[], metavar="ARM=BLR",
                   help="an arm's own blr, e.g. none=1.5e-3 linear-0.6=5e-4 (the study's choice; default: pretrain.py's)")
    p.add_argument("--train-seconds", type=float, help="stop each pretraining after this long; probe what was kept")
    p.add_argument("--out", default=os.path.join(HERE, "curve"))
    p.add_argument("--collect", action="store_true", help="only read the JSONs already in --out: curve.json and the figure")
    for stage in ("pretrain", "probe", "rank"):
        p.add_argument(f"--{stage}-args", default="", help=f"more flags for {stage}.py, in one quoted string (one flag alone: --{stage}-args=--flag)")
    args = p.parse_args()
    if args.epochs % args.every:  # pretrain.py keeps whole multiples of --keep-every: the last epoch would go unmeasured
        fail(f"--every {args.every} must divide --epochs {args.epochs}, so that the last epoch is kept and measured")
    try:
        args.arm_blr = {arm: float(blr) for arm, blr in (pair.split("=") for pair in args.arm_blr)}
    except ValueError:
        p.error("--arm-blr takes ARM=BLR pairs, e.g. none=1.5e-3")
    if stray := set(args.arm_blr) - set(args.arms):  # a typo would leave its arm at pretrain.py's default blr
        p.error(f"--arm-blr names {', '.join(sorted(stray))}, not among --arms {' '.join(args.arms)}")
    extra = {stage: getattr(args, f"{stage}_args").split() for stage in ("pretrain", "probe", "rank")}
    summary_path = os.path.join(args.out, "curve.json")
    before = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    if args.collect:
        vars(args).update({key: before[key] for key in RECORDED if key in before})
    elif clash := [f"--{key.replace('_', '-')} {before[key]}" for key in RECORDED
                   if key in before and before[key] != getattr(args, key)]:
        fail(f"{args.out} holds a curve made with {', '.join(clash)}; this request differs: choose another --out")
    start = time.time()
    folders = {name: os.path.join(args.out, "runs", name) for name in args.arms}
    if not args.collect:
        train_and_measure(args, extra)
    curves = {name: points(out) for name, out in folders.items()}
    for name, found in curves.items():
        print(name, " ".join(f"e{q['epoch']}: LP {q['lp_last']:.1f} (best {q['lp_best']:.1f}) "
                             f"rank {q['erank_last']:.1f}" for q in found), flush=True)
    calls = calls_so_far(before)
    if not args.collect or not calls:  # a collect is no call, unless nothing else says what made the runs
        calls.append({"minutes": round((time.time() - start) / 60, 1), "machine": machine(), "command": " ".join(sys.argv),
                      **({"collect": True} if args.collect else {})})
    recorded = [key for key in RECORDED if key in before or not args.collect]  # a collect never invents a setting
    summary = {"curves": curves, **{key: getattr(args, key) for key in recorded},
               "minutes": round(sum(call["minutes"] or 0 for call in calls), 1),
               "machine": "; ".join(dict.fromkeys(str(call["machine"]) for call in calls)),
               "command": calls[-1]["command"], "calls": calls}
    json.dump(summary, open(summary_path, "w"), indent=1)
    figure(curves, args.out, f"{args.epochs}-epoch runs, seed {args.seed}, "
           f"{max((p['epoch'] for c in curves.values() for p in c), default=0)} done, on {summary['machine']}")


if __name__ == "__main__":
    stop_in_one_line(main)
