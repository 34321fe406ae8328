"""Linear probe and k-NN of a frozen MAE encoder, every layer at once.

    python probe.py out/ckpt.pt                                   # data from the checkpoint, every block
    python probe.py out_none/ckpt.pt --compare out/ckpt.pt        # several checkpoints: one table of differences
    python probe.py mae_pretrain_vit_base.pth --data /path/to/imagenet --layers 12 --n-train 0 --n-test 0

Features (cls token and mean of patch tokens after each block) are computed once and cached as float32 on the
CPU; then one head per layer and pooling is trained on them. The best block is picked on a validation sample
of the train split (disjoint from the probe's) and reported on test. rank.py shares extract_features.
"""
import contextlib
import math
import os
import time
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import data
from model import MAE
from common import (WORKERS, Parser, autocast, beside, default_workers, fail, iter_holding_signals, json_file,
                    load_checkpoint, lr_at, non_negative_int, note_if_replacing, one_thread, pick_device, plateau_note,
                    positive, positive_int, print_side_by_side, pyplot, run_script, save_figure, save_json, writable)

# Reference, MAE's protocol: cls token, BatchNorm1d(affine=False, eps 1e-6) + Linear, LARS, base lr
# 0.1, batch 16384, 90 epochs, 10 warm-up. Authors' quick probe: mean of tokens, Linear, AdamW lr 1e-2, cosine,
# 200 epochs, features computed once. Ours: MAE's head (weight decay 0) trained with the authors' AdamW lr 1e-2
# on features computed once; for speed batch 256, 50 epochs, 5 warm-up, per-step cosine.
PROBE = dict(epochs=50, warmup_epochs=5, batch_size=256, lr=1e-2, weight_decay=0.0)
KNN = dict(k=20, t=0.07)  # DINO's weighted k-NN
POOLINGS = {"cls": lambda tokens: tokens[:, 0], "mean": lambda tokens: tokens[:, 1:].mean(dim=1)}  # 0 is cls
HEADLINE = "mean"
PRECISIONS = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}  # None: the device's autocast
HEADLINE_WHY = ("Headline: the mean of the last block's patch tokens after the final norm (MAE's global pool "
                "averages them before a norm of its own; the authors' quick probe averages all tokens, cls included, "
                "of an encoder without a final norm); "
                "an MAE's cls token gets no loss of its own and is weak after short training. Both poolings are "
                "reported per layer.")


def add_common_args(parser):
    a = parser.add_argument
    a("checkpoint", help="a pretrain.py checkpoint, or a timm / MAE ViT state_dict (needs --data)")
    a("--data", help="dataset name or ImageFolder root (default: what the checkpoint trained on)")
    a("--data-root", help="where torchvision datasets live (default: the checkpoint's, else ./data)")
    a("--download", action="store_true", help="let torchvision download a named dataset that is not under --data-root")
    a("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device name")
    a("--batch-size", type=positive_int, default=256, help="images per forward pass (default %(default)s)")
    a("--workers", type=WORKERS, help="loader processes (default: 8 on cuda, else 0)")


def add_precision_arg(parser, default, why):
    parser.add_argument("--precision", choices=PRECISIONS, default=default,
                        help="the frozen encoder's arithmetic: auto (bf16 autocast on CUDA, fp16 on cards without "
                             f"bf16, fp32 elsewhere), fp32, or bf16 autocast on any device (default %(default)s: {why})")


def load_model(path):
    ckpt = load_checkpoint(path)
    try:
        model = MAE.from_checkpoint(ckpt)
    except (ValueError, TypeError, KeyError, RuntimeError, AttributeError) as error:  # not a checkpoint's layout
        fail(f"{path}: {str(error).splitlines()[0]}")
    if model.config.in_chans != 3:  # every data set here is served as RGB
        fail(f"{path}: its patch embedding takes {model.config.in_chans}-channel images; the data here are 3-channel RGB")
    return model, ckpt


def trained_args(ckpt):
    """pretrain.py's flags as the checkpoint recorded them; {} for other weights."""
    return ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}


def data_source(ckpt, args, path):
    """(dataset, torchvision root): the flags, else what the checkpoint trained on."""
    trained = trained_args(ckpt)
    if not (args.data or trained.get("data")):
        fail(f"{path} does not say what data it was trained on (public ViT weights?): pass --data")
    if not args.data and data.missing_folder(trained["data"]):
        fail(f"{path} was trained on the image folder {trained['data']}, which is not there (from {os.getcwd()}): "
             "pass --data with where it is now")
    return args.data or trained["data"], args.data_root or trained.get("data_root") or "./data"


def input_stats(ckpt):
    """The MEAN_STD key the checkpoint's pretraining normalised its images with, so that a probe on other data
    feeds the encoder what it learned from: its data set's own, "imagenet" for an image folder and for public
    weights (MAE's, timm's)."""
    return data.own_stats(trained_args(ckpt).get("data"))


def stats_note(name, stats):
    """A note where the images are normalised other than their own data set's way, else ""."""
    own = data.own_stats(name)
    return "" if stats == own else f"; images normalised with the {stats} mean and std, as in the checkpoint's pretraining"


def get_split(name, split, img_size, root, n, download=False, stats=None):
    """A fixed seeded sample of n images (the whole split when n is 0), the same for every checkpoint; stats as
    data.get_dataset's."""
    try:
        dataset = data.get_dataset(name, split, img_size, train_aug=False, download=download, root=root, stats=stats)
    except data.DataError as error:
        fail(str(error))
    readable(dataset)
    if not n or n >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    return readable(data.Sample(dataset, order[:n].sort().values.tolist()))


def readable(sample):
    """The sample (or whole split), once its first item is read: one of no readable image fails here in one line,
    not as a DataLoader worker's traceback (a sample of a folder can fail where the folder would not)."""
    try:
        sample[0]
    except data.DataError as error:
        fail(str(error))
    return sample


def make_loader(dataset, batch_size, device, workers=None):
    workers = default_workers(device) if workers is None else workers
    return torch.utils.data.DataLoader(dataset, batch_size, num_workers=workers, pin_memory=device.type == "cuda")


def precision(device, dtype):
    if dtype is None:
        return autocast(device)
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def precision_name(device, choice):
    """What a --precision choice runs as on this device: auto is bf16 on CUDA (fp16 without bf16), else fp32."""
    if choice != "auto":
        return choice
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@torch.no_grad()
def extract_features(model, loader, device, layers, on_tokens=None, name="features", dtype=None):
    """Frozen-encoder features: {each of POOLINGS: float32 CPU tensor [len(layers), N, d], "labels": [N]}.

    layers are 1-based blocks. on_tokens, if given, gets each batch's list (one per layer) of float32 token
    tensors [b, 1+n, d], so a caller can reduce them without storing every token. dtype: None runs the encoder
    under the device's autocast (bf16 on CUDA, fp32 elsewhere), torch.float32 in full precision, another dtype
    under autocast to it.
    """
    model.eval().to(device)
    parts, seen, start = {key: [] for key in (*POOLINGS, "labels")}, 0, time.time()
    said = start
    for i, (imgs, labels) in enumerate(iter_holding_signals(loader)):
        with precision(device, dtype):
            blocks = model.features(imgs.to(device, non_blocking=True))
        tokens = [blocks[layer - 1].float() for layer in layers]
        for p, pool in POOLINGS.items():
            parts[p].append(torch.stack([pool(t) for t in tokens]).cpu())
        parts["labels"].append(labels)
        if on_tokens is not None:
            on_tokens(tokens)
        seen += len(labels)
        if time.time() - said > 10 or i + 1 == len(loader):  # a line every 10 s and at the end, not a page of them
            said = time.time()
            print(f"  {name}: {seen}/{len(loader.dataset)} images, {seen / (said - start):.0f} img/s")
    return {key: torch.cat(value, dim=-2 if key in POOLINGS else 0) for key, value in parts.items()}


class ProbeHeads(nn.Module):
    """MAE's head, BatchNorm1d(affine=False, eps 1e-6) + Linear, once per feature set; input [heads, b, d].

    The norm holds the whole training set's statistics and stays in eval mode: the large-batch limit of MAE's
    batch 16384, which lets training normalise the cached features once instead of at every step.
    """

    def __init__(self, train_x, n_classes):
        super().__init__()
        heads, _, dim = train_x.shape
        self.norm = nn.BatchNorm1d(heads * dim, affine=False, eps=1e-6).eval()
        self.norm.running_mean, self.norm.running_var = train_x.mean(1).flatten(), train_x.var(1).flatten()
        self.weight = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, dim, n_classes), std=0.01))
        self.bias = nn.Parameter(torch.zeros(heads, n_classes))

    def normalise(self, x):
        return rearrange(self.norm(rearrange(x, "h b d -> b (h d)")), "b (h d) -> h b d", h=len(x))

    def classify(self, z):
        return torch.einsum("hbd,hdc->hbc", z, self.weight) + self.bias[:, None]


def fit_linear_probes(train_x, train_y, n_classes, recipe=PROBE, device="cpu", seed=0):
    """Trains one head per feature set [heads, N, d], all in one pass."""
    torch.manual_seed(seed)
    with one_thread(device):
        heads = ProbeHeads(train_x.to(device), n_classes).to(device)
        opt = torch.optim.AdamW(heads.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
        with torch.no_grad():
            train_z, train_y = heads.normalise(train_x.to(device)), train_y.to(device)
        per_epoch = math.ceil(train_z.shape[1] / recipe["batch_size"])
        total, warmup = recipe["epochs"] * per_epoch, round(recipe["warmup_epochs"] * per_epoch)
        for step in range(total):
            if step % per_epoch == 0:
                batches = torch.randperm(train_z.shape[1], device=device).split(recipe["batch_size"])
            batch = batches[step % per_epoch]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, warmup, recipe["lr"])
            logits = heads.classify(train_z[:, batch])  # [heads, b, classes]; each head's loss is its own mean
            loss = F.cross_entropy(logits.flatten(0, 1), train_y[batch].repeat(len(logits))) * len(logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return heads


@torch.no_grad()
def head_accuracy(heads, x, y, device="cpu"):
    """Each head's accuracy (%) on feature sets x [heads, N, d] with labels y [N]."""
    correct = sum((heads.classify(heads.normalise(xs.to(device))).argmax(-1) == ys.to(device)).sum(-1)
                  for xs, ys in zip(x.split(4096, dim=1), y.split(4096)))
    return (100 * correct.float() / len(y)).tolist()


@torch.no_grad()
def knn_accuracy(train_x, train_y, test_x, test_y, k=20, t=0.07, chunk=1024, n_classes=None):
    """DINO's k-NN: cosine similarity, votes exp(sim / t); test rows in chunks to bound memory. Accuracy in %."""
    n_classes = n_classes or int(max(train_y.max(), test_y.max())) + 1
    train_x, test_x = F.normalize(train_x.float(), dim=1), F.normalize(test_x.float(), dim=1)
    correct = 0
    for x, y in zip(test_x.split(chunk), test_y.split(chunk)):
        sims, idx = (x @ train_x.T).topk(min(k, len(train_y)), dim=1)
        votes = torch.zeros(len(x), n_classes, device=x.device).scatter_add_(1, train_y[idx], (sims / t).exp())
        correct += (votes.argmax(1) == y).sum().item()
    return 100 * correct / len(test_y)


def probe_layers(train, evals, layers, n_classes, recipe, device):
    """One row per layer: linear-probe and k-NN accuracy for both poolings on each evaluation set, keyed
    "lp_mean", "knn_cls", ... for the first (test) and "val_lp_mean", ... for a second (validation)."""
    stack = lambda feats: torch.cat([feats[p] for p in POOLINGS])  # [poolings * layers, N, d], pooling-major
    heads = fit_linear_probes(stack(train), train["labels"], n_classes, recipe, device)
    rows = [{"layer": layer} for layer in layers]
    for prefix, feats in zip(("", "val_"), evals):
        lp = head_accuracy(heads, stack(feats), feats["labels"], device)
        for i, row in enumerate(rows):
            for j, p in enumerate(POOLINGS):
                row[f"{prefix}lp_{p}"] = lp[j * len(layers) + i]
                x, y, eval_x, eval_y = (t.to(device) for t in (train[p][i], train["labels"], feats[p][i], feats["labels"]))
                row[f"{prefix}knn_{p}"] = knn_accuracy(x, y, eval_x, eval_y, **KNN, n_classes=n_classes)
    return rows


def headline(rows):
    """Last block, and the block that validation picks (test accuracy reported there), for LP and k-NN."""
    head = {"pooling": HEADLINE, "layer": rows[-1]["layer"]}
    for key, metric in (("linear_probe", "lp_"), ("knn", "knn_")):
        head[key] = rows[-1][metric + HEADLINE]
        if "val_" + metric + HEADLINE in rows[0]:
            best = max(rows, key=lambda row: row["val_" + metric + HEADLINE])
            head[f"best_{key}"] = {"layer": best["layer"], "test": best[metric + HEADLINE], "val": best["val_" + metric + HEADLINE]}
    return head


def parse_layers(text, depth):
    try:
        layers = sorted({*range(1, depth + 1)} if text == "all" else {int(s) for s in text.split(",")})
    except ValueError:
        fail(f"--layers must be 'all' or block numbers like 1,6,12, got {text!r}")
    if not 1 <= layers[0] <= layers[-1] <= depth:
        fail(f"--layers {text}: this encoder has blocks 1 to {depth}")
    return layers


def plot_accuracy(reports, path, title):
    """Accuracy against depth: both poolings for one report, mean pooling of each when comparing several."""
    if (plt := pyplot()) is None:
        return
    keys = (("lp_cls", "o-"), ("lp_mean", "s-"), ("knn_cls", "o--"), ("knn_mean", "s--"))
    for i, report in enumerate(reports):
        for key, style in keys if len(reports) == 1 else keys[1::2]:
            label = key.replace("lp_", "linear probe, ").replace("knn_", "k-NN, ")
            label = label if len(reports) == 1 else f"[{i}] {report['label']}: {label.split(',')[0]}"
            plt.plot([row["layer"] for row in report["layers"]], [row[key] for row in report["layers"]], style,
                     label=label, color=None if len(reports) == 1 else f"C{i}")
    plt.gca().set(xlabel="encoder block", ylabel="test accuracy (%)", title=title)
    plt.legend(fontsize=8)
    save_figure(plt.gcf(), path)


def schedule_label(cfg):
    label = "none (alpha 1)" if cfg.alpha_schedule == "none" else f"{cfg.alpha_schedule}, alpha_min {cfg.alpha_min:g}"
    return label + (", as lr" if cfg.decay_as_lr else "")


def print_table(rows, alphas):
    val = "val_lp_mean" in rows[0]
    print(f"{'block':>5}  {'alpha attn/mlp':>14}  {'LP cls':>6}  {'LP mean':>7}  {'kNN cls':>7}  {'kNN mean':>8}"
          + ("  val: LP mean  kNN mean" if val else ""))
    for r in rows:
        print(f"{r['layer']:>5}  {alphas[2 * r['layer'] - 2]:>6.3f} {alphas[2 * r['layer'] - 1]:>7.3f}  "
              f"{r['lp_cls']:>6.1f}  {r['lp_mean']:>7.1f}  {r['knn_cls']:>7.1f}  {r['knn_mean']:>8.1f}"
              + (f"  {r['val_lp_mean']:>12.1f}  {r['val_knn_mean']:>8.1f}" if val else ""))


def describe_headline(head, depth):
    where = "last block" if head["layer"] == depth else "deepest probed block"
    text = f"{where} {head['layer']}: linear probe {head['linear_probe']:.1f}%, k-NN {head['knn']:.1f}%"
    for key, name in (("linear_probe", "linear probe"), ("knn", "k-NN")):
        if (best := head.get(f"best_{key}")) is not None:
            text += f"; best {name} block on validation: {best['layer']} ({best['test']:.1f}% test)"
    return text


def build_parser():
    parser = Parser(description=__doc__.split("\n")[0], epilog=HEADLINE_WHY)
    add_common_args(parser)
    a = parser.add_argument
    a("--compare", nargs="+", default=[], metavar="CKPT", help="more checkpoints: one table of differences, one plot")
    a("--layers", default="all", help="blocks to probe, 1-based, e.g. 1,6,12 (default: all)")
    a("--n-train", type=non_negative_int, default=3000,
      help="seeded sample of the train split, 0 = all but the validation sample (default %(default)s: probe.py on "
           "the default preset takes under a minute on 2 CPU cores)")
    a("--n-val", type=non_negative_int, default=1000, help="seeded sample of the train split, disjoint from the "
      "probe's, that picks the best block, at most half the split; 0 = no validation (default %(default)s)")
    a("--n-test", type=non_negative_int, default=1500, help="seeded sample of the test split, 0 = all (default %(default)s)")
    a("--epochs", type=positive_int, default=PROBE["epochs"], help="linear-probe epochs (default %(default)s)")
    a("--lr", type=positive, default=PROBE["lr"], help="linear-probe AdamW learning rate (default %(default)s)")
    add_precision_arg(parser, "auto", "on the default checkpoints bf16 moved mean-pooled accuracies by 0.5 "
                      "points at most, results/README.md")
    a("--out", type=json_file, help="JSON path (default: probe.json beside the checkpoint, probe_compare.json with --compare; "
      "probe_<name>.json and probe_compare_<name>.json for a checkpoint not called ckpt.pt)")
    return parser


def probe_splits(name, img_size, root, args, stats=None):
    """Seeded samples (seed 0), the same for every checkpoint: train for the probes, val (disjoint from it, also
    from the train split) to pick a block, test to report. n_train 0 takes all but the validation images."""
    train = get_split(name, "train", img_size, root, 0, args.download, stats)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    n_val = min(args.n_val, len(order) // 2)
    n_train = min(args.n_train or len(order), len(order) - n_val)
    if n_train < 2:  # one image has no feature variance to normalise by: every head would predict one class
        fail(f"{name}: the linear probe needs at least 2 train images; the sample holds {n_train} "
             f"(--n-train {args.n_train}, {len(order)} train images, {n_val} of them for validation)")
    splits = {"train": readable(data.Sample(train, sorted(order[:n_train]))),
              "test": get_split(name, "test", img_size, root, args.n_test, args.download, stats)}
    if n_val:
        splits["val"] = readable(data.Sample(train, sorted(order[len(order) - n_val:])))
    return splits


def probe_recipe(args):
    """PROBE with the flags' epochs and lr; the warm-up stays the same share of the epochs (a tenth), so a short
    probe still anneals instead of ending at its peak lr."""
    return PROBE | {"epochs": args.epochs, "lr": args.lr,
                    "warmup_epochs": PROBE["warmup_epochs"] * args.epochs / PROBE["epochs"]}


def epochs_done(ckpt):
    """Pretraining epochs behind a pretrain.py checkpoint (2.0 after the default run; the checkpoint's own
    "epoch" field is the 0-based index of the epoch its step fell in); None for other weights."""
    trained = trained_args(ckpt)
    try:
        return round(ckpt["step"] / (ckpt["n_train"] // (trained["batch_size"] * trained.get("accum_steps", 1))), 6)
    except (KeyError, TypeError, ZeroDivisionError):  # not from pretrain.py
        return None


def trained_for(epochs):
    """', 2 epochs trained' for the reports' lines; '' for weights not from pretrain.py."""
    if epochs is None:
        return ""
    amount = f"{round(epochs, 3):g}" if epochs >= 0.01 else f"{epochs:.2g}"  # a few steps: not "0 epochs"
    return f", {amount} epoch{'' if epochs == 1 else 's'} trained"


def probe_checkpoint(path, model, ckpt, args, out, explain=True):
    start = time.time()
    cfg, device = model.config, pick_device(args.device)
    layers, (name, root) = parse_layers(args.layers, cfg.depth), data_source(ckpt, args, path)
    stats = input_stats(ckpt)
    splits = probe_splits(name, cfg.img_size, root, args, stats)
    recipe = probe_recipe(args)
    megabytes = sum(map(len, splits.values())) * len(layers) * len(POOLINGS) * cfg.width * 4 / 2**20
    done = epochs_done(ckpt)
    where = {} if name in data.DATASETS else {"test": " (its val/)", "val": " (from train/)"}  # an image folder's
    print(f"{path}: {cfg.depth} blocks x {cfg.width}, schedule {schedule_label(cfg)}{trained_for(done)}; {name}: "
          + " / ".join(f"{len(split)} {s}{where.get(s, '')}" for s, split in splits.items())
          + f" images (seeded samples, seed 0); {device}, {precision_name(device, args.precision)}; "
            f"feature cache {megabytes:.0f} MB" + stats_note(name, stats))
    if note := plateau_note(ckpt.get("loss"), cfg, f"{path}'s last pretraining loss"):
        print(note)
    seconds = {"setup": time.time() - start}
    try:
        feats = {s: extract_features(model, make_loader(split, args.batch_size, device, args.workers), device, layers,
                                     name=f"{s} features", dtype=PRECISIONS[args.precision])
                 for s, split in splits.items()}
    except data.DataError as error:
        fail(str(error))
    seconds["features"] = time.time() - start - sum(seconds.values())
    evals = [feats["test"]] + ([feats["val"]] if "val" in feats else [])
    rows = probe_layers(feats["train"], evals, layers, len(splits["train"].dataset.classes), recipe, device)
    seconds["probes"] = time.time() - start - sum(seconds.values())
    print_table(rows, model.alphas)
    head = headline(rows)
    print((f"{HEADLINE_WHY}\n" if explain else "") + f"headline ({HEADLINE} pooling): {describe_headline(head, cfg.depth)}  ["
          + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + "]")
    report = {"checkpoint": path, "label": schedule_label(cfg), "data": name,
              "n_val": 0, **{f"n_{s}": len(split) for s, split in splits.items()},  # 0: no block picked
              "sample": "seeded random samples (seed 0); val is drawn from the train split, disjoint from train",
              "config": asdict(cfg), "alphas": model.alphas, "epochs_done": done, "step": ckpt.get("step"),
              "precision": precision_name(device, args.precision), "normalised_with": stats,
              "headline": head | {"why": HEADLINE_WHY}, "probe_recipe": recipe, "knn": KNN, "layers": rows,
              "seconds": {k: round(v, 1) for k, v in seconds.items()}}
    if out:
        save_json(out, report)
        plot_accuracy([report], os.path.splitext(out)[0] + ".png", f"{schedule_label(cfg)}, {name}")
    return report


def print_comparison(reports):
    print("\nmean pooling, test accuracy %, LP / k-NN; in brackets the difference to the first checkpoint")
    cell = lambda row, first: (f"{row['lp_mean']:5.1f} / {row['knn_mean']:5.1f}",
                               f" ({row['lp_mean'] - first['lp_mean']:+.1f}/{row['knn_mean'] - first['knn_mean']:+.1f})")
    blocks = zip(*(report["layers"] for report in reports))  # each block's row of every report
    print_side_by_side([(block[0]["layer"], [cell(row, block[0]) for row in block]) for block in blocks], 13, 14)
    for i, report in enumerate(reports):
        headline = describe_headline(report["headline"], report["config"]["depth"])
        print(f"  [{i}] {report['label']}{trained_for(report['epochs_done'])}: {report['checkpoint']}\n      {headline}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    paths = [args.checkpoint, *args.compare]
    loaded = [load_model(path) for path in paths]  # all of them, and their blocks checked, before any file is written
    if len({tuple(parse_layers(args.layers, model.config.depth)) for model, _ in loaded}) > 1:
        fail("--compare: the checkpoints have different depths; pass --layers with blocks they all have")
    args.data, args.data_root = data_source(loaded[0][1], args, paths[0])  # every checkpoint is probed on these
    out = writable(args.out or beside(args.checkpoint, "probe_compare.json" if args.compare else "probe.json"))
    note_if_replacing(out, paths)
    alone = None if args.compare else out  # --compare: one file for all
    reports = [probe_checkpoint(path, model, ckpt, args, alone, explain=i == 0)  # the headline's why: once
               for i, (path, (model, ckpt)) in enumerate(zip(paths, loaded))]
    if args.compare:
        print_comparison(reports)
        save_json(out, {"checkpoints": reports})
        plot_accuracy(reports, os.path.splitext(out)[0] + ".png", f"{reports[0]['data']}: mean pooling")


if __name__ == "__main__":
    run_script(main)
