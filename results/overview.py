"""Where decay stands on glyphs: the residual baseline against linear decay to 0.8 at every budget measured, in
one table and one figure (overview.md, overview.png), read from the summaries the studies committed.

    python results/overview.py

Each arm runs at the blr the 2-epoch study chose for it. Spreads are population stds over seeds; a gap counts as
a difference only beyond twice the larger one (study.verdict), and a one-seed setting claims none.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from common import pyplot, save_bytes, save_figure  # noqa: E402
from study import verdict  # noqa: E402

SETTINGS = [  # label, summary (under results/), baseline arm, decayed arm, epoch (a curve.json's checkpoint)
    ("2 CPU epochs, skips", "study_glyphs/study.json", "none", "linear-0.8", None),
    ("10 CPU epochs, skips", "curve_glyphs_cpu/spread.json", "none", "linear-0.8", None),
    ("2 CPU epochs, no skips", "study_glyphs/study.json", "none-noskips", "linear-0.8-noskips", None),
    ("10 CPU epochs, no skips", "curve_glyphs_cpu_noskips/spread.json", "none-noskips", "linear-0.8-noskips", None),
    ("20 of 200 CPU epochs, batch 128, skips", "curve_glyphs_cpu_long128/curve.json", "none", "linear-0.8", 20),
    ("25 of 200 CPU epochs, batch 256, skips", "curve_glyphs_cpu_gpurecipe/curve.json", "none", "linear-0.8", 25),
    ("25 of 200 GPU epochs, skips", "curve_glyphs_run2/curve.json", "none", "linear-0.8", 25),
    ("200 GPU epochs, skips", "curve_glyphs_run2/curve.json", "none", "linear-0.8", 200),
]
SHOWN = {"lp_best": "LP best block", "knn_best": "k-NN best block", "erank_last": "eff. rank last"}


def arm_stats(summary, arm, epoch):
    """{metric: [mean, std], seeds} of one arm: a study or spread table row, or one checkpoint of a curve."""
    if epoch is None:
        return summary["table"].get(arm)
    point = next((p for p in summary["curves"].get(arm, []) if p["epoch"] == epoch), None)
    return None if point is None else {**{k: [point[k], 0.0] for k in SHOWN}, "seeds": 1}


def overview(root):
    """[(label, {baseline: stats, decayed: stats})] for the settings whose summary holds both arms."""
    rows = []
    for label, path, base, decayed, epoch in SETTINGS:
        path = os.path.join(root, path)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            summary = json.load(f)
        pair = {arm: arm_stats(summary, arm, epoch) for arm in (base, decayed)}
        if all(pair.values()):
            rows.append((label, pair))
    return rows


def seeds(pair):
    return min(stats["seeds"] for stats in pair.values())


def cell(stats, key):
    mean, std = stats[key]
    return f"{mean:.1f}" if stats["seeds"] < 2 else f"{mean:.1f} ± {std:.1f}"


def markdown(rows):
    lines = ["Each cell: the residual baseline / linear decay to 0.8, mean ± population std over seeds (test split, %; the "
             "rank in dimensions), then decay minus baseline.", "",
             "| setting | arms | seeds | " + " | ".join(SHOWN.values()) + " |", "|---" * (3 + len(SHOWN)) + "|"]
    for label, pair in rows:
        (a, sa), (b, sb) = pair.items()
        cells = [f"{cell(sa, k)} / {cell(sb, k)}: {verdict(pair, b, a, k)}" for k in SHOWN]
        lines.append(f"| {label} | {a} / {b} | {seeds(pair)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(rows, out):
    if (plt := pyplot()) is None:
        return
    fig, axes = plt.subplots(1, len(SHOWN), figsize=(max(6, 1.1 * len(rows)) * len(SHOWN), 4.6))
    x = range(len(rows))
    for ax, (key, title) in zip(axes, SHOWN.items()):
        for side, name, shift in ((0, "residual (none)", -0.2), (1, "decay to 0.8 (linear-0.8)", 0.2)):
            stats = [list(pair.values())[side] for _, pair in rows]
            ax.bar([i + shift for i in x], [s[key][0] for s in stats], 0.4, yerr=[s[key][1] if s["seeds"] > 1 else float("nan") for s in stats],
                   capsize=3, label=name)
        ax.set_xticks(list(x), [label.replace(", ", "\n").replace(" epochs", "\nepochs") + f"\n{seeds(pair)} seed{'s' * (seeds(pair) > 1)}"
                                for label, pair in rows], fontsize=8)
        ax.set_title(title + (" (%)" if key != "erank_last" else " (the paper: lower = more abstract)"))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper right", ncol=2, fontsize=9)
    fig.suptitle("glyphs: the baseline against decay, by budget (error bars: std over seeds)", x=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    save_figure(fig, os.path.join(out, "overview.png"), dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=HERE, help="the folder the summaries' paths start from")
    p.add_argument("--out", default=HERE)
    args = p.parse_args()
    rows = overview(args.root)
    if not rows:
        print(f"overview.py: no summary under {args.root} holds both arms of any setting", file=sys.stderr)
        sys.exit(2)
    save_bytes((markdown(rows) + "\n").encode(), os.path.join(args.out, "overview.md"))
    figure(rows, args.out)
    print(markdown(rows))


if __name__ == "__main__":
    main()
