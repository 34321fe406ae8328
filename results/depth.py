"""Where in depth each arm's classes sit: k-NN and linear probe by encoder block, mean and population std over
seeds, for the overview's four CPU settings, with the GPU curve's epoch 200 beside them, and at 2 epochs the
stronger decays (alpha_min 0.7, 0.6) against the same baseline. Protocol (written before the analysis) and
results: results/README.md, "Where in depth the classes sit".

    python results/depth.py    # reads the committed probe JSON; writes depth.json, depth.md, depth.png

Per run, from probe.py's JSON in its headline pooling (test accuracy, block picked on validation):
  fall              accuracy at the picked block minus at the last block (below 0 when the pick tests worse)
  peak              the picked block's number
  top_minus_middle  mean over blocks 10-12 minus mean over blocks 5-8
Decay minus the baseline is read by the study's rule (a difference only beyond twice the larger seed std).
"""
import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from study import blr_tag, gap, verdict  # noqa: E402  (it puts the repo on the path)
from common import fail, pyplot, save_bytes, save_figure, save_json  # noqa: E402

MIDDLE, TOP = (5, 6, 7, 8), (10, 11, 12)
MEASURES = ("fall", "peak", "top_minus_middle")
KINDS = {"knn": ("best_knn", "k-NN"), "lp": ("best_linear_probe", "LP")}


def study_run(arm, seed, blr):
    return f"study_glyphs/runs/{arm}-blr{blr_tag(blr)}-s{seed}/probe.json"


def curve_run(folder, epoch):
    return lambda arm, seed, blr: f"{folder}/{f'seed{seed}/' if seed else ''}runs/{arm}/probe_e{epoch:03d}.json"


SETTINGS = [  # label, baseline arm, decayed arm, where one run's probe JSON lies (under --root)
    ("2 CPU epochs, skips", "none", "linear-0.8", study_run),
    ("10 CPU epochs, skips", "none", "linear-0.8", curve_run("curve_glyphs_cpu", 10)),
    ("2 CPU epochs, no skips", "none-noskips", "linear-0.8-noskips", study_run),
    ("10 CPU epochs, no skips", "none-noskips", "linear-0.8-noskips", curve_run("curve_glyphs_cpu_noskips", 10)),
    ("200 GPU epochs, skips", "none", "linear-0.8", curve_run("curve_glyphs_run2", 200)),
    ("2 CPU epochs, skips, decay to 0.7", "none", "linear-0.7", study_run),  # the dose check (amendment)
    ("2 CPU epochs, skips, decay to 0.6", "none", "linear-0.6", study_run),
]
SEEDS = (0, 1, 2)


def run_measures(path):
    """{kind: {by_block, fall, peak, top_minus_middle}} of one probe JSON, for k-NN and LP."""
    with open(path) as f:
        probe = json.load(f)
    head = probe["headline"]
    measures = {}
    for kind, (best, _) in KINDS.items():
        acc = {row["layer"]: row[f"{kind}_{head['pooling']}"] for row in probe["layers"]}
        if best not in head or sorted(acc) != list(range(1, max(TOP) + 1)):
            fail(f"{path}: needs blocks 1-12 probed and a block picked on validation (probe.py's defaults)")
        measures[kind] = {"by_block": [acc[b] for b in sorted(acc)], "fall": head[best]["test"] - acc[max(acc)],
                          "peak": head[best]["layer"],
                          "top_minus_middle": statistics.mean(acc[b] for b in TOP) - statistics.mean(acc[b] for b in MIDDLE)}
    return measures


def mean_std(values):
    return [statistics.mean(values), statistics.pstdev(values)]


def arm_table(runs):
    """{"seeds": n, "<kind>_<measure>": [mean, std], "<kind>_by_block": [[mean, std] per block], "per_seed": ...}."""
    row = {"seeds": len(runs)}
    for kind in KINDS:
        for measure in MEASURES:
            row[f"{kind}_{measure}"] = mean_std([r[kind][measure] for r in runs.values()])
        row[f"{kind}_by_block"] = [mean_std(block) for block in zip(*(r[kind]["by_block"] for r in runs.values()))]
    row["per_seed"] = {seed: {f"{kind}_{m}": r[kind][m] for kind in KINDS for m in MEASURES} for seed, r in runs.items()}
    return row


def reading(table, base, decayed):
    """The protocol's call: the GPU's shape (smaller k-NN fall, larger k-NN top minus middle with decay) seen,
    against, or not separated."""
    fall, fall_called = gap(table, decayed, base, "knn_fall")
    rise, rise_called = gap(table, decayed, base, "knn_top_minus_middle")
    if fall_called is None:
        return "one seed: not tested"
    if (fall_called and fall > 0) or (rise_called and rise < 0):
        return "against the GPU's shape"
    return "the GPU's shape, seen" if fall_called and rise_called else "not separated"


def collect(root):
    """[(label, base, decayed, {arm: arm_table}, reading)] for each setting with both arms found."""
    study_path = os.path.join(root, "study_glyphs", "study.json")
    chosen = {}
    if os.path.exists(study_path):
        with open(study_path) as f:
            chosen = json.load(f)["table"]
    rows = []
    for label, base, decayed, where in SETTINGS:
        table = {}
        for arm in (base, decayed):
            if where is study_run and arm not in chosen:
                continue
            paths = {seed: os.path.join(root, where(arm, seed, chosen.get(arm, {}).get("blr"))) for seed in SEEDS}
            runs = {seed: run_measures(path) for seed, path in paths.items() if os.path.exists(path)}
            if runs:
                table[arm] = arm_table(runs)
        if len(table) == 2:
            rows.append((label, base, decayed, table, reading(table, base, decayed)))
    return rows


def markdown(rows):
    lines = ["Per setting: each arm's mean ± population std over seeds (test split, %; peak is a block number), then "
             "decay minus the baseline by the study's rule. fall = picked block minus last block; top - middle = mean "
             "of blocks 10-12 minus mean of blocks 5-8.", ""]
    for label, base, decayed, table, call in rows:
        lines += [f"**{label}** ({base} / {decayed}, {min(t['seeds'] for t in table.values())} seed(s)): {call}", "",
                  f"| measure | {base} | {decayed} | decay minus {base} |", "|---|---|---|---|"]
        for kind, (_, name) in KINDS.items():
            for measure in MEASURES:
                key = f"{kind}_{measure}"
                cells = [f"{table[arm][key][0]:.1f} ± {table[arm][key][1]:.1f}" for arm in (base, decayed)]
                lines.append(f"| {name} {measure.replace('_minus_', ' - ')} | {cells[0]} | {cells[1]} | "
                             f"{verdict(table, decayed, base, key)} |")
        means = {arm: [mean for mean, _ in table[arm]["knn_by_block"]] for arm in (base, decayed)}
        lines += ["", f"k-NN, decay minus {base}, mean over seeds: " + ", ".join(
            f"blocks {blocks[0]}-{blocks[-1]} {statistics.mean(means[decayed][b - 1] - means[base][b - 1] for b in blocks):+.1f}"
            for blocks in (MIDDLE, TOP)), ""]
    return "\n".join(lines)


def figure(rows, out):
    if (plt := pyplot()) is None:
        return
    columns = min(4, len(rows))  # settings side by side, then a new line of settings: a k-NN row and an LP row
    grid_rows = len(KINDS) * -(-len(rows) // columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(4.2 * columns, 3.5 * grid_rows), squeeze=False)
    for ax in axes.flat:  # shown again below where a setting is drawn
        ax.set_visible(False)
    for i, (label, base, decayed, table, call) in enumerate(rows):
        top_row, column = len(KINDS) * (i // columns), i % columns
        for ax, (kind, (_, name)) in zip(axes[top_row:top_row + len(KINDS), column], KINDS.items()):
            ax.set_visible(True)
            for arm in (base, decayed):
                mean, std = zip(*table[arm][f"{kind}_by_block"])
                blocks = range(1, len(mean) + 1)
                ax.plot(blocks, mean, marker=".", label=f"{arm} ({table[arm]['seeds']} seed{'s' * (table[arm]['seeds'] > 1)})")
                ax.fill_between(blocks, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.25)
            for first, last in (MIDDLE[0], MIDDLE[-1]), (TOP[0], TOP[-1]):
                ax.axvspan(first - 0.5, last + 0.5, color="grey", alpha=0.08)
            ax.set_title(f"{label}\n{name} by block (%)" if kind == "knn" else f"{name} by block (%)", fontsize=9)
            ax.legend(fontsize=7)
        axes[top_row + len(KINDS) - 1, column].set_xlabel(f"encoder block\n{call}", fontsize=8)
    fig.suptitle("glyphs: where in depth each arm's classes sit (mean over seeds, band = 1 std; grey: blocks 5-8 and 10-12)")
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "depth.png"), dpi=100)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=HERE, help="the folder the runs' paths start from")
    p.add_argument("--out", default=os.path.join(HERE, "depth_glyphs"))
    args = p.parse_args()
    rows = collect(args.root)
    if not rows:
        fail(f"no setting has probe JSON of both arms under {args.root}")
    save_json(os.path.join(args.out, "depth.json"), {label: {"arms": table, "reading": call} for label, _, _, table, call in rows})
    text = markdown(rows)
    save_bytes(text.encode(), os.path.join(args.out, "depth.md"))
    figure(rows, args.out)
    print(text)


if __name__ == "__main__":
    main()
