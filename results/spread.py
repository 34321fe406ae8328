"""Seed spread of a CPU curve at its last epoch: each arm's mean and population std over seeds, gaps read by the
study's rule (a difference only beyond twice the larger std).

    python results/spread.py   # the 10-epoch curve without skips, seeds 0, 1, 2 (results/README, stop 25)

Each --dirs entry is one seed's curve.py --out; its runs/<arm>/ hold probe_eNNN.json, rank_eNNN.json and
log.jsonl. Writes spread.json and spread.md to --out (default: the first of --dirs).
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from study import METRICS, read_run, seed_stats, stats_cells, verdict  # noqa: E402  (it puts the repo on the path)
from common import fail, save_bytes, save_json  # noqa: E402

CURVE = os.path.join(HERE, "curve_glyphs_cpu_noskips")


def spread(dirs, arms, epoch):
    """{arm: {metric: [mean, pstd], seeds: n, runs: [...]}} over the dirs whose run of the arm reached epoch."""
    table = {}
    for arm in arms:
        runs = [os.path.join(d, "runs", arm) for d in dirs]
        found = [read_run(r, f"_e{epoch:03d}") for r in runs if os.path.exists(os.path.join(r, f"rank_e{epoch:03d}.json"))]
        if found:
            table[arm] = seed_stats(found)
            table[arm].update(seeds=len(found), runs={k: [f[k] for f in found] for k in METRICS})
    return table


def check_dirs(dirs):
    """Refuse --dirs that are not one curve at other seeds, where their curve.json says (older ones lack arm_blr)."""
    made = [json.load(open(path)) for d in dirs if os.path.exists(path := os.path.join(d, "curve.json"))]
    seeds = [m.get("seed") for m in made]
    if len(set(seeds)) < len(seeds):
        fail(f"--dirs: two curves of the same seed (seeds {seeds}); the spread is over seeds")
    for key in ("epochs", "arm_blr"):
        if len({json.dumps(m[key]) for m in made if m.get(key) is not None}) > 1:
            fail(f"--dirs: curves made with different --{key.replace('_', '-')}: " + ", ".join(str(m.get(key)) for m in made))


def markdown(table, epoch):
    lines = [f"Epoch {epoch}: mean ± population std over seeds; test split; best = block picked on validation; "
             "final loss = the last logged one.", "",
             "| arm | seeds | LP last | LP best | k-NN last | k-NN best | eff. rank last | final loss |", "|---" * 8 + "|"]
    for arm, row in table.items():
        lines.append(f"| {arm} | {row['seeds']} | " + " | ".join(stats_cells(row)) + " |")
    if len(table) == 2:
        a, b = table
        lines += ["", f"{a} minus {b}: " + ", ".join(f"{k} {verdict(table, a, b, k)}" for k in METRICS if k != "loss")]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dirs", nargs="+", default=[CURVE, os.path.join(CURVE, "seed1"), os.path.join(CURVE, "seed2")])
    p.add_argument("--arms", nargs="+", default=["none-noskips", "linear-0.8-noskips"])
    p.add_argument("--epoch", type=int, default=10)
    p.add_argument("--out", help="folder for spread.json and spread.md (default: the first of --dirs)")
    args = p.parse_args()
    args.out = args.out or args.dirs[0]
    check_dirs(args.dirs)
    table = spread(args.dirs, args.arms, args.epoch)
    if not table:
        print(f"spread.py: no run of {', '.join(args.arms)} measured at epoch {args.epoch} under {', '.join(args.dirs)}",
              file=sys.stderr)
        sys.exit(2)
    text = markdown(table, args.epoch)
    save_json(os.path.join(args.out, "spread.json"),
              {"epoch": args.epoch, "dirs": [os.path.relpath(d, args.out) for d in args.dirs], "table": table})
    save_bytes((text + "\n").encode(), os.path.join(args.out, "spread.md"))
    print(text)


if __name__ == "__main__":
    main()
