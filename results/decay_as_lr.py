"""Decay is a learning rate: the decayed encoder and the residual encoder trained with decay's per-layer learning
rates (`pretrain.py --decay-as-lr`), from the same seed, against the plain residual run. Their loss curves should
overlay each other and not the residual one (README, "Decay is a learning rate").

    python results/decay_as_lr.py                                   # three default runs, two at a time, then the figure
    python results/decay_as_lr.py --out /tmp/x --pretrain-args="--max-steps 100"      # a quick look

Runs go to <out>/<form>/ (the default command plus the form's flags); overlay.png and overlay.json go to <out>. A
run whose checkpoint exists is resumed (a finished one ends at once, untouched).
"""
import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from study import machine, resume_flag, sh  # noqa: E402

from common import pyplot, save_figure  # noqa: E402

FORMS = {"decayed": ["--alpha-schedule", "linear"], "decay as lr": ["--alpha-schedule", "linear", "--decay-as-lr"],
         "residual": ["--alpha-schedule", "none"]}


def losses(folder):
    return [(e["step"], e["loss"]) for e in map(json.loads, open(os.path.join(folder, "log.jsonl")))]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "decay_as_lr"))
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each (default 2)")
    p.add_argument("--pretrain-args", default="", help="more pretrain.py flags, e.g. --pretrain-args=\"--max-steps 100\"")
    args = p.parse_args()
    folders = {form: os.path.join(args.out, form.replace(" ", "_")) for form in FORMS}

    def train(form):
        sh("pretrain.py", *FORMS[form], "--out-dir", folders[form], *args.pretrain_args.split(), *resume_flag(folders[form]))

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(train, FORMS))
    curves = {form: losses(folder) for form, folder in folders.items()}
    gap = lambda a, b: max(abs(x[1] - y[1]) for x, y in zip(curves[a], curves[b]))
    summary = {"machine": machine(), "pretrain_args": args.pretrain_args, "forms": FORMS,
               "final_loss": {form: curve[-1][1] for form, curve in curves.items()},
               "max_gap_decayed_vs_as_lr": gap("decayed", "decay as lr"), "max_gap_decayed_vs_residual": gap("decayed", "residual"),
               "curves": curves}
    with open(os.path.join(args.out, "overlay.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "curves"}, indent=1))
    if (plt := pyplot()) is None:
        return
    for (form, curve), style in zip(curves.items(), ("-", "--", ":")):
        plt.plot(*zip(*curve), style, label=f"{form}: {' '.join(FORMS[form])}", linewidth=2)
    plt.gca().set(xlabel="optimizer step", ylabel="training loss (masked patches)",
                  title="decayed shortcuts = residual net with per-layer learning rates")
    plt.legend(fontsize=8)
    save_figure(plt.gcf(), os.path.join(args.out, "overlay.png"))


if __name__ == "__main__":
    main()
