"""Every stage, checked against independent references on CPU.  python -m pytest -q test_all.py"""
import math

import pytest
import torch
import torch.nn.functional as F

import model as M

torch.set_num_threads(2)


def tiny(**overrides):
    """A small 32 px MAE that still has 12 blocks, so depth schedules are exercised."""
    base = dict(img_size=32, patch_size=8, width=32, depth=12, heads=2, decoder_width=32, decoder_depth=2,
                decoder_heads=2)
    return M.MAEConfig(**{**base, **overrides})


def randomise(model, seed=0):
    """Zero-initialised branches make many checks trivial: give every parameter a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


# ----------------------------------------------------------------------------- alpha

def test_alpha_matches_spec_numbers_for_vit_b():
    a = M.encoder_alphas(12, "linear", 0.6)
    assert len(a) == 24
    # 1 - 0.4 * k / 23 by hand: k=1 -> 0.98261, k=22 -> 0.61739
    assert (round(a[0], 3), round(a[1], 3)) == (1.000, 0.983)
    assert (round(a[-2], 3), round(a[-1], 3)) == (0.617, 0.600)
    assert a[0] == 1.0 and abs(a[-1] - 0.6) < 1e-12
    assert math.prod(a) == pytest.approx(3.6e-3, rel=0.05)  # SPEC: total decay 3.6e-3 at alpha_min 0.6


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exp", "step"])
@pytest.mark.parametrize("alpha_min", [0.3, 0.6, 1.0])
def test_alpha_endpoints_and_monotone(schedule, alpha_min):
    ts = [i / 100 for i in range(101)]
    values = [M.alpha(t, schedule, alpha_min) for t in ts]
    assert values[0] == 1.0 and values[-1] == pytest.approx(alpha_min)
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))


def test_alpha_none_is_the_residual_baseline():
    assert all(M.alpha(t / 10, "none", 0.5) == 1.0 for t in range(11))


@pytest.mark.parametrize("schedule,alpha_min,needle", [("linaer", 0.6, "linear, cosine"), ("linear", 0.0, "(0, 1]"),
                                                        ("linear", 1.2, "(0, 1]"), ("exp", -1, "(0, 1]")])
def test_alpha_rejects_bad_input(schedule, alpha_min, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("]", r"\]")):
        M.alpha(0.5, schedule, alpha_min)


def test_alphas_placed_per_sub_layer_and_not_in_state_dict():
    model = M.MAE(tiny(alpha_schedule="linear", alpha_min=0.7))
    a = model.alphas
    assert a == pytest.approx([1 - 0.3 * k / 23 for k in range(24)], abs=1e-12)
    assert [(b.a_attn, b.a_mlp) for b in model.encoder.blocks] == list(zip(a[::2], a[1::2]))
    assert all((b.a_attn, b.a_mlp) == (1.0, 1.0) for b in model.decoder_blocks)
    assert not any("alpha" in k or k.endswith(".a_attn") for k in model.state_dict())


# ----------------------------------------------------------------------------- patches, masks, loss

def test_patchify_round_trip_and_layout():
    imgs = torch.randn(2, 3, 32, 32)
    patches = M.patchify(imgs, 8)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    assert torch.equal(M.unpatchify(patches, 8), imgs)
    # patch 1 is row 0, columns 8..15; inside it pixels run (row, column, colour)
    assert torch.equal(patches[0, 1].view(8, 8, 3), imgs[0, :, 0:8, 8:16].permute(1, 2, 0))


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.6, 0.9])
def test_mask_hides_exact_count_and_encoder_sees_the_rest(ratio):
    model = M.MAE(tiny())
    n = 16
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    _, pred, mask = model(torch.randn(3, 3, 32, 32), mask_ratio=ratio)
    assert (mask.sum(dim=1) == int(n * ratio)).all()
    assert seen[0] == (3, 1 + n - int(n * ratio), 32)
    assert pred.shape == (3, n, 8 * 8 * 3)


def test_mask_follows_the_noise_given():
    noise = torch.rand(2, 16)
    _, _, mask = M.MAE(tiny())(torch.randn(2, 3, 32, 32), mask_ratio=0.75, noise=noise)
    hidden_by_rank = noise.argsort(dim=1)[:, 4:]  # the 12 largest noise values are hidden
    assert torch.equal(mask.gather(1, hidden_by_rank), torch.ones(2, 12))


def test_loss_ignores_visible_patches():
    model = M.MAE(tiny())
    imgs, pred = torch.randn(2, 3, 32, 32), torch.randn(2, 16, 192)
    mask = torch.zeros(2, 16)
    mask[:, ::3] = 1
    changed = M.patchify(imgs, 8).clone()
    changed[mask == 0] += torch.randn_like(changed[mask == 0]) * 5
    before = model.loss(imgs, pred, mask)
    after = model.loss(M.unpatchify(changed, 8), pred, mask)
    assert torch.allclose(before, after)
    # and by hand: mean over hidden patches of the squared error to per-patch normalised pixels
    target = M.patchify(imgs, 8)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    by_hand = ((pred - target) ** 2).mean(-1)[mask == 1].mean()
    assert torch.allclose(before, by_hand)


# ----------------------------------------------------------------------------- blocks and encoder

@pytest.mark.parametrize("schedule", ["linear", "exp", "step"])
def test_zero_initialised_block_scales_its_input(schedule):
    model = M.MAE(tiny(alpha_schedule=schedule, alpha_min=0.6))
    x = torch.randn(2, 5, 32)
    for block in model.encoder.blocks:
        assert torch.allclose(block(x), block.a_attn * block.a_mlp * x, atol=1e-6)


def plain_vit(imgs, sd, depth, heads, patch):
    """An independent pre-norm ViT: reshape/permute, explicit softmax attention, weights from a state_dict."""
    b, c, hgt, wid = imgs.shape
    g = hgt // patch
    x = imgs.reshape(b, c, g, patch, g, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, patch * patch * c)
    x = x @ sd["encoder.patch_embed.weight"].T + sd["encoder.patch_embed.bias"]
    d = x.shape[-1]
    pos = M.sincos_pos_embed(d, g)
    x = torch.cat([sd["encoder.cls_token"].expand(b, 1, d), x + pos], dim=1)
    for i in range(depth):
        w = lambda name: sd[f"encoder.blocks.{i}.{name}"]
        h = F.layer_norm(x, (d,), w("norm1.weight"), w("norm1.bias"), eps=1e-6)
        qkv = (h @ w("attn.qkv.weight").T + w("attn.qkv.bias")).reshape(b, -1, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        h = (att @ v).transpose(1, 2).reshape(b, -1, d)
        x = x + h @ w("attn.proj.weight").T + w("attn.proj.bias")
        h = F.layer_norm(x, (d,), w("norm2.weight"), w("norm2.bias"), eps=1e-6)
        h = F.gelu(h @ w("mlp.fc1.weight").T + w("mlp.fc1.bias"))
        x = x + h @ w("mlp.fc2.weight").T + w("mlp.fc2.bias")
    return F.layer_norm(x, (d,), sd["encoder.norm.weight"], sd["encoder.norm.bias"], eps=1e-6)


def test_encoder_with_no_decay_equals_a_plain_vit():
    model = randomise(M.MAE(tiny(alpha_schedule="none", decoder_skips=False))).eval()
    imgs = torch.randn(2, 3, 32, 32)
    ours = model.features(imgs)[-1]
    ref = plain_vit(imgs, model.state_dict(), depth=12, heads=2, patch=8)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_decay_changes_the_encoder():
    """Same weights, linear decay: the output must differ from the plain ViT (the test above can fail)."""
    plain = randomise(M.MAE(tiny(alpha_schedule="none")))
    decayed = M.MAE(tiny(alpha_schedule="linear", alpha_min=0.6))
    decayed.load_state_dict(plain.state_dict())
    imgs = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(plain.features(imgs)[-1], decayed.features(imgs)[-1], atol=1e-3)


@pytest.mark.parametrize("skips", [True, False])
def test_decoder_reads_encoder_and_trains(skips):
    model = randomise(M.MAE(tiny(decoder_skips=skips)))
    imgs = torch.randn(2, 3, 32, 32)
    loss, _, _ = model(imgs)
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters outside the graph break DDP: {unused}"
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_features_one_per_block_last_after_norm():
    model = randomise(M.MAE(tiny()))
    feats = model.features(torch.randn(2, 3, 32, 32))
    assert len(feats) == 12 and all(f.shape == (2, 17, 32) for f in feats)
    ln = model.encoder.norm
    assert torch.allclose(feats[-1], ln(model.encoder.blocks[-1](feats[-2])), atol=1e-5)


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip(tmp_path):
    model = randomise(M.MAE(tiny(alpha_schedule="cosine", alpha_min=0.7)))
    path = tmp_path / "ckpt.pt"
    torch.save(model.checkpoint(step=3), path)
    ckpt = torch.load(path, weights_only=True)
    assert isinstance(ckpt["config"], dict) and ckpt["step"] == 3
    again = M.MAE.from_checkpoint(str(path))
    assert again.config == model.config and again.alphas == model.alphas
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    assert torch.equal(model(imgs, noise=noise)[1], again(imgs, noise=noise)[1])


def timm_layout(model):
    """The encoder's weights as timm / facebookresearch-mae name them: conv patch embedding, pos_embed."""
    cfg, sd = model.config, model.encoder.state_dict()
    p, c = cfg.patch_size, cfg.in_chans
    out = {k: v.clone() for k, v in sd.items() if not k.startswith("patch_embed")}
    out["patch_embed.proj.weight"] = sd["patch_embed.weight"].view(cfg.width, p, p, c).permute(0, 3, 1, 2).clone()
    out["patch_embed.proj.bias"] = sd["patch_embed.bias"].clone()
    out["pos_embed"] = model.encoder.pos_embed.clone()
    return out


def test_timm_layout_state_dict_loads_and_matches():
    source = randomise(M.MAE(tiny(alpha_schedule="none", decoder_skips=False, heads=2, width=128,
                                  decoder_width=32))).eval()
    state = timm_layout(source)
    # a conv with stride p over the image equals our Linear on patches: check the layout conversion by hand
    imgs = torch.randn(2, 3, 32, 32)
    conv = F.conv2d(imgs, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=8)
    assert torch.allclose(conv.flatten(2).transpose(1, 2), source.encoder.patch_embed(M.patchify(imgs, 8)), atol=1e-5)
    loaded = M.MAE.from_checkpoint({"model": state})
    assert loaded.config.img_size == 32 and loaded.config.patch_size == 8 and loaded.config.heads == 2
    for a, b in zip(source.features(imgs), loaded.features(imgs)):
        assert torch.allclose(a, b, atol=1e-6)


def test_timm_layout_with_wrong_keys_names_them():
    state = timm_layout(M.MAE(tiny(width=128, heads=2)))
    del state["blocks.3.norm1.weight"]
    state["head.weight"] = torch.zeros(10, 128)
    with pytest.raises(ValueError, match=r"blocks\.3\.norm1\.weight.*head\.weight"):
        M.MAE.from_checkpoint(state)


def test_vit_b16_forward_backward_and_parameter_count():
    cfg = M.preset("vit_b16")
    model = M.MAE(cfg)
    # ViT-B/16 without classifier head, by hand:
    #   patch embedding 16*16*3*768 + 768 = 590,592; cls token 768
    #   per block: qkv 768*2304+2304 + proj 768*768+768 + fc1 768*3072+3072 + fc2 3072*768+768 + 2 norms 4*768
    #              = 1,771,776 + 590,592 + 2,362,368 + 2,360,064 + 3,072 = 7,087,872; x 12 = 85,054,464
    #   final norm 1,536.  Total 85,647,360 (timm's vit_base_patch16_224: 86,567,656 less the 1000-way head
    #   769,000 and the 151,296 positional values that are a fixed buffer here).
    assert sum(p.numel() for p in model.encoder.parameters()) == 85_647_360
    loss, pred, mask = model(torch.randn(1, 3, 224, 224))
    loss.backward()
    assert pred.shape == (1, 196, 768) and mask.sum() == 147
    assert torch.isfinite(loss) and model.encoder.patch_embed.weight.grad is not None


@pytest.mark.parametrize("bad,needle", [(dict(img_size=30), "divisible"), (dict(mask_ratio=1.0), "mask ratio"),
                                        (dict(alpha_schedule="cos"), "choose one of"), (dict(alpha_min=0), "alpha_min")])
def test_config_rejects_bad_values(bad, needle):
    with pytest.raises(ValueError, match=needle):
        tiny(**bad)


# ----------------------------------------------------------------------------- data

import json
import os
import subprocess
import sys

import numpy as np

import data
import pretrain

HERE = os.path.dirname(os.path.abspath(__file__))


def run(script, *args, check=True, env=None, timeout=300):
    """Run a stage through its real command line, as a user would."""
    result = subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)], capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=HERE)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def test_shapes_are_deterministic_balanced_and_split():
    train_x, train_y = data.make_shapes("train")
    test_x, test_y = data.make_shapes("test")
    assert train_x.shape == (50_000, 32, 32, 3) and train_x.dtype == np.uint8
    assert test_x.shape == (10_000, 32, 32, 3)
    assert np.bincount(train_y).tolist() == [5_000] * 10 and np.bincount(test_y).tolist() == [1_000] * 10
    again_x, again_y = data._generate_shapes("test", 0)  # bypasses every cache
    assert np.array_equal(again_x, test_x) and np.array_equal(again_y, test_y)
    other_x, _ = data._generate_shapes("test", 1)
    assert not np.array_equal(other_x, test_x)
    assert not any(np.array_equal(train_x[i], test_x[0]) for i in range(1000))


def write_png_folder(root, n_per_class=6, size=40, corrupt=0):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            os.makedirs(os.path.join(root, split, cls))
            for i in range(n_per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, cls, f"{i}.png"))
    for i in range(corrupt):
        with open(os.path.join(root, "train", "cat", f"broken{i}.png"), "wb") as f:
            f.write(b"not a png")
    return root


def test_image_folder_loads_with_both_transforms(tmp_path):
    root = write_png_folder(str(tmp_path / "imgs"))
    train = data.get_dataset(root, "pretrain", 32, train_aug=True)
    test = data.get_dataset(root, "test", 32, train_aug=False)
    assert len(train) == 12 and len(test) == 12 and data.num_classes(root) == 2
    img, label = test[7]
    assert img.shape == (3, 32, 32) and label == 1
    # evaluation: resize to 36 then centre crop 32, normalised with ImageNet statistics, checked by hand
    from PIL import Image
    pil = Image.open(sorted(os.path.join(root, "val", "dog", f) for f in os.listdir(os.path.join(root, "val", "dog")))[1])
    ref = torch.from_numpy(np.array(pil.resize((36, 36), Image.BICUBIC))[2:34, 2:34]).permute(2, 0, 1) / 255
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in data.MEAN_STD["imagenet"])
    assert (img - (ref - mean) / std).abs().mean() < 0.05


# ----------------------------------------------------------------------------- pretraining recipe

def test_lr_schedule_shape():
    peak, warm, total = 1e-3, 10, 110
    lrs = [pretrain.lr_at(s, total, warm, peak) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warm) and lrs[0] > 0  # never 0 on the first step
    assert lrs[warm - 1] == pytest.approx(peak)
    assert all(a < b for a, b in zip(lrs[:warm - 1], lrs[1:warm]))  # linear warm-up
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # then falling
    assert lrs[warm + 50] == pytest.approx(peak / 2)  # half-way through the cosine: half the peak
    assert pretrain.lr_at(total, total, warm, peak) == pytest.approx(0, abs=1e-12)


def test_weight_decay_groups():
    model = M.MAE(tiny())
    decay, no_decay = pretrain.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "encoder.blocks.0.attn.qkv.weight" in decayed and "decoder_pred.weight" in decayed
    assert all(n.endswith(".bias") or "norm" in n for n in plain) and "encoder.norm.weight" in plain
    assert len(decayed) + len(plain) == len(names)


def test_flops_match_the_vit_b16_count():
    # ViT-B/16, plain MAE decoder, mask 0.75: about 19.6 GFLOPs forward (issue 6's reference figure)
    cfg = M.preset("vit_b16", decoder_skips=False)
    assert pretrain.flops_per_image(cfg, 0.75) / 1e9 == pytest.approx(19.6, abs=0.1)


def test_pretrain_loss_falls_and_checkpoint_loads(tmp_path):
    out = tmp_path / "run"
    result = run("pretrain.py", "--model", "vit_p4_32", "--max-steps", 40, "--batch-size", 64, "--blr", 5e-3,
                 "--log-every", 10, "--out-dir", out)
    assert "vit_p4_32" in result.stdout and "img/s" in result.stdout
    losses = [json.loads(line)["loss"] for line in open(out / "log.jsonl")]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.005, losses
    model = M.MAE.from_checkpoint(str(out / "ckpt.pt"))
    assert model.config.alpha_schedule == "linear" and model.config.width == 64
    assert (out / "recon_epoch001.png").exists()


def test_image_folder_pretraining_runs_and_skips_corrupt_files(tmp_path):
    root = write_png_folder(str(tmp_path / "imgs"), corrupt=2)
    result = run("pretrain.py", "--model", "vit_p4_32", "--data", root, "--epochs", 1, "--batch-size", 14,
                 "--out-dir", tmp_path / "run")
    assert "skipped 1 unreadable image" in result.stderr  # 14 files, 2 broken: the one epoch meets them
    assert M.MAE.from_checkpoint(str(tmp_path / "run" / "ckpt.pt")).config.img_size == 32


def test_keep_every_keeps_epoch_snapshots(tmp_path):
    root = write_png_folder(str(tmp_path / "imgs"))  # 12 training images: 3 steps of 4 per epoch
    run("pretrain.py", "--model", "vit_p4_32", "--data", root, "--epochs", 4, "--batch-size", 4, "--keep-every", 2,
        "--out-dir", tmp_path / "run")
    kept = sorted(f.name for f in (tmp_path / "run").glob("ckpt_epoch*.pt"))
    assert kept == ["ckpt_epoch002.pt", "ckpt_epoch004.pt"]
    assert torch.load(tmp_path / "run" / kept[0], weights_only=True)["step"] == 6
    last, final = (torch.load(tmp_path / "run" / f, weights_only=True) for f in (kept[1], "ckpt.pt"))
    assert all(torch.equal(last["model"][k], final["model"][k]) for k in final["model"])


def load_weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_two_process_ddp_matches_one_process(tmp_path):
    common = ["--model", "vit_p4_32", "--max-steps", 1, "--batch-size", 16, "--blr", 1e-3, "--warmup-epochs", 0]
    run("pretrain.py", *common, "--out-dir", tmp_path / "one")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29517", "pretrain.py", *map(str, common), "--out-dir", str(tmp_path / "two")],
                            capture_output=True, text=True, timeout=300, cwd=HERE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    one, two = load_weights(tmp_path / "one" / "ckpt.pt"), load_weights(tmp_path / "two" / "ckpt.pt")
    start = M.MAE(M.preset("vit_p4_32")).state_dict()
    # Same global batch, same masks: the all-reduced gradient equals the one-process gradient up to the order
    # of float additions. Adam's first step moves each weight by about lr (1.25e-3 * 16 / 256... = 6e-5 here);
    # 1e-7 allows rounding and catches a wrong batch split, a missing average, or different masks.
    moved = max((one[k] - start[k]).abs().max().item() for k in one if k in start and "token" not in k)
    assert moved > 1e-6
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-7), k


# ----------------------------------------------------------------------------- reliability

import signal
import time


def test_killed_run_resumes_to_identical_weights(tmp_path):
    flags = ["--model", "vit_p4_32", "--max-steps", 16, "--batch-size", 16, "--save-every", 3, "--blr", 2e-3,
             "--log-every", 1]
    run("pretrain.py", *flags, "--out-dir", tmp_path / "whole")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "pretrain.py", *map(str, flags), "--out-dir", str(out)], cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "ckpt.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill as soon as a mid-run checkpoint lands
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 6 <= killed_at < 16
    result = run("pretrain.py", "--resume", "--out-dir", out, "--log-every", 1)
    assert f"resuming at step {killed_at}" in result.stdout
    whole, resumed = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True), torch.load(ckpt, weights_only=True)
    assert resumed["step"] == whole["step"] == 16
    for k in whole["model"]:
        assert torch.equal(whole["model"][k], resumed["model"][k]), k  # bit for bit
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert steps == list(range(1, 17))  # the log keeps one line per step, none lost or repeated


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    pretrain.save_atomic({"step": 1}, path)

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left on device.*previous checkpoint is unchanged"):
        pretrain.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    run("pretrain.py", "--model", "vit_p4_32", "--max-steps", 2, "--batch-size", 8, "--out-dir", out)
    before = (out / "ckpt.pt").read_bytes()
    result = run("pretrain.py", "--model", "vit_p4_32", "--max-steps", 30, "--batch-size", 8, "--blr", 1e12,
                 "--warmup-epochs", 0, "--out-dir", out, check=False)
    assert result.returncode == 1
    assert "non-finite at step" in result.stderr and "lr" in result.stderr and "untouched" in result.stderr
    assert (out / "ckpt.pt").read_bytes() == before


def snapshot(root):
    """Every file under root with its bytes: to prove a refused command wrote nothing."""
    return {os.path.join(d, f): open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(root) for f in fs}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    run("pretrain.py", "--model", "vit_p4_32", "--max-steps", 2, "--batch-size", 8, "--out-dir", out / "run")
    return out


PRETRAIN, PROBE, RANK = "pretrain.py", "probe.py", "rank.py"
BAD_INPUTS = [  # (script, arguments, words the one-line message must hold); {run} is a finished run's folder
    (PRETRAIN, "--alpha-schedule linaer", "unknown alpha schedule 'linaer'; choose one of none, linear"),
    (PRETRAIN, "--alpha-min 1.5", "alpha_min must be in (0, 1]"),
    (PRETRAIN, "--alpha-min 0", "alpha_min must be in (0, 1]"),
    (PRETRAIN, "--img-size 30", "image size 30 is not divisible by patch size 4"),
    (PRETRAIN, "--mask-ratio 1.0", "mask ratio must be in (0, 1)"),
    (PRETRAIN, "--model vit_x", "unknown model preset 'vit_x'; choose one of vit_b16"),
    (PRETRAIN, "--data imagenett", "unknown dataset 'imagenett'"),
    (PRETRAIN, "--data {tmp}/nowhere", "missing or empty data folder"),
    (PRETRAIN, "--data {tmp}/empty", "missing or empty data folder"),
    (PRETRAIN, "--resume {tmp}/nowhere.pt", "checkpoint {tmp}/nowhere.pt does not exist"),
    (PRETRAIN, "--resume {tmp}/notes.txt", "is not a checkpoint"),
    (PRETRAIN, "--resume --out-dir {run} --alpha-min 0.7", "flags do not fit the checkpoint"),
    (PRETRAIN, "--resume --out-dir {tmp}/fresh", "nothing to resume in {tmp}/fresh"),
    (PRETRAIN, "--out-dir {tmp}/notes.txt/sub", "cannot write to --out-dir"),
    (PRETRAIN, "--batch-size 1 --env-world 2", "batch size 1 must be a positive multiple of the 2 processes"),
    (PRETRAIN, "--epochs zero", "invalid int value"),
    (PRETRAIN, "--keep-every -1", "--save-every and --keep-every at least 0"),
    (PRETRAIN, "--device cuda:0", "--device cuda:0"),
    (PRETRAIN, "--bench-data --batch-size 40000", "--bench-data needs at least 2 batches of 40000 images"),
    (PROBE, "{tmp}/nowhere.pt", "checkpoint {tmp}/nowhere.pt does not exist"),
    (PROBE, "{tmp}/notes.txt", "is not a checkpoint"),
    (PROBE, "{run}/ckpt.pt --layers 0,13", "--layers"),
    (PROBE, "{run}/ckpt.pt --data imagenett", "unknown dataset"),
    (RANK, "{tmp}/nowhere.pt", "checkpoint {tmp}/nowhere.pt does not exist"),
    (RANK, "{tmp}/notes.txt", "is not a checkpoint"),
    (RANK, "{run}/ckpt.pt --data {tmp}/empty", "missing or empty data folder"),
    (RANK, "{run}/ckpt.pt --n -5", "--n"),
]


@pytest.mark.parametrize("script,arguments,needle", BAD_INPUTS, ids=[f"{s}:{a}" for s, a, _ in BAD_INPUTS])
def test_bad_input_gets_one_clear_line(script, arguments, needle, finished_run):
    if "cuda" in arguments and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    tmp = finished_run
    os.makedirs(tmp / "empty" / "train", exist_ok=True)
    (tmp / "notes.txt").write_text("not a checkpoint")
    fill = lambda text: text.format(tmp=tmp, run=tmp / "run")
    args, env = fill(arguments).split(), {}
    if "--env-world" in args:  # what torchrun would set for 2 processes; refused before any process group starts
        args = args[:args.index("--env-world")]
        env = dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")
    before = snapshot(tmp)
    result = run(script, *args, check=False, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert fill(needle) in lines[0]
    assert snapshot(tmp) == before




# ----------------------------------------------------------------------------- evaluation: probe.py and rank.py

import probe
import rank


def test_effective_rank_hand_computed_cases():
    assert rank.effective_rank(torch.eye(6)) == pytest.approx(6)  # all singular values equal: full rank
    u, v = torch.randn(50, 1), torch.randn(1, 30)
    assert rank.effective_rank(u @ v) == pytest.approx(1, abs=1e-9)  # rank one
    q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    for k in (2, 5, 17):  # k equal singular values and the rest zero: exactly k
        assert rank.effective_rank(q[:, :k] @ q[:k, :]) == pytest.approx(k, rel=1e-9)
    x = torch.randn(100, 20)
    assert rank.effective_rank(x * 1000) == pytest.approx(rank.effective_rank(x), rel=1e-9)  # scale-free
    # two singular values 3 and 1: p = (3/4, 1/4), erank = exp(-(3/4 ln 3/4 + 1/4 ln 1/4)) = 1.7548...
    assert rank.effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(1.75476, abs=1e-5)
    s = torch.linalg.svdvals(x.double())
    p = s / s.sum()
    assert rank.effective_rank(x) == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-9)


def clusters(n_per_class, n_classes, dim, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def test_knn_on_separable_clusters():
    train_x, train_y = clusters(30, 5, 16, 0.3, seed=1)
    test_x, test_y = clusters(10, 5, 16, 0.3, seed=2)
    assert probe.knn_accuracy(train_x, train_y, test_x, test_y, k=20, t=0.07, chunk=7) == 100.0
    # a k-NN vote can fail: labels shuffled against the features give chance, not 100
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))]
    assert probe.knn_accuracy(train_x, shuffled, test_x, test_y) < 60


def test_linear_probe_on_linearly_separable_features():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 4, generator=g)

    def sample(n):  # labels from a linear map, keeping only points with a margin between the top two scores
        x = torch.randn(8 * n, 32, generator=g)
        top2 = (x @ w).topk(2, dim=1).values
        x = x[top2[:, 0] - top2[:, 1] > 2.0][:n]
        return x, (x @ w).argmax(1)

    (train_x, train_y), (test_x, test_y) = sample(3000), sample(1000)
    noise_train, noise_test = torch.randn(len(train_x), 32, generator=g), torch.randn(len(test_x), 32, generator=g)
    accs = probe.train_linear_probes(torch.stack([train_x, noise_train]), train_y,
                                     torch.stack([test_x, noise_test]), test_y, n_classes=4)
    assert accs[0] >= 99.0, accs
    assert accs[1] < 40, accs  # a head on noise stays near chance (25%): heads do not leak into each other


def test_probe_and_rank_end_to_end(finished_run):
    ckpt = finished_run / "run" / "ckpt.pt"
    out = run(PROBE, ckpt, "--n-train", 200, "--n-test", 100, "--epochs", 3, "--layers", "1,12").stdout
    result = json.load(open(finished_run / "run" / "probe.json"))
    assert [r["layer"] for r in result["layers"]] == [1, 12] and result["n_test"] == 100
    assert result["headline"]["pooling"] in out and "k-NN" in out
    assert all(0 <= r["lp_mean"] <= 100 and 0 <= r["knn_cls"] <= 100 for r in result["layers"])
    out = run(RANK, ckpt, "--n", 64, "--n-tokens", 8, "--compare", ckpt).stdout
    result = json.load(open(finished_run / "run" / "rank.json"))
    layers = result["checkpoints"][0]["layers"]
    assert len(layers) == 12 and "linear" in out and "0.600" in out  # the schedule is shown
    assert all(1 <= r["mean"] <= 64 for r in layers)


def test_public_weights_path(tmp_path):
    # heads = width / 64 when a state_dict does not say, as for the public ViT-B/16 (768 / 64 = 12)
    source = randomise(M.MAE(M.preset("vit_p4_32", width=128, heads=2, alpha_schedule="none", decoder_skips=False)))
    state = timm_layout(source)  # a ViT state_dict as mae_pretrain_vit_base.pth holds it
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": state}, path)
    out = run(PROBE, path, "--data", "shapes", "--n-train", 100, "--n-test", 50, "--epochs", 2, "--layers", 12).stdout
    assert "schedule none" in out
    result = run(PROBE, path, check=False)
    assert result.returncode == 2 and "--data" in result.stderr
    run(RANK, path, "--data", "shapes", "--n", 32, "--n-tokens", 4)


# ----------------------------------------------------------------------------- benchmark

def test_bench_smoke(tmp_path):
    out = run(PRETRAIN, "--bench", "--model", "vit_p4_32", "--batch-size", 8, "--bench-steps", 2,
              "--out-dir", tmp_path / "never").stdout
    assert "GFLOPs per image" in out
    assert all(field in out for field in ("ms/step", "img/s", "mfu", "peak mem"))
    assert not (tmp_path / "never").exists()  # a benchmark writes nothing
    out = run(PRETRAIN, "--bench-data", "--model", "vit_p4_32", "--batch-size", 8, "--bench-steps", 2,
              "--out-dir", tmp_path / "never").stdout
    assert "bench-data: shapes" in out and "img/s" in out


# ----------------------------------------------------------------------------- the study's summary

def test_study_summarises_finished_runs_by_hand(tmp_path):
    """Two fake finished runs of one arm, two blocks each; a third seed never finished and is left out."""
    fake = {0: ([12.0, 10.0], [9.0, 11.0], [6.0, 3.0]), 1: ([14.0, 20.0], [13.0, 15.0], [8.0, 5.0])}
    for seed, (lp, knn, ranks) in fake.items():
        folder = tmp_path / "runs" / f"none-s{seed}"
        folder.mkdir(parents=True)
        (folder / "probe.json").write_text(json.dumps({"headline": {"pooling": "mean"},
                                                       "layers": [{"lp_mean": a, "knn_mean": k} for a, k in zip(lp, knn)]}))
        (folder / "rank.json").write_text(json.dumps({"checkpoints": [{"layers": [{"mean": r} for r in ranks]}]}))
    run("results/study.py", "--collect", "--out", tmp_path, "--seeds", 0, 1, 2, "--arms", "none")
    table = json.loads((tmp_path / "study.json").read_text())["table"]["none"]
    assert table["seeds"] == 2
    assert table["lp_last"] == [15.0, 5.0]       # mean of 10 and 20, population std 5
    assert table["lp_best"] == [16.0, 4.0]       # best blocks 12 and 20
    assert table["knn_best"] == [13.0, 2.0]      # 11 and 15
    assert table["erank_last"] == [4.0, 1.0]     # 3 and 5


def test_curve_probes_each_kept_checkpoint(tmp_path):
    """curve.py's last point is the finished run: it must match probe.py and rank.py run on ckpt.pt directly."""
    root = write_png_folder(str(tmp_path / "imgs"))
    tiny_run = "--model vit_p4_32 --batch-size 4 --data " + root
    quick = ["--probe-args=--epochs 3", "--rank-args=--n 0 --n-tokens 4"]
    run("results/curve.py", "--arms", "none", "--epochs", 2, "--every", 1, "--out", tmp_path / "c",
        f"--pretrain-args={tiny_run}", *quick)
    points = json.loads((tmp_path / "c" / "curve.json").read_text())["curves"]["none"]
    assert [p["epoch"] for p in points] == [1, 2]
    final = tmp_path / "c" / "runs" / "none" / "ckpt.pt"
    run("probe.py", final, "--epochs", 3, "--out", tmp_path / "probe.json")
    run("rank.py", final, "--n", 0, "--n-tokens", 4, "--out", tmp_path / "rank.json")
    probe = json.loads((tmp_path / "probe.json").read_text())
    pool = probe["headline"]["pooling"]
    assert points[-1]["lp_last"] == probe["layers"][-1]["lp_" + pool]
    assert points[-1]["erank_last"] == json.loads((tmp_path / "rank.json").read_text())["checkpoints"][0]["layers"][-1][pool]
