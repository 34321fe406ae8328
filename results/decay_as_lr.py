"""Decay is a learning rate: the decayed encoder and the residual encoder trained with decay's per-layer learning
rates (`pretrain.py --decay-as-lr`), from the same seed, against the plain residual run. Their loss curves should
overlay each other and not the residual one (README, "Decay is a learning rate").

    python results/decay_as_lr.py                                   # three default runs, two at a time, then the figure
    python results/decay_as_lr.py --out /tmp/x --pretrain-args="--max-steps 100"      # a quick look
    python results/decay_as_lr.py --init-only      # the two forms' gap at initialisation alone, in seconds
    python results/decay_as_lr.py --scales         # every schedule's alphas and per-branch lr multipliers (scales.png)

Runs go to <out>/<form>/ (the default command plus the form's flags); overlay.png and overlay.json go to <out>. A
run whose checkpoint exists is resumed (a finished one ends at once, untouched). Last, probe.py compares the decayed
run with itself rewritten in the residual form (its parameters times decay_scales(): the same function, features
1/c_k larger), to show the probe does not depend on the decayed stream's scale (probe_same_function.json / .log),
and with its separately trained --decay-as-lr twin (probe_twins.json / .log).
"""
import argparse
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from study import machine, resume_flag, sh, stop_in_one_line  # noqa: E402

import torch  # noqa: E402

import data  # noqa: E402
from common import fail, pyplot, save_figure  # noqa: E402
from model import MAE, SCHEDULES, encoder_alphas, preset, stream_scales  # noqa: E402
from pretrain import CPU_PRESET  # noqa: E402

FORMS = {"decayed": ["--alpha-schedule", "linear"], "decay as lr": ["--alpha-schedule", "linear", "--decay-as-lr"],
         "residual": ["--alpha-schedule", "none"]}


def residual_twin(decayed):
    """The decayed model rewritten as the residual encoder with decay's multipliers folded into its weights: the same
    function but for LayerNorm's eps, features 1/c_k larger."""
    twin = MAE(replace(decayed.config, decay_as_lr=True)).to(next(decayed.parameters()).dtype)
    scales = twin.decay_scales()
    twin.load_state_dict({name: value * scales.get(name, 1.0) for name, value in decayed.state_dict().items()})
    return twin


def init_gap(n_images=64):
    """Relative L2 gap between the two forms' encoder outputs (after the final norm, all patches visible) at
    initialisation and with random weights, float64. At initialisation every branch is zero, so the decayed stream is
    c_k x_0 and LayerNorm's eps (1e-6) weighs most there; training grows the branches and the gap shrinks."""
    test = data.get_dataset(data.EMBEDDED, "test", 32, train_aug=False)
    imgs = torch.stack([test[i][0] for i in range(n_images)]).double()
    torch.manual_seed(0)
    gaps = {}
    for state in ("initialisation", "random weights"):
        decayed = MAE(preset(CPU_PRESET)).double()
        if state == "random weights":  # every branch non-zero
            with torch.no_grad():
                for p in decayed.parameters():
                    p.copy_(torch.randn_like(p) * 0.1)
        a, b = decayed.features(imgs)[-1], residual_twin(decayed).features(imgs)[-1]
        gaps[state] = ((a - b).norm() / b.norm()).item()
    return gaps


def probe_same_function(decayed_folder, out):
    """Largest |LP| and |k-NN| difference over blocks between the decayed run and its residual rewrite."""
    twin_folder, result = os.path.join(out, "decayed_as_residual"), os.path.join(out, "probe_same_function.json")
    os.makedirs(twin_folder, exist_ok=True)
    twin = os.path.join(twin_folder, "ckpt.pt")
    torch.save(residual_twin(MAE.from_checkpoint(os.path.join(decayed_folder, "ckpt.pt"))).checkpoint(), twin)
    sh("probe.py", os.path.join(decayed_folder, "ckpt.pt"), "--compare", twin, "--out", result,
       log=os.path.join(out, "probe_same_function.log"))
    shutil.rmtree(twin_folder)
    a, b = (c["layers"] for c in json.load(open(result))["checkpoints"])
    return {key: max(abs(x[key] - y[key]) for x, y in zip(a, b)) for key in ("lp_mean", "knn_mean", "lp_cls", "knn_cls")}


def losses(folder):
    return [(e["step"], e["loss"]) for e in map(json.loads, open(os.path.join(folder, "log.jsonl")))]


def max_gap(curve_a, curve_b):
    """The largest loss difference at a step both curves logged ((step, loss) pairs): a resumed run's log has a line
    where it stopped, which the other run's may not, so lines are paired by step, not by position."""
    loss_a, loss_b = dict(curve_a), dict(curve_b)
    return max(abs(loss_a[s] - loss_b[s]) for s in loss_a.keys() & loss_b.keys())


def schedule_scales(out, depth=12, alpha_mins=(0.6, 0.8)):
    """Each decaying schedule's alpha per sub-layer and the lr multiplier 1 / c_k that its training amounts to on
    that sub-layer's last layer under AdamW (decay_scales): what an edit of alpha() does, printed and drawn."""
    plt = pyplot()
    if plt is not None:
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for n, schedule in enumerate(s for s in SCHEDULES if s != "none"):  # a colour per schedule, a dash per alpha_min
        for alpha_min, dash in zip(alpha_mins, ("-", "--", ":", "-.")):
            try:
                alphas, c = encoder_alphas(depth, schedule, alpha_min), stream_scales(depth, schedule, alpha_min)
            except ValueError as error:  # an edit of alpha() that cannot give this schedule's alphas
                fail(str(error))
            print(f"{schedule} to {alpha_min}: alphas {alphas[0]:.3f} ... {alphas[-1]:.3f}, lr multiplier of the "
                  f"branches {1 / c[0]:.2f} ... {1 / c[-1]:.1f}")
            if plt is not None:
                style = dict(marker=".", linestyle=dash, color=f"C{n}")
                left.plot(range(len(alphas)), alphas, label=f"{schedule} to {alpha_min}", **style)
                right.plot(range(len(c)), [1 / x for x in c], **style)
    if plt is None:
        return
    left.set(xlabel=f"encoder sub-layer k (0: the first attention, {2 * depth - 1}: the last MLP)", ylabel="shortcut weight alpha_k",
             title="x = alpha_k * x + f(x)")
    right.set(xlabel="encoder sub-layer k", ylabel="lr multiplier 1 / (alpha_0 ... alpha_k)", yscale="log",
              title="the same training as the residual encoder with these lrs (AdamW)")
    left.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "scales.png"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "decay_as_lr"))
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each (default 2)")
    p.add_argument("--pretrain-args", default="", help="more pretrain.py flags, e.g. --pretrain-args=\"--max-steps 100\"")
    p.add_argument("--init-only", action="store_true", help="print the two forms' gap at initialisation, train nothing")
    p.add_argument("--scales", action="store_true",
                   help="print and draw (scales.png in --out) every schedule's alphas and lr multipliers, train nothing")
    args = p.parse_args()
    if args.scales:
        return schedule_scales(args.out)
    folders = {form: os.path.join(args.out, form.replace(" ", "_")) for form in FORMS}

    def train(form):
        resume = resume_flag(folders[form])  # a run's first console output is kept; a resumed one's goes beside it
        os.makedirs(folders[form], exist_ok=True)
        sh("pretrain.py", *FORMS[form], "--out-dir", folders[form], *args.pretrain_args.split(), *resume,
           log=os.path.join(folders[form], "pretrain-resumed.log" if resume else "pretrain.log"))

    gaps = init_gap()
    print(f"encoder outputs of the two forms, relative L2 gap: {gaps}")
    if args.init_only:
        return
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(train, FORMS))
    curves = {form: losses(folder) for form, folder in folders.items()}
    probe_gap = probe_same_function(folders["decayed"], args.out)
    sh("probe.py", os.path.join(folders["decayed"], "ckpt.pt"), "--compare", os.path.join(folders["decay as lr"], "ckpt.pt"),
       "--out", os.path.join(args.out, "probe_twins.json"), log=os.path.join(args.out, "probe_twins.log"))
    gap = lambda a, b: max_gap(curves[a], curves[b])
    summary = {"machine": machine(), "pretrain_args": args.pretrain_args, "forms": FORMS,
               "final_loss": {form: curve[-1][1] for form, curve in curves.items()},
               "max_gap_decayed_vs_as_lr": gap("decayed", "decay as lr"),
               "encoder_output_gap_decayed_vs_as_lr": gaps, "probe_gap_decayed_vs_its_residual_rewrite": probe_gap,
               "max_gap_decayed_vs_residual": gap("decayed", "residual"),
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
    stop_in_one_line(main)
