"""How much the encoder's precision moves rank.py's numbers: each block's ranks in fp32 (what rank.py measures)
and under bf16 autocast (what probe.py and pretrain.py run on CUDA), on the same images.

    python results/rank_precision.py out_none/ckpt.pt out/ckpt.pt    # about 45 s per checkpoint on 2 CPU cores

bf16 autocast works on the CPU too, so no GPU is needed. Writes results/precision/rank_<name>.json per checkpoint,
with <name> its folder's name, and its file's stem where that is not ckpt (--out to move it). For the linear
probe, probe.py's own --precision does it.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import probe  # noqa: E402
import rank  # noqa: E402
from common import non_negative_int, pick_device, save_json  # noqa: E402

COLUMNS = ("cls", "mean", "tokens")


def compare(path, device, n, n_tokens, batch_size):
    model, ckpt = probe.load_model(path)
    name, root = probe.data_source(ckpt, argparse.Namespace(data=None, data_root=None), path)
    images = probe.get_split(name, "test", model.config.img_size, root, n, stats=probe.input_stats(ckpt))
    loader = probe.make_loader(images, batch_size, device, workers=0)
    fp32, _ = rank.rank_profile(model, loader, device, n_tokens)
    bf16, _ = rank.rank_profile(model, loader, device, n_tokens, dtype=torch.bfloat16)
    rows = [{"layer": a["layer"], **{f"{c}_fp32": a[c] for c in COLUMNS}, **{f"{c}_bf16": b[c] for c in COLUMNS}}
            for a, b in zip(fp32, bf16)]
    return {"checkpoint": path, "label": probe.schedule_label(model.config), "data": name, "n_images": len(images),
            "n_token_images": n_tokens, "device": str(device), "layers": rows}


def name_of(path):
    """The checkpoint's folder, and its file's stem where that is not ckpt: out_none/ckpt.pt -> out_none,
    runs/none/ckpt_epoch010.pt -> none_ckpt_epoch010."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    stem = os.path.splitext(os.path.basename(path))[0]
    return folder if stem == "ckpt" else f"{folder}_{stem}"


def print_table(result):
    print(f"{result['checkpoint']} ({result['label']}), {result['n_images']} test images on {result['device']}: "
          "effective rank in fp32 -> under bf16 autocast")
    print(f"{'block':>5}" + "".join(f"  {c:>22}" for c in COLUMNS))
    for r in result["layers"]:
        cells = [f"{r[c + '_fp32']:.2f} -> {r[c + '_bf16']:.2f} ({r[c + '_bf16'] / r[c + '_fp32'] - 1:+.1%})"
                 for c in COLUMNS]
        print(f"{r['layer']:>5}" + "".join(f"  {cell:>22}" for cell in cells))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    defaults = rank.build_parser()
    p.add_argument("--n", type=non_negative_int, default=defaults.get_default("n"),
                   help="test images, 0 = all (rank.py's default %(default)s)")
    p.add_argument("--n-tokens", type=non_negative_int, default=defaults.get_default("n_tokens"),
                   help="images whose token matrices are ranked (rank.py's default %(default)s)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "precision"))
    args = p.parse_args()
    device = pick_device("auto")
    for path in args.checkpoints:
        result = compare(path, device, args.n, args.n_tokens, 256)
        print_table(result)
        save_json(os.path.join(args.out, f"rank_{name_of(path)}.json"), result)


if __name__ == "__main__":
    main()
