"""Effective rank of a frozen MAE encoder's features at every block (Roy & Vetterli 2007; RankMe, Garrido et al. 2023).

    python rank.py out/ckpt.pt
    python rank.py runs/none/ckpt.pt --compare runs/linear/ckpt.pt runs/exp/ckpt.pt

Per block: the rank of the N x d matrix of cls tokens over N images, the same for the mean of patch tokens, and
the mean over images (--n-tokens of them, spread evenly over the sample) of the rank of each image's own [1+n, d]
token matrix. Matrices are not centred (as RankMe). The encoder runs in fp32 on every device (--precision): bf16,
probe.py's choice on CUDA, reads cls ranks up to 11% higher (results/rank_precision.py).
Every checkpoint sees the same seeded sample of the test split, so N is the same for all.
"""
import math
import os
import time

import torch

import data
from common import (Parser, alpha_pairs, beside, fail, json_file, non_negative_int, note_if_replacing, one_thread,
                    pick_device, plateau_note, print_side_by_side, pyplot, run_script, save_figure, save_json, writable)
from probe import (PRECISIONS, add_common_args, add_precision_arg, data_source, epochs_done, extract_features,
                   get_split, input_stats, load_model, make_loader, precision_name, schedule_label, stats_note,
                   trained_for)

COLUMNS = {"cls": "cls token, N images", "mean": "patch mean, N images", "tokens": "each image's tokens, mean over M"}


def singular_values(matrices):
    """Singular values of each [..., N, D] matrix, float64 on the CPU, as square roots of the eigenvalues of the
    smaller Gram matrix: many times faster than an SVD for thousands of small token matrices. Eigenvalues within
    the Gram matrix's rounding of zero (below its size x eps x its largest eigenvalue) give zero singular values."""
    with torch.autocast("cpu", enabled=False), one_thread("cpu"):
        x = torch.as_tensor(matrices).detach().to("cpu", torch.float64)
        eig = torch.linalg.eigvalsh(x @ x.mT if x.shape[-2] <= x.shape[-1] else x.mT @ x)
        tolerance = eig[..., -1:] * eig.shape[-1] * torch.finfo(eig.dtype).eps
        return torch.where(eig > tolerance, eig, 0.0).sqrt()


def effective_ranks(matrices):
    """exp(entropy of p = s / s.sum()) of each matrix [..., N, D] (between 1 and min(N, D)), as a float64 tensor
    [...]; 0 for a zero matrix."""
    s = singular_values(matrices)
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(s.dtype).tiny)
    return torch.where(total[..., 0] > 0, (-torch.special.xlogy(p, p).sum(-1)).exp(), 0.0)  # xlogy: 0 log 0 = 0


def rank_profile(model, loader, device, n_token_images, dtype=torch.float32):
    """One row per block: pooled-feature ranks over every image, token ranks averaged over n_token_images spread
    evenly over the loader's (the first ones of a class-sorted folder would be a few classes). The encoder runs
    in dtype: fp32 even on a GPU, since bf16's rounding of a cls token that barely varies between images adds
    small singular values (results/rank_precision.py)."""
    n = len(loader.dataset)
    picked = set(range(n)) if n_token_images >= n else {j * n // n_token_images for j in range(n_token_images)}
    token_sum, seen = torch.zeros(model.config.depth, dtype=torch.float64), [0]

    def add_token_ranks(tokens):  # one [b, 1+n, d] per block
        rows = [i for i in range(len(tokens[0])) if seen[0] + i in picked]
        seen[0] += len(tokens[0])
        if rows:
            token_sum.add_(torch.stack([effective_ranks(t[rows]).sum() for t in tokens]))

    feats = extract_features(model, loader, device, range(1, model.config.depth + 1), on_tokens=add_token_ranks,
                             dtype=dtype)
    cls, mean, a = effective_ranks(feats["cls"]), effective_ranks(feats["mean"]), model.alphas
    rows = [{"layer": i + 1, "alpha_attn": a[2 * i], "alpha_mlp": a[2 * i + 1], "cls": cls[i].item(),
             "mean": mean[i].item(), "tokens": (token_sum[i] / len(picked)).item() if picked else None}  # --n-tokens 0
            for i in range(len(cls))]
    return rows, len(picked)


def describe(path, model):
    return (f"{path}: schedule {schedule_label(model.config)}, total decay {math.prod(model.alphas):.2e}; "
            f"alphas (attn,mlp) per block {alpha_pairs(model.alphas)}"
            + (" (taken as learning rates: the shortcuts are 1)" if model.config.decay_as_lr else ""))


def print_table(result):
    print(f"{result['checkpoint']} ({result['label']}): effective rank; cls and mean over N = {result['n_images']} "
          f"images, tokens: mean over {result['n_token_images']} images of each one's [1+n, d] token matrix")
    print(f"{'block':>5}  {'alpha attn/mlp':>14}  {'cls':>7}  {'mean':>7}  {'tokens':>7}")
    for r in result["layers"]:
        tokens = "-" if r["tokens"] is None else f"{r['tokens']:.2f}"
        print(f"{r['layer']:>5}  {r['alpha_attn']:>6.3f} {r['alpha_mlp']:>7.3f}  {r['cls']:>7.2f}  {r['mean']:>7.2f}  "
              f"{tokens:>7}")


def print_comparison(results):
    """Patch-mean rank per block, side by side, with each checkpoint's difference to the first."""
    ranks = [{r["layer"]: r["mean"] for r in result["layers"]} for result in results]
    print(f"\npatch mean, effective rank over {results[0]['n_images']} images; in brackets the difference to [0]")
    cell = lambda rank, layer: (f"{rank[layer]:.2f}" if layer in rank else "-",
                                f" ({rank[layer] - ranks[0][layer]:+.2f})" if layer in rank and layer in ranks[0] else "")
    print_side_by_side([(layer, [cell(rank, layer) for rank in ranks]) for layer in sorted(set().union(*ranks))], 7, 10)
    for i, result in enumerate(results):
        print(f"  [{i}] {result['label']}{trained_for(result['epochs_done'])}: {result['checkpoint']}")


def plot_ranks(results, path):
    if (plt := pyplot()) is None:
        return
    labels = [r["label"] for r in results]  # two runs of one schedule: tell them apart by path
    labels = [f"{lab} ({r['checkpoint']})" if labels.count(lab) > 1 else lab for lab, r in zip(labels, results)]
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(13, 4), layout="constrained")
    for ax, (key, title) in zip(axes, COLUMNS.items()):
        for result, label in zip(results, labels):
            values = [math.nan if r[key] is None else r[key] for r in result["layers"]]  # None: not measured
            ax.plot([r["layer"] for r in result["layers"]], values, "o-", label=label)
        title = title.replace("N images", f"{results[0]['n_images']:,} test images")
        ax.set(title=title.replace("over M", f"over {results[0]['n_token_images']:,} images"), xlabel="encoder block",
               ylabel="effective rank")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0), ncol=2)
    save_figure(fig, path)


def build_parser():
    parser = Parser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    a = parser.add_argument
    a("--compare", nargs="+", default=[], metavar="CKPT", help="more checkpoints: a table each, one side by side, one plot")
    a("--n", type=non_negative_int, default=4096, help="seeded sample of the test split, 0 = all (default %(default)s)")
    a("--n-tokens", type=non_negative_int, default=512,
      help="of those, images (spread evenly) whose own token matrices are ranked (default %(default)s)")
    add_precision_arg(parser, "fp32", "bf16 raises the cls ranks by up to 11%%, results/README.md")
    a("--out", type=json_file, help="JSON path (default: rank.json beside the checkpoint, rank_compare.json with "
      "--compare; rank_<name>.json and rank_compare_<name>.json for a checkpoint not called ckpt.pt)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    start, device = time.time(), pick_device(args.device)
    models = [(path, *load_model(path)) for path in [args.checkpoint, *args.compare]]  # a list: a path may repeat
    out = writable(args.out or beside(args.checkpoint, "rank_compare.json" if args.compare else "rank.json"))
    note_if_replacing(out, [path for path, _, _ in models])
    name, root = data_source(models[0][2], args, args.checkpoint)
    results = []
    for path, model, ckpt in models:
        stats = input_stats(ckpt)
        print(describe(path, model) + stats_note(name, stats))
        if note := plateau_note(ckpt.get("loss"), model.config, f"{path}'s last pretraining loss"):
            print(note)
        images = get_split(name, "test", model.config.img_size, root, args.n, args.download, stats)
        try:
            rows, n_tokens = rank_profile(model, make_loader(images, args.batch_size, device, args.workers), device,
                                          args.n_tokens, PRECISIONS[args.precision])
        except data.DataError as error:
            fail(str(error))
        results.append({"checkpoint": path, "label": schedule_label(model.config), "epochs_done": epochs_done(ckpt),
                        "normalised_with": stats,
                        "n_images": len(images), "n_token_images": n_tokens, "alphas": model.alphas, "layers": rows})
    for result in results:
        print_table(result)
    if args.compare:
        print_comparison(results)
    print(f"took {time.time() - start:.0f} s on {device}, {precision_name(device, args.precision)}")
    save_json(out, {
        "data": name, "columns": COLUMNS, "precision": precision_name(device, args.precision),
        "sample": "seeded random sample of the test split (seed 0); tokens: n_token_images evenly spaced in it",
        "checkpoints": results, "seconds": round(time.time() - start, 1)})
    plot_ranks(results, os.path.splitext(out)[0] + ".png")


if __name__ == "__main__":
    run_script(main)
