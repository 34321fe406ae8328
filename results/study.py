"""The glyphs study (issue 13): seven arms, each at its own learning rate, three seeds. Protocol (written before
any run) and results: results/README.md, "The study on glyphs".

    python results/study.py                    # all of it: about 4 hours on 2 CPU cores, two one-thread runs at a time
    python results/study.py --collect          # run nothing; summarise the runs that finished
    python results/study.py --arms none linear-0.6 --blrs 1.5e-3 --seeds 0 --epochs 1 --out /tmp/quick  # a quick look

1. Sweep: every arm at every --blrs value, first seed. An arm whose pick (step 2) sits at an end of the values it
   tried gets the next value beyond that end (5e-3 after 1.5e-3), up to --extend times: a pick at the edge says
   the range may have missed the arm's best rate (the amendment of stop 24).
2. Choice: each arm keeps the blr whose run has the highest *validation* linear-probe accuracy at its
   validation-picked block (probe.json: headline.best_linear_probe.val); ties go to the lower blr. The same rule
   across linear-0.8/0.7/0.6 names the best linear arm, whose alpha_min the *-best arms take; they are swept next.
3. Seeds: the other --seeds at each arm's chosen blr.
Each run is pretrain.py, probe.py and rank.py through their command lines, in <out>/runs/<arm>-blr<blr>-s<seed>/
with their logs; a run whose rank.json exists is not rerun. The summary (study.json, study.md) and the figure
(study.png) go to <out>; a folder whose study.json summarises runs of another --epochs is refused.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from common import SEED, describe_machine, fail, positive, positive_int, pyplot, save_figure  # noqa: E402

ARMS = {  # name: pretrain.py flags; "best" stands for the best linear arm's alpha_min
    "none": ["--alpha-schedule", "none"],
    "linear-0.8": ["--alpha-schedule", "linear", "--alpha-min", "0.8"],
    "linear-0.7": ["--alpha-schedule", "linear", "--alpha-min", "0.7"],
    "linear-0.6": ["--alpha-schedule", "linear", "--alpha-min", "0.6"],
    "linear-best-decay-as-lr": ["--alpha-schedule", "linear", "--decay-as-lr"],
    "none-noskips": ["--alpha-schedule", "none", "--no-decoder-skips"],
    "linear-best-noskips": ["--alpha-schedule", "linear", "--no-decoder-skips"],
}
BLRS = [5e-5, 1.5e-4, 5e-4, 1.5e-3]
METRICS = ("lp_last", "lp_best", "knn_last", "knn_best", "erank_last", "loss")


def arm_flags(name):
    """pretrain.py's flags for an arm: a name in ARMS, linear at another alpha_min (linear-0.9), or a *-best arm
    with its alpha_min written in (linear-0.8-noskips, linear-0.7-decay-as-lr). ValueError for anything else."""
    if name in ARMS and "best" not in name:
        return ARMS[name]
    kind, _, rest = name.partition("-")
    alpha_min, _, suffix = rest.partition("-")
    template = ARMS.get(f"linear-best-{suffix}") if suffix else ["--alpha-schedule", "linear"]
    try:
        known = kind == "linear" and template is not None and 0 < float(alpha_min) <= 1
    except ValueError:  # alpha_min is not a number
        known = False
    if not known:
        raise ValueError(f"{name!r} is not an arm: one of {', '.join(a for a in ARMS if 'best' not in a)}, "
                         "linear-<alpha_min>, linear-<alpha_min>-noskips or linear-<alpha_min>-decay-as-lr")
    return template + ["--alpha-min", alpha_min]


def blr_tag(blr):
    return f"{blr:.1e}".replace(".0e", "e")  # 5e-05, 1.5e-04: the folder names


def machine():
    import torch
    if torch.cuda.is_available():
        return f"{describe_machine('cuda')} + {os.cpu_count()} CPU cores"
    return f"{os.cpu_count()} CPU cores: {describe_machine('cpu')}"


LIVE = set()  # the scripts sh() runs now, for pass_on_sigterm
STOPPING = []  # non-empty once Ctrl-C or SIGTERM came: sh() starts nothing more


class Terminated(Exception):
    """SIGTERM reached this script."""


def pass_on_sigterm(signum, frame):
    """Ctrl-C at a terminal reaches every run of the study; a SIGTERM may have reached this script alone (kill
    <pid>), which would leave its runs going unwatched. So it is passed on: pretrain.py saves the step under way,
    and a second SIGTERM, where the sender signalled every process too, changes nothing for it."""
    signal.signal(signal.SIGTERM, lambda *_: None)  # not SIG_IGN, which the runs started later would inherit
    STOPPING.append(signal.SIGTERM)
    for process in list(LIVE):
        process.send_signal(signal.SIGTERM)
    raise Terminated


def on_ctrl_c(signum, frame):
    STOPPING.append(signal.SIGINT)
    raise KeyboardInterrupt


def stop_in_one_line(main):
    """main(), stopped by Ctrl-C or SIGTERM with one line once the runs under way have stopped (exit 130 or 143)."""
    signal.signal(signal.SIGTERM, pass_on_sigterm)
    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        main()
    except (KeyboardInterrupt, Terminated) as stop:
        by, code = ("SIGTERM", 143) if isinstance(stop, Terminated) else ("Ctrl-C", 130)
        print(f"stopped by {by}; the runs under way were told to save their step (their logs say where they stopped), "
              "and the same command goes on from there", file=sys.stderr)
        sys.exit(code)


def ended(error):
    """How a run that exited non-zero ended: "stopped" by Ctrl-C or SIGTERM, else "failed"."""
    return "stopped" if error.returncode in (130, 143, -signal.SIGINT, -signal.SIGTERM) else "failed"


def sh(*args, timeout=None, log=None, grace=20):
    """Run a script of the repository; raises CalledProcessError on failure. Past timeout it gets a Ctrl-C (SIGINT:
    pretrain.py saves the step under way and stops, so a run cut short loses nothing), then, grace seconds later,
    a kill; and TimeoutExpired is raised."""
    if STOPPING:  # a thread of the pool that comes here after Ctrl-C or SIGTERM
        raise subprocess.CalledProcessError(130, args)
    start = time.time()
    with open(log or os.devnull, "w") as sink:
        process = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=sink,
                                   stderr=sink if log else None, env={"OMP_NUM_THREADS": "1", **os.environ})
        LIVE.add(process)
        if STOPPING:  # it came while this one started
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
            stop(process, grace)
            raise
        except BaseException:  # a Ctrl-C of this script, which the child got too: let it save
            stop(process, grace)
            raise
        finally:
            LIVE.discard(process)
            print(f"$ {' '.join(map(str, args))}   [{time.time() - start:.0f} s]", flush=True)
        if code:
            raise subprocess.CalledProcessError(code, args)


def stop(process, grace):
    """Wait up to grace seconds for a process told to stop, then kill it."""
    try:
        process.wait(grace)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        process.kill()
        process.wait()


def probe_summary(path):
    """Last-block and best-block accuracy of a probe.json, in its headline pooling, and the per-block lists."""
    probe = json.load(open(path))
    head, pool = probe["headline"], probe["headline"]["pooling"]
    lp, knn = [r["lp_" + pool] for r in probe["layers"]], [r["knn_" + pool] for r in probe["layers"]]
    if "best_linear_probe" not in head or "best_knn" not in head:  # never fall back to the best block on test
        sys.exit(f"{path} has no block picked on validation (probe.py --n-val 0?); the study picks blocks on validation")
    return dict(lp_last=lp[-1], lp_best=head["best_linear_probe"]["test"], knn_last=knn[-1], knn_best=head["best_knn"]["test"],
                lp_by_layer=lp, knn_by_layer=knn, pooling=pool, val=head["best_linear_probe"]["val"])


def read_run(out, tag=""):
    """A finished run's measures: probe{tag}.json, rank{tag}.json (tag "_e010" for a curve's epoch 10), and the
    last loss logged up to that epoch (the run's last without a tag)."""
    probe = probe_summary(os.path.join(out, f"probe{tag}.json"))
    pool = probe.pop("pooling")
    ranks = [layer[pool] for layer in json.load(open(os.path.join(out, f"rank{tag}.json")))["checkpoints"][0]["layers"]]
    until = int(tag[2:]) if tag else float("inf")  # the log's epoch field counts from 0
    with open(os.path.join(out, "log.jsonl")) as f:
        loss = [e["loss"] for e in map(json.loads, f) if e.get("epoch", 0) < until][-1]
    return dict(probe, erank_last=ranks[-1], erank_by_layer=ranks, loss=loss)


def resume_flag(folder):
    """["--resume"] for a run begun there before (cut short, or done: it then ends at once), else []."""
    return ["--resume"] if os.path.exists(os.path.join(folder, "ckpt.pt")) else []


def run(arm, flags, blr, seed, args):
    out = os.path.join(args.out, "runs", f"{arm}-blr{blr_tag(blr)}-s{seed}")
    if not os.path.exists(os.path.join(out, "rank.json")):
        if args.collect:
            return None
        os.makedirs(out, exist_ok=True)
        ckpt = os.path.join(out, "ckpt.pt")
        try:
            sh("pretrain.py", *flags, "--blr", blr, "--seed", seed, "--epochs", args.epochs, "--out-dir", out,
               "--log-every", 100, *args.pretrain_args.split(), *resume_flag(out), log=os.path.join(out, "pretrain.log"))
            sh("probe.py", ckpt, *args.probe_args.split(), log=os.path.join(out, "probe.log"))
            sh("rank.py", ckpt, *args.rank_args.split(), log=os.path.join(out, "rank.log"))
        except subprocess.CalledProcessError as error:  # one failed run leaves the others standing
            print(f"{ended(error)}: {out} (exit {error.returncode}); see its logs", flush=True)
            return None
    return dict(arm=arm, blr=blr, seed=seed, **read_run(out))


def chosen_run(rows, arm, seed):
    """The protocol's rule: the sweep run with the highest validation LP at the validation-picked block; ties go
    to the lower blr. None while the arm has no finished sweep run."""
    swept = [r for r in rows if r["arm"] == arm and r["seed"] == seed and r["val"] is not None]
    return max(swept, key=lambda r: (r["val"], -r["blr"])) if swept else None


def beyond(blr, up):
    """The next value past blr on the sweep's grid of 1.5 and 5 times powers of ten: 5e-3 above 1.5e-3, 1.5e-2 above
    5e-3, 1.5e-5 below 5e-5."""
    factor = 3 if f"{blr:.1e}".startswith("5") == up else 10 / 3
    return float(f"{blr * factor if up else blr / factor:.2g}")


def chosen_blr(rows, arm, seed):
    run = chosen_run(rows, arm, seed)
    return run and run["blr"]


def best_linear(rows, seed):
    scores = {arm: run["val"] for arm in ("linear-0.8", "linear-0.7", "linear-0.6") if (run := chosen_run(rows, arm, seed))}
    return max(scores, key=scores.get).split("-")[1] if scores else None  # ties: the milder decay, listed first


def seed_stats(runs):
    """{metric: [mean, population std]} over runs (one per seed)."""
    return {k: [statistics.mean(r[k] for r in runs), statistics.pstdev(r[k] for r in runs)] for k in METRICS}


def stats_cells(row):
    """A table row's metric cells, mean ± std (the loss to 3 decimals, the rest to 1)."""
    return [f"{row[k][0]:.{3 if k == 'loss' else 1}f} ± {row[k][1]:.{3 if k == 'loss' else 1}f}" for k in METRICS]


def summarise(rows, arms, seed):
    table = {}
    for arm in arms:
        blr = chosen_blr(rows, arm, seed)
        mine = [r for r in rows if r["arm"] == arm and r["blr"] == blr]
        if not mine:
            continue
        table[arm] = seed_stats(mine)
        table[arm].update(seeds=len(mine), blr=blr, sweep={blr_tag(r["blr"]): r["val"] for r in rows
                                                           if r["arm"] == arm and r["seed"] == seed})
    return table


def spread_band(std_a, std_b):
    """The protocol's reading: a gap is a difference only beyond twice the larger of the two seed spreads."""
    return 2 * max(std_a, std_b)


def gap(table, a, b, key):
    """(a minus b in key, whether that is a difference, by spread_band); None with fewer than two seeds on either
    side."""
    (mean_a, std_a), (mean_b, std_b) = table[a][key], table[b][key]
    if min(table[a]["seeds"], table[b]["seeds"]) < 2:
        return mean_a - mean_b, None
    return mean_a - mean_b, abs(mean_a - mean_b) > spread_band(std_a, std_b)


def verdict(table, a, b, key):
    difference, called = gap(table, a, b, key)
    reading = {None: "one seed: no spread yet", True: "a difference", False: "within seed spread"}[called]
    return f"{difference:+.1f} ({reading})"


def markdown(table, pairs):
    blrs = sorted({tag for row in table.values() for tag in row["sweep"]}, key=float)
    lines = ["Sweep (seed 0): validation LP at the validation-picked block; the chosen blr in bold.", "",
             "| arm | " + " | ".join(f"blr {t}" for t in blrs) + " |", "|---" * (len(blrs) + 1) + "|"]
    for arm, row in table.items():
        cells = [row["sweep"].get(t) for t in blrs]
        lines.append(f"| {arm} | " + " | ".join("" if v is None else f"**{v:.1f}**" if t == blr_tag(row["blr"]) else f"{v:.1f}"
                                                 for t, v in zip(blrs, cells)) + " |")
    lines += ["", "Seeds at the chosen blr: mean ± population std over seeds; test split; best = block picked on validation.", "",
              "| arm | blr | seeds | LP last | LP best | k-NN last | k-NN best | eff. rank last | final loss |", "|---" * 9 + "|"]
    for arm, row in table.items():
        lines.append(f"| {arm} | {blr_tag(row['blr'])} | {row['seeds']} | " + " | ".join(stats_cells(row)) + " |")
    lines += ["", "Differences (first minus second):", ""]
    for a, b in pairs:
        if a in table and b in table:
            lines.append(f"- {a} vs {b}: LP best {verdict(table, a, b, 'lp_best')}, LP last {verdict(table, a, b, 'lp_last')}, "
                         f"k-NN best {verdict(table, a, b, 'knn_best')}, eff. rank {verdict(table, a, b, 'erank_last')}")
    return "\n".join(lines)


def figure(rows, table, out):
    if (plt := pyplot()) is None:
        return
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for arm, row in table.items():
        mine = [r for r in rows if r["arm"] == arm and r["blr"] == row["blr"]]
        style = dict(ls="--" if "noskips" in arm else ":" if "decay-as-lr" in arm else "-", marker=".",
                     label=f"{arm} (blr {blr_tag(row['blr'])}, {len(mine)} seed{'s' * (len(mine) > 1)})")
        for ax, key in zip(axes, ("lp_by_layer", "knn_by_layer", "erank_by_layer")):
            mean = [statistics.mean(v) for v in zip(*(r[key] for r in mine))]
            ax.plot(range(1, len(mean) + 1), mean, **style)
        swept = sorted((float(t), v) for t, v in row["sweep"].items() if v is not None)
        axes[3].plot(*zip(*swept), **style)
    titles = ("linear probe, test (%)", "k-NN, test (%)", "effective rank")
    for ax, title in zip(axes, titles):
        ax.set(title=title + ", seed mean", xlabel="encoder block")
    axes[3].set(title="sweep: validation LP at the picked block (%)", xlabel="blr", xscale="log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "study.png"), dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--blrs", type=positive, nargs="+", default=BLRS, help="the sweep (default: %(default)s)")
    p.add_argument("--extend", type=int, choices=range(0, 4), default=2, metavar="N",
                   help="values swept beyond an end of --blrs where an arm's pick sits there, at most (default: %(default)s)")
    p.add_argument("--seeds", type=SEED, nargs="+", default=[0, 1, 2], help="the first one is the sweep's")
    p.add_argument("--epochs", type=positive_int, default=2, help="pretraining epochs per run (default: pretrain.py's CPU default)")
    p.add_argument("--jobs", type=positive_int, default=os.cpu_count(),
                   help="runs at once, one thread each unless OMP_NUM_THREADS says otherwise (2 one-thread runs "
                        "beat one two-thread run on 2 cores)")
    p.add_argument("--out", default=os.path.join(HERE, "study_glyphs"), help="folder for runs/ and the summary")
    p.add_argument("--collect", action="store_true", help="run nothing: summarise the runs that finished")
    for stage in ("pretrain", "probe", "rank"):
        p.add_argument(f"--{stage}-args", default="", help=f"more flags for {stage}.py, in one quoted string")
    args = p.parse_args()
    summary_path = os.path.join(args.out, "study.json")
    if os.path.exists(summary_path) and (before := json.load(open(summary_path))["epochs"]) != args.epochs:
        fail(f"{args.out} holds a study of {before}-epoch runs: --epochs {args.epochs} would mix with them and "
                "overwrite its summary; choose another --out")
    os.makedirs(args.out, exist_ok=True)
    start, rows, first = time.time(), [], args.seeds[0]

    def go(jobs):
        with ThreadPoolExecutor(args.jobs) as pool:
            rows.extend(row for row in pool.map(lambda job: run(*job, args), jobs) if row)

    def sweep(arms):
        go([(arm, flags, blr, first) for arm, flags in arms.items() for blr in args.blrs])
        tried = {arm: set(args.blrs) for arm in arms}
        for _ in range(args.extend if len(args.blrs) > 1 else 0):
            edge = {arm: beyond(blr, up=blr == max(tried[arm])) for arm in arms
                    if (blr := chosen_blr(rows, arm, first)) in (min(tried[arm]), max(tried[arm]))}
            go([(arm, arms[arm], blr, first) for arm, blr in edge.items()])
            for arm, blr in edge.items():
                tried[arm].add(blr)

    flags = {arm: ARMS[arm] for arm in args.arms if "best" not in arm}
    sweep(flags)
    alpha_min = best_linear(rows, first)
    later = {name: arm_flags(name) for name in (arm.replace("best", alpha_min) for arm in args.arms
                                                if "best" in arm and alpha_min)}
    sweep(later)
    flags.update(later)
    chosen = {arm: blr for arm in flags if (blr := chosen_blr(rows, arm, first))}
    go([(arm, flags[arm], blr, seed) for seed in args.seeds[1:] for arm, blr in chosen.items()])
    table = summarise(rows, flags, first)
    best = f"linear-{alpha_min}"
    pairs = [(arm, "none") for arm in table if arm != "none"] + [
        (f"{best}-decay-as-lr", best), (f"{best}-noskips", "none-noskips"), (f"{best}-noskips", best)]
    text = markdown(table, pairs)
    print(text)
    ran = {"minutes": None if args.collect else round((time.time() - start) / 60, 1), "machine": machine(),
           "command": " ".join(sys.argv)}
    if args.collect:  # the runs' own machine and command stand where a summary recorded them
        before = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
        ran = {k: before.get(k, value) for k, value in ran.items()}
    json.dump({"table": table, "best_linear_alpha_min": alpha_min, "rows": rows, "epochs": args.epochs,
               "seeds": args.seeds, **ran}, open(summary_path, "w"), indent=1)
    open(os.path.join(args.out, "study.md"), "w").write(text + "\n")
    figure(rows, table, args.out)


if __name__ == "__main__":
    stop_in_one_line(main)
