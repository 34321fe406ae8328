"""Decay minus the baseline against pretraining epochs, one line per curve (gaps.png, gaps.md): where, on each
recipe and machine, decay leads or lags.

    python results/gaps.py

Each curve is a folder written by results/curve.py (its curve.json); every checkpoint that both arms reached gives
one point. The grey band is the study's yardstick: twice the larger population std of the two arms over seeds,
from a spread.json of results/spread.py (default: the 10-epoch CPU curve with skips, three seeds); a gap inside it
is within seed spread.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from study import spread_band  # noqa: E402  (it puts the repository root on the path)
from common import fail, pyplot, save_bytes, save_figure  # noqa: E402

CURVES = [  # label=folder under results/, each a curve.json of none and linear-0.8
    "CPU, 10-epoch recipe (batch 128)=curve_glyphs_cpu",
    "CPU, the GPU's 200-epoch recipe (batch 256)=curve_glyphs_cpu_gpurecipe",
    "CPU, the 200-epoch recipe at batch 128=curve_glyphs_cpu_long128",
    "H200, 200-epoch recipe (batch 256, bf16)=curve_glyphs_run2",
]
SHOWN = {"lp_best": "LP best block", "knn_last": "k-NN last block", "knn_best": "k-NN best block",
         "erank_last": "eff. rank, last block"}


def gaps(summary, base, decayed):
    """{epoch: {metric: decayed - base}} at the checkpoints both arms reached."""
    points = {arm: {p["epoch"]: p for p in summary["curves"].get(arm, [])} for arm in (base, decayed)}
    shared = sorted(set(points[base]) & set(points[decayed]))
    return {e: {k: points[decayed][e][k] - points[base][e][k] for k in SHOWN} for e in shared}


def yardstick(table, base, decayed):
    """{metric: the band a gap must leave to count (study.spread_band)}, from a spread.json's table."""
    return {k: spread_band(table[base][k][1], table[decayed][k][1]) for k in SHOWN}


def markdown(found, band, base, decayed):
    lines = [f"{decayed} minus {base} (test split, points; the rank in dimensions); within spread: inside "
             + ", ".join(f"±{band[k]:.1f} ({title})" for k, title in SHOWN.items()) + ".", "",
             "| curve | epoch | " + " | ".join(SHOWN.values()) + " |", "|---" * (2 + len(SHOWN)) + "|"]
    for label, by_epoch in found.items():
        for epoch, gap in by_epoch.items():
            lines.append(f"| {label} | {epoch} | " + " | ".join(f"{gap[k]:+.1f}" + ("" if abs(gap[k]) > band[k] else " (within)")
                                                           for k in SHOWN) + " |")
    return "\n".join(lines)


def figure(found, band, base, decayed, out):
    if (plt := pyplot()) is None:
        return
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.4))
    for ax, (key, title) in zip(axes.flat, SHOWN.items()):
        ax.axhspan(-band[key], band[key], color="0.85", label="within seed spread")
        ax.axhline(0, color="k", lw=0.8)
        for label, by_epoch in found.items():
            ax.plot(list(by_epoch), [gap[key] for gap in by_epoch.values()], marker="o", label=label)
        ax.set_xscale("log")  # 2 to 200 epochs: the short curves would crowd the left edge on a linear axis
        ax.set_xlabel("pretraining epochs (log scale)")
        ax.set_title(f"{title}: {decayed} - {base}")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    save_figure(fig, os.path.join(out, "gaps.png"), dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--curves", nargs="+", default=CURVES, metavar="LABEL=FOLDER",
                   help="curve.py folders (relative to results/ or absolute), each with its label in the figure")
    p.add_argument("--arms", nargs=2, default=["none", "linear-0.8"], metavar=("BASELINE", "DECAYED"))
    p.add_argument("--spread", default=os.path.join(HERE, "curve_glyphs_cpu", "spread.json"),
                   help="spread.py's summary that gives the yardstick")
    p.add_argument("--out", default=HERE)
    args = p.parse_args()
    base, decayed = args.arms
    found = {}
    for pair in args.curves:
        label, _, folder = pair.rpartition("=")
        if not label or label in found:
            fail(f"--curves takes LABEL=FOLDER with a label of its own for each curve, got {pair!r}")
        path = os.path.join(HERE, folder, "curve.json")
        if not os.path.exists(path):
            fail(f"no curve.json in {os.path.join(HERE, folder)}")
        with open(path) as f:
            found[label] = gaps(json.load(f), base, decayed)
        if not found[label]:
            fail(f"{path} holds no checkpoint that both {base} and {decayed} reached")
    if not os.path.exists(args.spread):
        fail(f"no spread file {args.spread} (results/spread.py writes one)")
    with open(args.spread) as f:
        table = json.load(f).get("table", {})
    if base not in table or decayed not in table:
        fail(f"{args.spread} holds no spread of both {base} and {decayed}")
    band = yardstick(table, base, decayed)
    table = markdown(found, band, base, decayed)
    save_bytes((table + "\n").encode(), os.path.join(args.out, "gaps.md"))
    figure(found, band, base, decayed, args.out)
    print(table)


if __name__ == "__main__":
    main()
