"""The paper's comparison, small: shortcut schedules on the embedded data, same compute per arm, several seeds.

    python results/study.py                       # the whole study (see README for its time and machine)
    python results/study.py --seeds 0 --epochs 1 --arms none linear-0.6      # a quick look

Each arm is pretrain.py, then probe.py and rank.py on its checkpoint, all through their command lines. Runs go to
<out>/runs/<arm>-s<seed>/ (checkpoints are not committed); the summary (study.json, study.md) and the figures go
to <out> (default: results/). An arm whose outputs exist is not rerun. Runs go seed by seed, so a study cut short
still holds whole seeds.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

ARMS = {  # name: pretrain.py flags
    "none": ["--alpha-schedule", "none"],
    "linear-0.8": ["--alpha-schedule", "linear", "--alpha-min", "0.8"],
    "linear-0.7": ["--alpha-schedule", "linear", "--alpha-min", "0.7"],
    "linear-0.6": ["--alpha-schedule", "linear", "--alpha-min", "0.6"],
    "cosine-best": ["--alpha-schedule", "cosine"],  # alpha_min: the best linear arm's
    "exp-best": ["--alpha-schedule", "exp"],
    "none-noskips": ["--alpha-schedule", "none", "--no-decoder-skips"],
    "linear-best-noskips": ["--alpha-schedule", "linear", "--no-decoder-skips"],
}


def machine():
    import torch
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} + {os.cpu_count()} CPU cores"
    return f"{os.cpu_count()} CPU cores"


def sh(*args, timeout=None):
    start = time.time()
    with open(os.devnull, "w") as quiet:  # each run keeps its own log.jsonl, probe.json and rank.json
        try:
            subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, check=True, stdout=quiet, timeout=timeout,
                           env={"OMP_NUM_THREADS": "1", **os.environ})
        finally:
            print(f"$ {' '.join(map(str, args))}   [{time.time() - start:.0f} s]", flush=True)


def run_arm(name, flags, seed, epochs, out, extra):
    ckpt = os.path.join(out, "ckpt.pt")
    if not os.path.exists(os.path.join(out, "rank.json")):
        if extra["collect"]:
            return None
        try:
            sh("pretrain.py", *flags, "--seed", seed, "--epochs", epochs, "--out-dir", out, "--log-every", 100,
               *extra["pretrain"])
            sh("probe.py", ckpt, *extra["probe"])
            sh("rank.py", ckpt, *extra["rank"])
        except subprocess.CalledProcessError as error:  # one failed run leaves the others standing
            print(f"failed: {name} seed {seed} (exit {error.returncode}); left out of the table", flush=True)
            return None
    probe = probe_summary(os.path.join(out, "probe.json"))
    ranks = json.load(open(os.path.join(out, "rank.json")))["checkpoints"][0]["layers"]
    pool = probe.pop("pooling")
    return dict(arm=name, seed=seed, **probe, erank_last=ranks[-1][pool], erank_by_layer=[r[pool] for r in ranks])


def probe_summary(path):
    """Last-block and best-block accuracy of a probe.json, in its headline pooling, and the per-block lists."""
    probe = json.load(open(path))
    head, pool = probe["headline"], probe["headline"]["pooling"]
    lp, knn = [r["lp_" + pool] for r in probe["layers"]], [r["knn_" + pool] for r in probe["layers"]]
    best = lambda key, values: head[key]["test"] if key in head else max(values)  # on validation, where probe.py had it
    return dict(lp_last=lp[-1], lp_best=best("best_linear_probe", lp), knn_last=knn[-1], knn_best=best("best_knn", knn),
                lp_by_layer=lp, knn_by_layer=knn, pooling=pool)


def best_linear_alpha_min(rows):
    linear = [r for r in rows if r["arm"].startswith("linear-0")]
    means = {a: statistics.mean(r["lp_last"] for r in linear if r["arm"] == a) for a in {r["arm"] for r in linear}}
    return max(means, key=means.get).split("-")[1] if means else "0.6"


def summarise(rows):
    table = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        table[arm] = {k: (statistics.mean(r[k] for r in mine), statistics.pstdev(r[k] for r in mine))
                      for k in ("lp_last", "lp_best", "knn_last", "knn_best", "erank_last")}
        table[arm]["seeds"] = len(mine)
    return table


def markdown(table, alpha_min):
    lines = ["| arm | seeds | LP last | LP best | k-NN last | k-NN best | eff. rank last |", "|---|---|---|---|---|---|---|"]
    for arm, row in table.items():
        cells = [f"{row[k][0]:.1f} ± {row[k][1]:.1f}" for k in ("lp_last", "lp_best", "knn_last", "knn_best", "erank_last")]
        lines.append(f"| {arm.replace('best', alpha_min)} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figures(rows, alpha_min, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: figures skipped (pip install matplotlib)")
        return
    from model import encoder_alphas
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for arm, colour in (("none", "tab:gray"), (f"linear-{alpha_min}", "tab:red")):
        mine = [r for r in rows if r["arm"] == arm]
        for key, ax, label in (("lp_by_layer", axes[0], "accuracy % (solid: linear probe, dashed: k-NN)"), ("knn_by_layer", axes[0], None),
                               ("erank_by_layer", axes[1], "effective rank")):
            if not mine:
                continue
            mean = [statistics.mean(v) for v in zip(*(r[key] for r in mine))]
            style = "--" if key == "knn_by_layer" else "-"
            ax.plot(range(1, len(mean) + 1), mean, style, color=colour,
                    label=f"{arm} {'k-NN' if key == 'knn_by_layer' else ''}".strip())
            ax.set_xlabel("encoder block")
            if label:
                ax.set_ylabel(label)
    for ax in axes[:2]:
        ax.legend()
    for schedule in ("linear", "cosine", "exp", "step", "none"):
        axes[2].plot(encoder_alphas(12, schedule, float(alpha_min)), marker=".", label=schedule)
    axes[2].set_xlabel("encoder sub-layer k (attention, MLP, ...)")
    axes[2].set_ylabel("alpha_k")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "study.png"), dpi=110)
    print("figure:", os.path.join(out, "study.png"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=2, help="pretraining epochs per run (default: pretrain.py's CPU default)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--jobs", type=int, default=os.cpu_count(),
                   help="runs at once, one thread each unless OMP_NUM_THREADS says otherwise (2 one-thread runs "
                        "beat one two-thread run on 2 cores)")
    p.add_argument("--out", default=HERE, help="folder for runs/, the summary and the figures (default: results/)")
    p.add_argument("--collect", action="store_true", help="run nothing: summarise the runs that finished")
    for stage in ("pretrain", "probe", "rank"):
        p.add_argument(f"--{stage}-args", default="", help=f"more flags for {stage}.py, in one quoted string")
    args = p.parse_args()
    extra = {stage: getattr(args, f"{stage}_args").split() for stage in ("pretrain", "probe", "rank")}
    extra["collect"] = args.collect
    os.makedirs(args.out, exist_ok=True)
    start, rows = time.time(), []
    for phase in ("first", "second"):  # cosine / exp take the best linear alpha_min, known after the first phase
        alpha_min, jobs = best_linear_alpha_min(rows), []
        for name in args.arms:
            if ("best" in name) != (phase == "second"):
                continue
            flags = ARMS[name] + (["--alpha-min", alpha_min] if "best" in name else [])
            jobs += [(name, flags, seed, args.epochs, os.path.join(args.out, "runs", f"{name}-s{seed}"), extra)
                     for seed in args.seeds]
        jobs.sort(key=lambda job: args.seeds.index(job[2]))  # seed by seed
        with ThreadPoolExecutor(args.jobs) as pool:
            rows += [row for row in pool.map(lambda job: run_arm(*job), jobs) if row]
    alpha_min = best_linear_alpha_min(rows)
    table = summarise(rows)
    text = markdown(table, alpha_min)
    print(text)
    minutes = (time.time() - start) / 60
    json.dump({"rows": rows, "table": table, "best_alpha_min": alpha_min, "epochs": args.epochs, "seeds": args.seeds,
               "minutes": None if args.collect else round(minutes, 1), "machine": machine(), "command": " ".join(sys.argv)},
              open(os.path.join(args.out, "study.json"), "w"), indent=1)
    open(os.path.join(args.out, "study.md"), "w").write(text + ("" if args.collect else f"\n\n{minutes:.0f} minutes, {machine()}\n"))
    figures(rows, alpha_min, args.out)
    first = os.path.join(args.out, "runs", f"linear-{alpha_min}-s{args.seeds[0]}")
    grids = sorted(f for f in os.listdir(first) if f.startswith("recon")) if os.path.isdir(first) else []
    if grids:
        shutil.copy(os.path.join(first, grids[-1]), os.path.join(args.out, "recon_linear.png"))


if __name__ == "__main__":
    main()
