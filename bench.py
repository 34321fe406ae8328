"""How fast pretraining runs: full training steps on a synthetic batch (ours, and the same MAE built from timm's
Block as facebookresearch/mae runs it, when timm is installed), or the data loader alone. Writes nothing.

    python bench.py                                          # CPU: the default preset; CUDA: ViT-B/16
    python bench.py --model vit_b16 --batch-size 256 --compile --steps 30
    python bench.py --loader --data /path/to/imagenet --workers 16
    python bench.py --model vit_b16 --compile --profile                # where a step's time goes, by kernel
"""
import argparse
import os
import time

import torch

import data
import device_data
from common import (COMPILE_MODES, WORKERS, Parser, autocast, default_workers, fail, flops_per_image, fraction,
                    iter_holding_signals, peak_flops, pick_device, positive_int, real, run_script)
from model import MAE, PRESETS, SCHEDULES
from pretrain import CPU_PRESET, SeededItems, model_config, optimizer_and_scaler, optimizer_step


def build_parser():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", help=f"preset: {', '.join(PRESETS)} (default: vit_b16 on CUDA, else {CPU_PRESET})")
    a("--img-size", type=positive_int, help="image side in pixels (default: the preset's)")
    a("--alpha-schedule", default="linear", help=f"{', '.join(SCHEDULES)} (default: linear)")
    a("--alpha-min", type=real(0, 1, low_open=True), default=0.6, help="in (0, 1] (default: 0.6)")
    a("--decay-as-lr", action="store_true", help="the residual encoder with decay's per-layer learning rates")
    a("--decoder-skips", action=argparse.BooleanOptionalAction, default=True, help="default: on")
    a("--mask-ratio", type=fraction, default=0.75, help="in (0, 1) (default: 0.75)")
    a("--batch-size", type=positive_int, help="default: 256 on CUDA, else 128")
    a("--steps", type=positive_int, default=20, help="timed steps or batches (default: 20)")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device name (default: auto)")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile ours (default: on CUDA only)")
    a("--compile-mode", choices=COMPILE_MODES, default="default",
      help="torch.compile mode, a speed lever to time (max-autotune compiles for minutes; default: default)")
    a("--profile", action="store_true", help="then profile a few of our steps: the kernels that take the time")
    a("--loader", action="store_true", help="time the data loader alone (decode + augmentation + mask noise)")
    a("--data", default=data.EMBEDDED, help=f"with --loader: {data.EMBEDDED} (default), a dataset name or an ImageFolder root")
    a("--data-root", default="./data", help="where torchvision datasets live (default: ./data)")
    a("--workers", type=WORKERS, help="with --loader: loader processes (default: 8 on CUDA, else 0)")
    return p


def synchronize(device):  # GPUs run ahead of the host: a timer must wait for them
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timm_reference(cfg):
    """The same MAE with timm's Block, run eagerly under autocast, as facebookresearch/mae does."""
    from functools import partial

    from timm.models.vision_transformer import Block as TimmBlock

    def blocks(dim, heads, n):
        norm = partial(torch.nn.LayerNorm, eps=1e-6)
        return torch.nn.ModuleList(TimmBlock(dim, heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(n))

    model = MAE(cfg)
    model.encoder.blocks = blocks(cfg.width, cfg.heads, cfg.depth)
    model.decoder_blocks = blocks(cfg.decoder_width, cfg.decoder_heads, cfg.decoder_depth)
    return model


def seconds_per_step(model, device, imgs, steps, warmup):
    """Full training steps (the recipe's own AdamW) on one batch already on the device; syncs only around the timing."""
    optimizer, scaler = optimizer_and_scaler(model, 0.05, device)
    for group in optimizer.param_groups:
        group["lr"] = 1e-4 * group.get("lr_scale", 1.0)  # --decay-as-lr: its per-tensor multipliers
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        with autocast(device):
            loss = model(imgs)[0]
        scaler.scale(loss).backward()
        optimizer_step(optimizer, scaler)
    synchronize(device)
    return (time.perf_counter() - start) / steps


# CUDA kernel names by kind, first match wins: Inductor names a fused kernel after the ops in it (a layout copy
# before attention may say "attention"), its matmul templates are "triton_tem_..."; attention kernels may name
# cutlass types; H100 cuBLAS kernels are "nvjet_..." or "sm90_xmma_gemm_...".
INDUCTOR = "fused by Inductor (norms, activations, copies)"
KINDS = (("triton_tem", "matmul"), ("triton", INDUCTOR), *((key, "attention") for key in ("flash", "fmha", "attention", "sdpa")),
         *((key, "matmul") for key in ("gemm", "nvjet", "xmma", "cutlass", "cublas")), ("adam", "optimizer"))


def time_by_kind(kernels):
    """{kind: seconds} from (kernel name, seconds) pairs."""
    by_kind = {}
    for name, seconds in kernels:
        kind = next((kind for key, kind in KINDS if key in name.lower()), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds
    return by_kind


def describe_kinds(by_kind, step_seconds, flops_per_step, peak):
    busy, dense = sum(by_kind.values()), by_kind.get("matmul", 0.0) + by_kind.get("attention", 0.0)
    lines = [f"  GPU time by kind of kernel, per step: {busy * 1e3:.1f} ms busy in a {step_seconds * 1e3:.1f} ms step "
             "(the step as timed above, without the profiler)"]
    lines += [f"    {kind:<48} {seconds * 1e3:8.2f} ms {seconds / busy:6.1%}"
              for kind, seconds in sorted(by_kind.items(), key=lambda item: -item[1])]
    if peak and dense:
        lines.append(f"  matmul and attention kernels alone would run at {flops_per_step / dense / peak:.1%} MFU: "
                     "the ceiling if every other kernel took no time")
    return lines


def profile_steps(model, device, imgs, step_seconds, flops_per_step, peak, rows=15):
    """Our kernels ranked by their own time over 3 steps (after the timed ones, so compiling is done); on CUDA
    also that time by kind of kernel (time_by_kind)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler library's start-up chatter (read when it starts)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        seconds_per_step(model, device, imgs, steps=3, warmup=0)
    events = prof.key_averages()
    print(events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    if cuda:  # kernel rows only: an op's row repeats the time of the kernels it launched
        kernels = [(e.key, e.self_device_time_total / 3e6) for e in events if e.device_type == DeviceType.CUDA]
        print("\n".join(describe_kinds(time_by_kind(kernels), step_seconds, flops_per_step, peak)))


def bench_steps(args, cfg, device):
    """{label: images per second} for ours and, if timm is installed, the timm-Block reference."""
    imgs = torch.randn(args.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    flops, peak = 3 * flops_per_image(cfg, cfg.mask_ratio), peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} ({torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)})"
    print(f"bench: {name}, {args.model}, batch {args.batch_size}, mask {cfg.mask_ratio}, skips {cfg.decoder_skips}, "
          f"{flops / 1e9:.3g} GFLOPs per image per step (forward {flops / 3e9:.3g})")
    ours = MAE(cfg)
    label = "ours " + (f"compiled ({args.compile_mode})" if args.compile else "eager")
    variants = [(label, torch.compile(ours, mode=args.compile_mode) if args.compile else ours)]
    try:
        variants.append(("timm Block, eager", timm_reference(cfg)))
    except ImportError:
        print("  (timm not installed: pip install timm to time the timm-based reference too)")
    results = {}
    for label, model in variants:  # one on the device at a time, so that each peak memory is its own
        model.to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sec = seconds_per_step(model, device, imgs, args.steps, warmup=10 if args.compile else 3)
        img_s = args.batch_size / sec
        mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a (CPU)"
        mfu = f"{flops * img_s / peak:6.1%}" if peak else "   n/a"
        results[label] = img_s
        print(f"  {label:<30} {sec * 1e3:9.1f} ms/step {img_s:10.1f} img/s  mfu {mfu}  peak mem {mem}")
        if args.profile and label == variants[0][0]:
            profile_steps(model, device, imgs, sec, flops * args.batch_size, peak)
        model.to("cpu")
    if len(results) == 2:
        first, second = results.values()
        print(f"  ratio ours / timm reference: {first / second:.2f}x")
    return results


def bench_loader(args, cfg, device):
    try:
        train_set = data.get_dataset(args.data, "pretrain", cfg.img_size, train_aug=True, root=args.data_root)
    except data.DataError as e:
        fail(str(e))
    workers = default_workers(device) if args.workers is None else args.workers
    items = SeededItems(train_set, 0, (cfg.img_size // cfg.patch_size) ** 2)
    loader = torch.utils.data.DataLoader(items, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True)
    if len(loader) < 2:
        fail(f"--loader needs at least 2 batches of {args.batch_size} images; {args.data} has {len(train_set)}")
    batches = iter_holding_signals(loader)
    next(batches)  # workers start
    start = time.perf_counter()
    n = sum(len(next(batches)[0]) for _ in range(min(args.steps, len(loader) - 1)))
    img_s = n / (time.perf_counter() - start)
    print(f"bench loader: {args.data}, {workers} workers, batch {args.batch_size}: {img_s:.0f} img/s "
          f"(decode + augmentation + mask noise)")
    if args.data in data.DATASETS:  # in memory: the device path beside it (pretrain.py's default on CUDA)
        fast, index = device_data.DeviceBatches(train_set, data.MEAN_STD[args.data], cfg.img_size, device), torch.arange(args.batch_size)
        fast.batch(index, 0, 0, 0, items.n_patches)
        synchronize(device)
        start = time.perf_counter()
        for micro in range(1, args.steps + 1):
            fast.batch(index, 0, 0, micro, items.n_patches)
        synchronize(device)
        fast_s = args.steps * args.batch_size / (time.perf_counter() - start)
        print(f"bench device path (--device-data) on {device}: {fast_s:.0f} img/s, {fast_s / img_s:.1f}x the loader")
    return img_s


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    cuda, embedded = device.type == "cuda", args.data == data.EMBEDDED
    if args.model is None:  # steps (synthetic data): ViT-B/16 on CUDA; the loader: pretrain.py's model for the data (its image size)
        args.model = (CPU_PRESET if embedded else "vit_b16") if args.loader else ("vit_b16" if cuda else CPU_PRESET)
    if args.batch_size is None:
        args.batch_size = 256 if cuda else 128
    if args.compile is None:
        args.compile = cuda
    cfg = model_config(args)
    return bench_loader(args, cfg, device) if args.loader else bench_steps(args, cfg, device)


if __name__ == "__main__":
    run_script(main)
