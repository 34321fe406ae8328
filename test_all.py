"""Every stage, checked against independent references on CPU.  python -m pytest -q test_all.py"""
import errno
import functools
import itertools
import math
import operator
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

import glyphs
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
    as_lr = M.MAE(tiny(alpha_schedule="linear", alpha_min=0.7, decay_as_lr=True))  # reported as the schedule's,
    assert as_lr.alphas == a and as_lr.checkpoint()["alphas"] == a  # as probe.py and rank.py print them; the
    assert all((b.a_attn, b.a_mlp) == (1.0, 1.0) for b in as_lr.encoder.blocks)  # shortcuts run at 1


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


def test_mask_and_unshuffle_by_hand():
    # noise j*7 mod 16 is a permutation: its 4 smallest values (kept) sit at j = 0, 7, 14, 5 in that order;
    # the second row's noise is reversed, so its 4 smallest sit where j*7 mod 16 = 15, 14, 13, 12: j = 9, 2, 11, 4
    noise = torch.tensor([[(j * 7 % 16) / 16 for j in range(16)], [1 - (j * 7 % 16) / 16 for j in range(16)]])
    _, _, mask = M.MAE(tiny())(torch.randn(2, 3, 32, 32), mask_ratio=0.75, noise=noise)
    assert mask.tolist() == [[0, 1, 1, 1, 1, 0, 1, 0, 1, 1, 1, 1, 1, 1, 0, 1],
                             [1, 1, 0, 1, 0, 1, 1, 1, 1, 0, 1, 0, 1, 1, 1, 1]]
    # distinct tokens: token j of sample b carries the value 100 * b + j in every channel
    x = (100 * torch.arange(2)[:, None, None] + torch.arange(16)[None, :, None]).float().expand(2, 16, 3)
    ids_keep, ids_restore, _ = M.random_masking(noise, 0.75)
    visible = M.gather_tokens(x, ids_keep)
    assert visible[..., 0].tolist() == [[0, 7, 14, 5], [109, 102, 111, 104]]
    cls, mask_token = torch.full((2, 1, 3), -1.0), torch.full((1, 1, 3), -7.0)
    full = M.unshuffle(torch.cat([cls, visible], dim=1), mask_token, ids_restore)
    expected = torch.cat([cls, torch.where(mask[..., None] == 0, x, mask_token)], dim=1)  # token j at place j
    assert full[..., 0].tolist() == expected[..., 0].tolist() and torch.equal(full, expected)


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


def sincos_reference(dim, grid):
    """MAE's 2-D sin-cos table (facebookresearch/mae util/pos_embed.py) written out entry by entry. Token
    i * grid + j is row i, column j; channels [0, dim/2) encode the column, [dim/2, dim) the row, each half as
    sin(pos * w_k) for k < m, then cos(pos * w_k), with m = dim / 4 and w_k = 1 / 10000 ** (k / m)."""
    m = dim // 4
    table = torch.zeros(grid * grid, dim, dtype=torch.float64)
    for i in range(grid):
        for j in range(grid):
            for half, pos in enumerate((j, i)):
                for k in range(m):
                    table[i * grid + j, half * 2 * m + k] = math.sin(pos / 10000 ** (k / m))
                    table[i * grid + j, half * 2 * m + m + k] = math.cos(pos / 10000 ** (k / m))
    return table


def test_sincos_positions_by_hand():
    s1, c1, s2, c2 = math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)
    # dim 8, grid 2: m = 2, w = (1, 1/100); token 1 is row 0 column 1, token 2 is row 1 column 0
    by_hand = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1],
                            [s1, s2, c1, c2, 0, 0, 1, 1],
                            [0, 0, 1, 1, s1, s2, c1, c2],
                            [s1, s2, c1, c2, s1, s2, c1, c2]], dtype=torch.float64)
    assert torch.allclose(sincos_reference(8, 2), by_hand, atol=1e-12)  # the reference itself, by hand
    assert torch.allclose(M.sincos_pos_embed(8, 2).double(), by_hand, atol=1e-7)
    model = M.MAE(tiny(decoder_width=16))  # grid 4; encoder 32 wide, decoder 16; the cls slot gets zeros
    for table, dim in ((model.encoder.pos_embed, 32), (model.decoder_pos_embed, 16)):
        assert table.shape == (1, 17, dim) and torch.equal(table[0, 0], torch.zeros(dim))
        assert torch.allclose(table[0, 1:].double(), sincos_reference(dim, 4), atol=1e-6)


def plain_vit(imgs, sd, depth, heads, patch, alphas=None):
    """An independent pre-norm ViT: reshape/permute, explicit softmax attention, weights from a state_dict,
    shortcut k (attn of block 0, mlp of block 0, attn of block 1, ...) weighted by alphas[k]. Returns every
    block's output, the last after the final norm, like MAE.features."""
    alphas = alphas or [1.0] * (2 * depth)
    b, c, hgt, wid = imgs.shape
    g = hgt // patch
    x = imgs.reshape(b, c, g, patch, g, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, patch * patch * c)
    x = x @ sd["encoder.patch_embed.weight"].T + sd["encoder.patch_embed.bias"]
    d = x.shape[-1]
    pos = sincos_reference(d, g).float()
    x = torch.cat([sd["encoder.cls_token"].expand(b, 1, d), x + pos], dim=1)
    outs = []
    for i in range(depth):
        w = lambda name: sd[f"encoder.blocks.{i}.{name}"]
        h = F.layer_norm(x, (d,), w("norm1.weight"), w("norm1.bias"), eps=1e-6)
        qkv = (h @ w("attn.qkv.weight").T + w("attn.qkv.bias")).reshape(b, -1, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        h = (att @ v).transpose(1, 2).reshape(b, -1, d)
        x = alphas[2 * i] * x + (h @ w("attn.proj.weight").T + w("attn.proj.bias"))
        h = F.layer_norm(x, (d,), w("norm2.weight"), w("norm2.bias"), eps=1e-6)
        h = F.gelu(h @ w("mlp.fc1.weight").T + w("mlp.fc1.bias"))
        x = alphas[2 * i + 1] * x + (h @ w("mlp.fc2.weight").T + w("mlp.fc2.bias"))
        outs.append(x)
    return outs[:-1] + [F.layer_norm(x, (d,), sd["encoder.norm.weight"], sd["encoder.norm.bias"], eps=1e-6)]


def test_encoder_with_no_decay_equals_a_plain_vit():
    model = randomise(M.MAE(tiny(alpha_schedule="none", decoder_skips=False))).eval()
    imgs = torch.randn(2, 3, 32, 32)
    ours = model.features(imgs)[-1]
    ref = plain_vit(imgs, model.state_dict(), depth=12, heads=2, patch=8)[-1]
    assert torch.allclose(ours, ref, atol=1e-5)


def test_decayed_encoder_equals_a_plain_vit_with_per_sub_layer_alphas():
    """x = a_k * x + f(norm(x)) with non-zero (randomised) branches, against alphas written out from SPEC's
    formula 1 - 0.4 k / 23: fails on a_k * (x + f), on swapped attention / MLP alphas, on a shifted k."""
    model = randomise(M.MAE(tiny(alpha_schedule="linear", alpha_min=0.6, decoder_skips=False))).eval()
    imgs = torch.randn(2, 3, 32, 32)
    ref = plain_vit(imgs, model.state_dict(), depth=12, heads=2, patch=8, alphas=[1 - 0.4 * k / 23 for k in range(24)])
    for block, (ours, theirs) in enumerate(zip(model.features(imgs), ref), start=1):
        assert torch.allclose(ours, theirs, atol=1e-5), f"block {block}: {(ours - theirs).abs().max():.2e}"
    plain = plain_vit(imgs, model.state_dict(), depth=12, heads=2, patch=8)  # and the decay is not a no-op here
    assert not torch.allclose(plain[-1], ref[-1], atol=1e-2)


@pytest.mark.parametrize("skips,depth", [(True, 12), (False, 12), (True, 3), (True, 1)])
def test_decoder_reads_encoder_and_trains(skips, depth):
    """Every parameter in the graph, the last encoder block's too: at an odd depth the skips are counted from it
    (counted from block 1, depth 3 left block 2 unread and depth 1 had no skip: the decoder saw no image)."""
    model = randomise(M.MAE(tiny(decoder_skips=skips, depth=depth)))
    imgs = torch.randn(2, 3, 32, 32)
    loss, _, _ = model(imgs)
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters outside the graph break DDP: {unused}"
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.encoder.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("skips", [True, False])
def test_residual_streams_stay_fp32_under_bf16_autocast(skips):
    """Autocast runs the layers in bf16, but each stream adds them to fp32 (the encoder's and the plain decoder's
    through their fp32 pos_embed); the skip decoder's stream, started from a Linear, used to stay bf16."""
    model, streams = M.MAE(tiny(decoder_skips=skips)), []
    for block in (model.encoder.blocks[-1], model.decoder_blocks[-1]):
        block.register_forward_hook(lambda m, inp, out: streams.append((inp[0].dtype, out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 32, 32))
    assert streams == [(torch.float32, torch.float32)] * 2


def test_skips_feed_the_decoder_deepest_first():
    """SPEC 3: decoder block 0 reads the deepest kept encoder block (11, 0-based, after the final norm), then
    blocks 9, 7, 5, 3, 1; each skip is added before its decoder block; a 7th decoder block reads nothing."""
    model = randomise(M.MAE(tiny(decoder_depth=7))).eval()
    encoder, calls = {}, []
    for i, block in enumerate(model.encoder.blocks):
        block.register_forward_hook(lambda m, inp, out, i=i: encoder.__setitem__(i, out))
    model.encoder.norm.register_forward_hook(lambda m, inp, out: encoder.__setitem__("norm", out))
    for i, skip in enumerate(model.skips):
        skip.register_forward_hook(lambda m, inp, out, i=i: calls.append((f"skip {i}", inp[1])))
    for i, block in enumerate(model.decoder_blocks):
        block.register_forward_hook(lambda m, inp, out, i=i: calls.append((f"block {i}", None)))
    model(torch.randn(2, 3, 32, 32))
    assert [name for name, _ in calls] == [f"{kind} {i}" for i in range(6) for kind in ("skip", "block")] + ["block 6"]
    fed = [next((k for k, t in encoder.items() if torch.equal(t, got)), "none") for _, got in calls if got is not None]
    assert fed == ["norm", 9, 7, 5, 3, 1]


def test_skip_is_the_authors_concat_mlp():
    """SPEC 3: skip(x, f) = x + fc2(silu(W [x, f_full] + b)), one Linear over the concatenation, where f_full puts
    each visible encoder token back at its patch, the mask token at hidden patches and cls first; written here
    token by token. Fails if the mask token or the cls token goes to the wrong place, or the halves are swapped."""
    skip = randomise(M.SkipFuse(dec_dim=6, enc_dim=10), seed=3)
    g = torch.Generator().manual_seed(4)
    b, n, k = 2, 9, 3
    ids_keep, ids_restore, _ = M.random_masking(torch.rand(b, n, generator=g), 1 - k / n)
    feature, x = torch.randn(b, 1 + k, 10, generator=g), torch.randn(b, 1 + n, 6, generator=g)
    full = torch.empty(b, 1 + n, 10)
    for i in range(b):
        full[i, 0] = feature[i, 0]
        for patch in range(n):
            kept = (ids_keep[i] == patch).nonzero()
            full[i, 1 + patch] = feature[i, 1 + kept.item()] if len(kept) else skip.mask_token[0, 0]
    w = torch.cat([skip.fc1_dec.weight, skip.fc1_enc.weight], dim=1)
    hidden = F.silu(torch.cat([x, full], dim=-1) @ w.T + skip.fc1_dec.bias)
    ref = x + hidden @ skip.fc2.weight.T + skip.fc2.bias
    assert torch.allclose(skip(x, feature, ids_restore), ref, atol=1e-5)


def test_bf16_autocast_forward_backward_is_close_to_fp32():
    """CUDA trains under bf16 autocast, which CI never runs; CPU autocast runs the same mixed-precision graph.
    bf16 keeps 8 significant bits (unit roundoff 2^-8 = 0.4%): predictions and gradients must agree with fp32 to
    2% in relative norm (measured 0.4% and 0.6%); the loss, taken in fp32 from the predictions, to 2e-4 (measured
    3e-5; the same loss summed in bf16 is off by 1e-3)."""
    model = randomise(M.MAE(tiny()))
    g = torch.Generator().manual_seed(1)
    imgs, noise = torch.randn(4, 3, 32, 32, generator=g), torch.rand(4, 16, generator=g)
    runs = []
    for bf16 in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, pred, _ = model(imgs, noise=noise)
        loss.backward()
        runs.append((loss.detach().float(), pred.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (loss32, pred32, grad32), (loss16, pred16, grad16) = runs
    assert pred16.dtype == torch.bfloat16  # autocast did reach the model
    assert torch.isfinite(loss16) and torch.isfinite(grad16).all()
    relative = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
    assert relative(loss16, loss32) < 2e-4
    assert relative(pred16, pred32) < 2e-2 and relative(grad16, grad32) < 2e-2


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


def test_a_checkpoint_refuses_an_edited_alpha(tmp_path):
    """The README invites edits to alpha(); a checkpoint trained before the edit must not load as another network."""
    torch.save(M.MAE(tiny(alpha_schedule="linear", alpha_min=0.6)).checkpoint(), tmp_path / "ckpt.pt")
    paper = M.alpha
    edited = lambda t, schedule="linear", alpha_min=0.6: paper(t ** 0.5 if schedule == "linear" else t, schedule, alpha_min)
    with mock.patch.object(M, "alpha", edited), pytest.raises(ValueError, match="sub-layer 1, but alpha.. now gives"):
        M.MAE.from_checkpoint(str(tmp_path / "ckpt.pt"))
    nudged = lambda t, schedule="linear", alpha_min=0.6: paper(t, schedule, alpha_min) + 3e-6 * (t > 0)
    with mock.patch.object(M, "alpha", nudged), pytest.raises(ValueError) as refused:  # the message shows the change
        M.MAE.from_checkpoint(str(tmp_path / "ckpt.pt"))
    then, now = re.search(r"giving ([\d.]+) at sub-layer 1, but alpha\(\) now gives ([\d.]+)", str(refused.value)).groups()
    assert then != now and float(now) - float(then) == pytest.approx(3e-6, abs=1e-6), refused.value
    older = {k: v for k, v in torch.load(tmp_path / "ckpt.pt", weights_only=True).items() if k != "alphas"}
    with mock.patch.object(M, "alpha", edited):  # written before checkpoints held their alphas: nothing to check
        assert M.MAE.from_checkpoint(older).alphas[1] == pytest.approx(1 - 0.4 * (1 / 23) ** 0.5)


def test_a_checkpoint_of_a_schedule_model_py_lost_says_so(tmp_path):
    torch.save(M.MAE(tiny(alpha_schedule="cosine")).checkpoint(), tmp_path / "ckpt.pt")
    with mock.patch.object(M, "SCHEDULES", ("none", "linear")), pytest.raises(ValueError) as error:
        M.MAE.from_checkpoint(str(tmp_path / "ckpt.pt"))
    assert str(error.value).startswith("trained with alpha schedule 'cosine', which model.py no longer has")


@pytest.mark.parametrize("gives", [lambda t: 1 - t, lambda t: -0.5, lambda t: float("nan"), lambda t: None])
def test_an_edited_alpha_that_cuts_the_stream_is_refused(gives):
    """An edit of alpha() that gives 0 (1 - t ends at 0 on the last sub-layer), a negative, nan or no number
    would train a dead stream silently (and --decay-as-lr would divide by zero): the config says where."""
    edited = lambda t, schedule="linear", alpha_min=0.6: gives(t)
    with mock.patch.object(M, "alpha", edited), pytest.raises(ValueError, match="weight must be a number above 0"):
        tiny(alpha_schedule="linear")


@pytest.mark.parametrize("kind", ["numpy.float32", "numpy.float64", "torch.tensor"])
def test_an_edited_alpha_may_give_numpy_or_torch_numbers(kind, tmp_path):
    """np.cos or a torch op in an edit: accepted, and stored as plain floats (torch.load(weights_only=True) refuses
    numpy scalars in a checkpoint, which would show only when the trained run is loaded)."""
    paper, kind = M.alpha, {"numpy.float32": np.float32, "numpy.float64": np.float64, "torch.tensor": torch.tensor}[kind]
    edited = lambda t, schedule="linear", alpha_min=0.6: kind(paper(t, schedule, alpha_min))
    with mock.patch.object(M, "alpha", edited):
        torch.save(M.MAE(tiny(alpha_schedule="linear")).checkpoint(), tmp_path / "ckpt.pt")
        alphas = M.MAE.from_checkpoint(str(tmp_path / "ckpt.pt")).alphas
    assert all(type(a) is float for a in alphas) and alphas[-1] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="depth 0"):
        tiny(depth=0)


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
                                        (dict(mask_ratio=0.06), "hides 0 of 16"),
                                        (dict(alpha_schedule="cos"), "choose one of"), (dict(alpha_min=0), "alpha_min")])
def test_config_rejects_bad_values(bad, needle):
    with pytest.raises(ValueError, match=needle):
        tiny(**bad)


# ----------------------------------------------------------------------------- data

import contextlib
import importlib.util
import io
import json
import os
import runpy
import shlex
import shutil
import subprocess
import sys
from unittest import mock

import numpy as np

import common
import data
import device_data
import pretrain

HERE = os.path.dirname(os.path.abspath(__file__))


def run(script, *args, check=True, env=None, timeout=300):
    """Run a stage through its real command line, as a user would."""
    result = subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)], capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=HERE)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def call(script, *args, check=True):
    """run() without a new interpreter: the script's own __main__ in this process, on the same command line and
    folder, with its exit code and output. Each fresh process spends about 5 s importing torch and torchvision on
    the 2-core CI machine, most of this file's time; real processes stay where a process is the point (a shell's
    exit code, kill -9, torchrun) and for pretrain.py's runs."""
    argv, out, err, code = [os.path.join(HERE, script), *map(str, args)], io.StringIO(), io.StringIO(), 0
    cwd, path, handlers = os.getcwd(), list(sys.path), {s: signal.getsignal(s) for s in common.STOP_SIGNALS}
    with mock.patch.object(sys, "argv", argv), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            os.chdir(HERE)
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        finally:  # what a script's __main__ sets for its process, e.g. pretrain.py's Ctrl-C handler, must not stay
            os.chdir(cwd)
            sys.path[:] = path
            for s, handler in handlers.items():
                signal.signal(s, handler)
    result = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{script} {args} exited {code}:\n{result.stdout}\n{result.stderr}")
    return result


def test_glyphs_cache_is_drawn_again_when_damaged_or_when_the_generator_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # a cache of its own
    glyphs.make_glyphs.cache_clear()
    try:
        images, labels = glyphs.make_glyphs("test")
        (cache,) = (tmp_path / ".cache" / "decayed-mae").glob("glyphs-*-test-0.npz")
        for damage in (b"", cache.read_bytes()[:1000]):  # emptied; cut short
            cache.write_bytes(damage)
            glyphs.make_glyphs.cache_clear()
            again, again_labels = glyphs.make_glyphs("test")
            assert np.array_equal(again, images) and np.array_equal(again_labels, labels)
        edited = tmp_path / "glyphs.py"  # a knob changed: the cache of the old generator must not be served
        edited.write_text(open(glyphs.__file__).read().replace("NOISE = (0.0, 0.01)", "NOISE = (0.0, 0.02)"))
        tag = glyphs.generator_tag()
        monkeypatch.setattr(glyphs, "__file__", str(edited))
        assert tag in cache.name and glyphs.generator_tag() != tag
    finally:
        glyphs.make_glyphs.cache_clear()


def test_glyphs_are_deterministic_balanced_and_seeded():
    images, labels = glyphs.generate("test", 0, count=500)
    again_images, again_labels = glyphs.generate("test", 0, count=500)  # bypasses every cache
    assert images.shape == (500, 32, 32) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.array_equal(images, again_images) and np.array_equal(labels, again_labels)
    assert np.bincount(labels).tolist() == [50] * len(glyphs.GLYPHS) == [50] * len(data.get_dataset(data.EMBEDDED, "test", 32, False).classes)
    assert not np.array_equal(images, glyphs.generate("test", 1, count=500)[0])  # the seed matters
    assert not np.array_equal(images, glyphs.generate("train", 0, count=500)[0])  # the splits differ
    assert images.std() > 30 and 0 < images.mean() < 255  # neither blank nor saturated


def test_glyphs_split_sizes_and_loader():
    for split, size in (("train", 50_000), ("test", 10_000)):  # generated once, then read from the disk cache
        images, labels = data.make_glyphs(split)
        assert images.shape == (size, 32, 32) and np.bincount(labels).tolist() == [size // 10] * 10
    assert data.EMBEDDED == data.DATASETS[0] == "glyphs" and data.NATIVE_SIZE["glyphs"] == glyphs.SIZE == 32
    assert glyphs.SPLIT_SIZES["train"] >= 50_000 and glyphs.SPLIT_SIZES["test"] >= 10_000
    assert all(size % len(glyphs.GLYPHS) == 0 for size in glyphs.SPLIT_SIZES.values())  # exact class balance
    assert len(set(glyphs.GLYPHS)) == len(glyphs.GLYPHS) >= 10
    images, labels = glyphs.generate("train", 0, count=20)
    dataset = data.TensorImages(torch.from_numpy(images)[:, None], labels,
                                data._transform("glyphs", 32, train_aug=False, native_size=32), glyphs.GLYPHS)
    image, label = dataset[3]
    assert image.shape == (3, 32, 32) and label == labels[3] and torch.equal(image[0], image[2])


def test_glyphs_classes_are_not_in_global_statistics():
    """A linear classifier on each image's mean and standard deviation (the only global statistics a grey image
    has; the 3 channels are copies) must stay near chance: the class is the shape, not the amount of ink."""
    images, labels = glyphs.generate("train", 3, count=3000)
    flat = torch.from_numpy(images).flatten(1).float() / 255
    stats = torch.stack([flat.mean(1), flat.std(1)], 1)
    stats = (stats - stats.mean(0)) / stats.std(0)
    features = torch.cat([stats, stats ** 2, stats.prod(1, keepdim=True)], 1)  # quadratic: stricter than linear
    labels = torch.from_numpy(labels)
    torch.manual_seed(0)
    head = torch.nn.Linear(features.shape[1], len(glyphs.GLYPHS))
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(features[:2000]), labels[:2000])
        loss.backward()
        return loss
    opt.step(closure)
    accuracy = (head(features[2000:]).argmax(1) == labels[2000:]).float().mean().item()
    assert accuracy <= 0.25, f"global statistics give {accuracy:.0%}"  # 15% on this sample (chance 10%)


def test_glyphs_do_not_depend_on_the_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = glyphs.generate("train", 0, count=200)[0]
        torch.set_num_threads(max(2, threads))
        many = glyphs.generate("train", 0, count=200)[0]
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(one, many)


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


def test_probes_normalise_images_as_the_checkpoint_was_pretrained(tmp_path):
    """A glyphs checkpoint probed on an image folder (or public ImageNet weights on CIFAR) must see its inputs
    normalised as in pretraining, not with the probe data's own statistics: here a grey 100/255 image, by hand."""
    from PIL import Image
    root = tmp_path / "imgs"
    for split in ("train", "val"):
        os.makedirs(root / split / "a")
        Image.new("RGB", (32, 32), (100, 100, 100)).save(root / split / "a" / "0.png")
    assert probe.input_stats({"args": {"data": "glyphs"}}) == "glyphs"
    assert probe.input_stats({"args": {"data": str(root)}}) == "imagenet"  # pretrain.py's folder statistics
    assert probe.input_stats({"model": {}}) == probe.input_stats({"args": argparse.Namespace(data="x")}) == "imagenet"
    for stats, (mean, std) in (("glyphs", (0.2030, 0.2546)), (None, (0.485, 0.229))):  # None: the folder's default
        image = probe.get_split(str(root), "test", 32, None, 0, stats=stats)[0][0]
        assert image[0].flatten().tolist() == pytest.approx([(100 / 255 - mean) / std] * 32 * 32, abs=1e-5), stats


def test_image_folder_skips_an_image_over_the_decompression_bomb_limit(tmp_path, monkeypatch):
    """Pillow refuses an image of more than twice MAX_IMAGE_PIXELS with DecompressionBombError, which is not an
    OSError: the folder must serve the next image, as for a broken file, not stop the run."""
    from PIL import Image
    root = write_png_folder(str(tmp_path / "imgs"), n_per_class=1, size=8)
    Image.new("RGB", (64, 64)).save(os.path.join(root, "train", "cat", "0.png"))  # 4096 pixels, the first item
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # over 4000 is refused; crops of 36x36 stay under
    folder = data.get_dataset(root, "pretrain", 32, train_aug=False)
    assert folder[0][1] == 1 and folder.bad.tolist() == [True, False]  # the dog served in the cat's place


def test_image_folder_ignores_hidden_files_and_names_each_broken_file_once(tmp_path, capsys):
    """A folder copied from a Mac (._x.png beside each x.png, .DS_Store) or used in Jupyter (.ipynb_checkpoints)
    holds no extra data. Two broken files in a row (indices 3 and 4 of cat's 0, 1, 2, broken0, broken1) are
    counted once each however often they are asked for, and the warning names the file."""
    from PIL import Image
    root = write_png_folder(str(tmp_path / "imgs"), n_per_class=3, size=8, corrupt=2)
    for split in ("train", "val"):
        for hidden in (os.path.join(root, split, ".ipynb_checkpoints"), os.path.join(root, split, "cat", ".thumbs")):
            os.makedirs(hidden)
            Image.new("RGB", (8, 8)).save(os.path.join(hidden, "0.png"))
        for cls in ("cat", "dog"):
            for name in ("._0.png", "._1.png", ".DS_Store"):
                with open(os.path.join(root, split, cls, name), "wb") as f:
                    f.write(b"\x00\x05\x16\x07" + bytes(100))  # AppleDouble's magic, not an image
    folder = data.get_dataset(root, "train", 32, train_aug=False)
    assert folder.classes == ["cat", "dog"] and len(folder) == 8 and len(data.get_dataset(root, "test", 32, False)) == 6
    labels = [folder[i][1] for i in (*range(8), *range(8))]  # two passes
    assert labels == [0, 0, 0, 1, 1, 1, 1, 1] * 2 and folder.bad.nonzero().flatten().tolist() == [3, 4]  # as dog 0
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: skipped 1 unreadable") and "broken0.png" in warnings[0]


def test_image_folder_follows_each_symbolic_link_once(tmp_path, capsys):
    """Without repeated links the file list is torchvision's ImageFolder's (nested folders, a class folder that is
    a link, a linked subfolder, a visible link to a hidden folder). Then the links torchvision followed too often:
    cat/up -> train/ (it listed 40 levels of up/cat/up/... and filed the dog images under cat), dog/again ->
    dog/sub (its files twice), dog/l1 and dog/l2 -> an outside folder that links to itself (its file twice, then
    a loop). Now each real folder comes once, under its own class, and one warning counts the 4 not entered."""
    from PIL import Image
    root = write_png_folder(str(tmp_path / "imgs"), n_per_class=2, size=8)
    train = os.path.join(root, "train")
    outside = tmp_path / "elsewhere"
    for folder in (os.path.join(train, "dog", "sub", "deeper"), os.path.join(train, "cat", ".cache", "sub"),
                   outside / "birds", outside / "E"):
        os.makedirs(folder)
    for folder in ("dog/sub", "dog/sub/deeper", "cat/.cache/sub"):
        Image.new("RGB", (8, 8)).save(os.path.join(train, folder, "n.png"))
    for folder in ("birds", "E"):
        Image.new("RGB", (8, 8)).save(outside / folder / "o.png")
    for split in ("train", "val"):  # a class folder kept elsewhere
        os.symlink(outside / "birds", os.path.join(root, split, "bird"))
    os.symlink(outside / "birds", os.path.join(train, "cat", "linked"))  # a linked subfolder
    os.symlink(os.path.join(train, "cat", ".cache", "sub"), os.path.join(train, "cat", "vis"))  # listed as cat/vis
    visible = functools.partial(data.visible_image, train)
    reference = torchvision.datasets.ImageFolder(train, is_valid_file=visible).samples
    assert data.get_dataset(root, "pretrain", 8, False).samples == reference and len(reference) == 9
    assert capsys.readouterr().err == ""
    os.symlink(train, os.path.join(train, "cat", "up"))
    os.symlink(os.path.join(train, "dog", "sub"), os.path.join(train, "dog", "again"))
    for link in ("l1", "l2"):
        os.symlink(outside / "E", os.path.join(train, "dog", link))
    os.symlink(outside / "E", outside / "E" / "me")
    assert len(torchvision.datasets.ImageFolder(train, is_valid_file=visible).samples) > 100  # the old listing
    folder = data.get_dataset(root, "pretrain", 8, False)
    assert sorted(folder.samples) == sorted(reference + [(os.path.join(train, "dog", "l1", "o.png"), 2)])
    warning = capsys.readouterr().err.splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: 4 folder(s)") and "not entered" in warning[0]


def test_loader_workers_share_the_unreadable_files_they_find(tmp_path, capfd):
    """pretrain.py makes new DataLoader workers each epoch. What a worker finds unreadable, the next epoch's workers
    skip without decoding or reporting it again (each worker used to report anew: lines per worker and epoch on a
    long run), and the main process sees it too."""
    root = write_png_folder(str(tmp_path / "imgs"), n_per_class=3, size=8, corrupt=2)  # broken: indices 3 and 4
    folder = data.get_dataset(root, "train", 8, train_aug=False)
    for epoch in range(2):
        loader = torch.utils.data.DataLoader(folder, batch_size=8, num_workers=2)  # one batch: one worker meets both
        assert [int(y) for _, labels in loader for y in labels] == [0, 0, 0, 1, 1, 1, 1, 1]
        warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
        assert len(warnings) == (1 if epoch == 0 else 0), warnings
    assert folder.bad.nonzero().flatten().tolist() == [3, 4]


def test_sixteen_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    """convert("RGB") clips a 16-bit image at 255 (nearly all white); the loader divides by 257 instead, and reads
    a float image within 0..1 as such. By hand: 257 -> 1, 32896 -> 128, 65535 -> 255; 0.5 -> 127.5, rounded to
    even: 128. I and F images that hold 8-bit values (PIL's convert("I") or ("F") of an 8-bit image) stay."""
    from PIL import Image
    deep = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "float.tif")
    assert np.asarray(data.load_rgb(tmp_path / "deep.png"))[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.asarray(data.load_rgb(tmp_path / "float.tif"))[0, :, 0].tolist() == [0, 128, 255]
    for name, dtype in (("int.tif", np.int32), ("float255.tif", np.float32)):  # 8-bit values in I and F: kept
        Image.fromarray(np.array([[0, 128, 255]], dtype=dtype)).save(tmp_path / name)
        assert np.asarray(data.load_rgb(tmp_path / name))[0, :, 0].tolist() == [0, 128, 255]


def test_an_unreadable_data_folder_is_one_line(tmp_path, monkeypatch):
    root = write_png_folder(str(tmp_path / "imgs"))

    def refuse(path):
        raise PermissionError(13, "Permission denied", path)

    with monkeypatch.context() as patch:  # as root here, chmod 000 would not refuse
        patch.setattr(data.os, "listdir", refuse)
        with pytest.raises(data.DataError, match="cannot read the data folder .*train.*: Permission denied"):
            data.get_dataset(root, "train", 32, train_aug=False)


def test_image_folder_loads_with_both_transforms(tmp_path):
    root = write_png_folder(str(tmp_path / "imgs"))
    train = data.get_dataset(root, "pretrain", 32, train_aug=True)
    test = data.get_dataset(root, "test", 32, train_aug=False)
    assert len(train) == 12 and len(test) == 12 and len(train.classes) == 2
    img, label = test[7]
    assert img.shape == (3, 32, 32) and label == 1
    # evaluation: resize to 36 then centre crop 32, normalised with ImageNet statistics, checked by hand
    from PIL import Image
    pil = Image.open(sorted(os.path.join(root, "val", "dog", f) for f in os.listdir(os.path.join(root, "val", "dog")))[1])
    ref = torch.from_numpy(np.array(pil.resize((36, 36), Image.BICUBIC))[2:34, 2:34]).permute(2, 0, 1) / 255
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in data.MEAN_STD["imagenet"])
    assert (img - (ref - mean) / std).abs().mean() < 0.05


def test_evaluation_cuts_a_banner_before_resizing_it(tmp_path):
    """A 40,000 x 1 image took 43 s and 11 GB to resize for evaluation. Cut to 16 : 1 about its centre first (an
    even cut, so the centre stays), the kept middle is torchvision's plain Resize + CenterCrop of the whole image,
    to the pixel here (3001 x 1, 1601 x 100) or within 2 levels of 255 (5001 x 97, where the two resized widths
    differ by a fraction of a pixel). Images up to 16 : 1 are not touched."""
    from PIL import Image
    sizes = {(4000, 1): (16, 1), (4001, 1): (17, 1), (1, 3000): (1, 16), (300, 20): (300, 20), (1700, 100): (1600, 100)}
    for size, kept in sizes.items():
        assert data.cap_aspect(Image.new("RGB", size)).size == kept, size
    evaluation = data._transform("imagenet", 32, train_aug=False)
    plain = v2.Compose([t for t in evaluation.transforms if t is not data.cap_aspect])
    assert len(plain.transforms) == len(evaluation.transforms) - 1
    rng = np.random.default_rng(0)
    for (width, height), levels in (((3001, 1), 0), ((1601, 100), 0), ((5001, 97), 2)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        gap = (evaluation(image) - plain(image)).abs() * torch.tensor(data.MEAN_STD["imagenet"][1]).view(3, 1, 1) * 255
        assert gap.max() <= levels + 1e-3, (width, height, gap.max())


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


def pretrain_here(*args):
    """pretrain.py's command line, run in this process: no interpreter start-up, so tiny runs take a second."""
    pretrain.main([str(a) for a in args])


def read_log(folder):
    return [json.loads(line) for line in open(folder / "log.jsonl")]


def test_img_per_s_leaves_out_the_time_spent_saving(tmp_path, monkeypatch):
    """On a clock that moves 0.01 s per reading, and 100 s inside each save (one per step): every logged
    interval times its one step of 4 images alone, well under a second, not the 100 s save before it."""
    clock = [0.0]

    def read():
        clock[0] += 0.01
        return clock[0]

    def slow_save(*args):
        clock[0] += 100.0

    root = write_png_folder(str(tmp_path / "imgs"))
    monkeypatch.setattr(pretrain, "time", mock.Mock(time=read, strftime=time.strftime, gmtime=time.gmtime))
    monkeypatch.setattr(pretrain, "save", slow_save)
    pretrain_here("--model", "vit_p4_32", "--data", root, "--batch-size", 4, "--epochs", 1, "--save-every", 1,
                  "--log-every", 1, "--workers", 0, "--out-dir", tmp_path / "run")
    seconds_per_step = [4 / e["img_per_s"] for e in read_log(tmp_path / "run")]
    assert len(seconds_per_step) == 3 and max(seconds_per_step) < 1, seconds_per_step


def test_save_every_replaces_the_epoch_end_checkpoints(tmp_path, monkeypatch):
    """12 images, batch 4: 3 steps an epoch, 7 steps in all. ckpt.pt is written at each epoch end (steps 3, 6) and
    at the last step by default, every N steps instead with --save-every N, only at the last step with 0; the
    copies of --keep-every keep to their epochs whatever --save-every says."""
    root, saved = write_png_folder(str(tmp_path / "imgs")), []
    monkeypatch.setattr(pretrain, "save", lambda *args: saved.append((os.path.basename(args[-1]), args[5])))  # (file, step)
    for flags, expected in (([], [3, 6, 7]), (["--save-every", 2], [2, 4, 6, 7]), (["--save-every", 0, "--keep-every", 2], [7])):
        saved.clear()
        pretrain_here("--model", "vit_p4_32", "--data", root, "--batch-size", 4, "--max-steps", 7, *flags,
                      "--out-dir", tmp_path / f"run{len(flags)}")
        assert [step for name, step in saved if name == "ckpt.pt"] == expected, flags
    assert [(name, step) for name, step in saved if name != "ckpt.pt"] == [("ckpt_epoch002.pt", 6)]


def test_logged_lr_follows_the_capped_schedule(tmp_path):
    """12 images, batch 4: 3 steps per epoch, 10 epochs planned (30 steps) with 5 of warm-up (15 steps), capped
    at 6 steps: the schedule shrinks to 6 steps with int(15 * 6 / 30) = 3 of warm-up. By hand, in units of the
    peak lr 1e-2 * 4 / 256: 1/3, 2/3, 1, then a half cosine over 3 steps: 1, (1 + cos(pi/3)) / 2, (1 + cos(2pi/3)) / 2."""
    root = write_png_folder(str(tmp_path / "imgs"))
    pretrain_here("--model", "vit_p4_32", "--data", root, "--batch-size", 4, "--epochs", 10, "--warmup-epochs", 5,
                  "--max-steps", 6, "--blr", 1e-2, "--log-every", 1, "--out-dir", tmp_path / "run")
    log, peak = read_log(tmp_path / "run"), 1e-2 * 4 / 256
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5, 6]
    assert [e["lr"] / peak for e in log] == pytest.approx([1 / 3, 2 / 3, 1, 1, 3 / 4, 1 / 4], rel=1e-9)
    assert [e["lr"] for e in log] == [pretrain.lr_at(s, 6, 3, peak) for s in range(6)]


def test_warmup_steps_are_not_lost_to_float_rounding(tmp_path):
    """72 images, batch 4: 18 steps per epoch; 0.6 epochs of warm-up capped from 18 to 5 steps is 0.6 * 18 * 5 / 18
    = 3 steps, though the float product is 2.9999999999999996. Peak lr at the third step, then a half cosine over 2."""
    root = write_png_folder(str(tmp_path / "imgs"), n_per_class=36)
    pretrain_here("--model", "vit_p4_32", "--data", root, "--batch-size", 4, "--epochs", 1, "--warmup-epochs", 0.6,
                  "--max-steps", 5, "--blr", 1e-2, "--log-every", 1, "--out-dir", tmp_path / "run")
    peak = 1e-2 * 4 / 256
    assert [e["lr"] / peak for e in read_log(tmp_path / "run")] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1 / 2], rel=1e-9)


def test_accumulation_equals_the_large_batch_and_resumes_exactly_at_an_epoch_boundary(tmp_path):
    """12 images: --batch-size 4 --accum-steps 2 makes one step of 8 per epoch, as --batch-size 8 does, on the
    same 8 images (one permutation per epoch). The 3rd micro-batch of 4 must be dropped, not leak into epoch 2's
    step, nor be lost only by a run resumed at the epoch boundary."""
    root = write_png_folder(str(tmp_path / "imgs"))
    common = ["--model", "vit_p4_32", "--data", root, "--epochs", 2, "--blr", 1e-2, "--log-every", 1]
    pretrain_here(*common, "--batch-size", 8, "--out-dir", tmp_path / "big")
    pretrain_here(*common, "--batch-size", 4, "--accum-steps", 2, "--keep-every", 1, "--out-dir", tmp_path / "accum")
    pretrain_here("--resume", tmp_path / "accum" / "ckpt_epoch001.pt", "--log-every", 1,
                  "--out-dir", tmp_path / "resumed")
    big, accum, resumed = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("big", "accum", "resumed"))
    assert big["step"] == accum["step"] == resumed["step"] == 2
    # float32: the accumulated gradient differs from the large batch's by rounding (1e-7 relative), and AdamW's
    # normalised step turns that into weight differences far below the lr (3e-4): measured 2e-10. A leaked
    # micro-batch moves weights by a fraction of the lr (~1e-5) and the logged loss by half (1.47 vs 0.98).
    for k in big["model"]:
        a, b, r = accum["model"][k], big["model"][k], resumed["model"][k]
        assert torch.allclose(a, b, rtol=0, atol=1e-6), f"{k}: accumulated vs large batch {(a - b).abs().max():.1e}"
        assert torch.equal(r, a), f"{k}: resumed vs uninterrupted {(r - a).abs().max():.1e}"  # bit for bit
    losses = {r: [e["loss"] for e in read_log(tmp_path / r)] for r in ("big", "accum", "resumed")}
    assert losses["accum"] == pytest.approx(losses["big"], rel=1e-6)
    assert losses["resumed"] == losses["accum"][1:]



def test_downloads_take_turns_under_torchrun(tmp_path, monkeypatch):
    """Every torchrun process runs the download: each holds a lock on the data root while torchvision fetches and
    extracts (a second taker would block), so none writes files another is writing; reading takes no lock."""
    fcntl = pytest.importorskip("fcntl")  # Windows: downloads go unlocked
    held, arrays = [], (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), [0, 1], ["a", "b"])

    def fetch(name, split, download, root):
        with open(os.path.join(root, ".download.lock")) as other:  # another process's attempt, in effect
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
        return arrays

    monkeypatch.setattr(data, "_torchvision_arrays", fetch)
    data.get_dataset("cifar10", "train", 32, train_aug=False, download=True, root=str(tmp_path / "new"))
    assert held == [True]
    monkeypatch.setattr(data, "_torchvision_arrays", lambda *args: arrays)
    data.get_dataset("cifar10", "train", 32, train_aug=False, root=str(tmp_path / "elsewhere"))
    assert not (tmp_path / "elsewhere").exists()  # without --download: no lock, no folder made
    (tmp_path / "a_file").write_text("")  # a root where no lock can be made (read-only, say): torchvision decides
    data.get_dataset("cifar10", "train", 32, train_aug=False, download=True, root=str(tmp_path / "a_file" / "sub"))


# ----------------------------------------------------------------------------- the device data path (issue 14)

def test_device_crops_draw_like_random_resized_crop():
    """20,000 boxes each from ours and from v2.RandomResizedCrop on 32 x 32: the same distribution of height,
    width and top (total variation of the histograms; sampling noise alone gives about 0.015), area and log-ratio."""
    top, left, h, w = device_data.random_resized_crops(torch.Generator().manual_seed(0), 20_000, 32, 32)
    torch.manual_seed(0)
    draws = [v2.RandomResizedCrop(32, scale=(0.2, 1.0)).make_params([torch.zeros(3, 32, 32)]) for _ in range(20_000)]
    ref = {k: torch.tensor([float(d[k]) for d in draws]) for k in ("top", "left", "height", "width")}
    tv = lambda a, b: 0.5 * (torch.bincount(a.long(), minlength=33) - torch.bincount(b.long(), minlength=33)).abs().sum() / len(a)
    for ours, theirs in ((h, ref["height"]), (w, ref["width"]), (top, ref["top"]), (left, ref["left"])):
        assert tv(ours, theirs) < 0.04
    assert (h * w).mean() / 1024 == pytest.approx((ref["height"] * ref["width"]).mean() / 1024, abs=0.01)
    assert (w / h).log().mean() == pytest.approx((ref["width"] / ref["height"]).log().mean(), abs=0.005)
    assert (w / h).log().std() == pytest.approx((ref["width"] / ref["height"]).log().std(), abs=0.005)
    assert ((top + h <= 32) & (left + w <= 32) & (h >= 1) & (w >= 1)).all()
    # an image too wide for the ratio range fails all 10 tries at scale 1: torchvision's central fallback
    top, left, h, w = device_data.random_resized_crops(torch.Generator().manual_seed(0), 8, 10, 40, scale=(1.0, 1.0))
    assert (h == 10).all() and (w == 13).all() and (left == 13).all() and (top == 0).all()


def test_device_batch_resamples_like_torchvision_and_slices_per_rank():
    """Each box is resized as v2.RandomResizedCrop resizes it on uint8 in the DataLoader path (bicubic with
    antialias=True: PIL's kernel, widened when shrinking, 8 bits between the two passes): within 2 levels of 255
    and 0.3 on average (ours skips the final rounding), whether the box is enlarged, shrunk (96 px into 32: the
    low-pass filter) or kept, flipped or not, grey or RGB. Two ranks' shares, side by side, are the one-process
    batch; the stream is fixed by (seed, epoch, micro)."""
    boxes = {32: [((0, 0, 32, 32), False), ((0, 0, 32, 32), True), ((4, 6, 16, 20), False), ((9, 2, 23, 11), True)],
             96: [((0, 0, 96, 96), True), ((10, 20, 50, 70), False), ((30, 1, 40, 90), True), ((7, 9, 20, 30), False)]}
    for side, channels in ((32, 3), (96, 3), (32, 1)):
        images = (torch.rand(4, channels, side, side) * 255).round().to(torch.uint8)
        for box, flipped in boxes[side]:
            got = device_data.crop_and_flip(images, *(torch.full((4,), float(v)) for v in (*box, -1 if flipped else 1)), 32)
            ref = v2.functional.resized_crop(images, *box, [32, 32], v2.InterpolationMode.BICUBIC)  # antialias=True
            ref = (v2.functional.horizontal_flip(ref) if flipped else ref).float().expand(-1, 3, -1, -1)
            error = (got - ref).abs()
            assert error.max() <= 2 and error.mean() <= 0.3, (side, channels, box, flipped, error.max(), error.mean())
    images = (torch.rand(4, 3, 32, 32) * 255).round().to(torch.uint8)
    fast = device_data.DeviceBatches(data.TensorImages(images, [0] * 4, None, ["x"]), ((0.5,) * 3, (0.25,) * 3), 32, "cpu")
    index = torch.tensor([3, 1, 2, 0])
    whole, noise = fast.batch(index, 7, 2, 5, 64)
    halves = [fast.batch(index, 7, 2, 5, 64, rank, 2) for rank in (0, 1)]
    assert torch.allclose(torch.cat([h[0] for h in halves]), whole, atol=1e-6)
    assert torch.equal(torch.cat([h[1] for h in halves]), noise)
    fast.batch(index, 2**32 - 1, 799, 10**6, 64)  # the largest seed, late in a long run: still a valid generator seed
    assert torch.equal(fast.batch(index, 7, 2, 5, 64)[0], whole)  # seeded: the same draws again
    assert not torch.equal(fast.batch(index, 7, 2, 6, 64)[1], noise)  # the next micro-batch draws anew


def test_device_data_run_resumes_bit_exact(tmp_path, monkeypatch):
    """--device-data on the embedded set: a run stopped after its step-3 checkpoint and resumed ends with the
    weights of the uninterrupted run, bit for bit (the draws are seeded by step, not by what ran before)."""
    flags = ["--model", "vit_p4_32", "--max-steps", 6, "--batch-size", 16, "--save-every", 3, "--device-data",
             "--log-every", 1]
    pretrain_here(*flags, "--out-dir", tmp_path / "whole")
    save = pretrain.save

    def save_then_stop(*args):
        save(*args)
        if args[5] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        pretrain_here(*flags, "--out-dir", tmp_path / "cut")
    monkeypatch.undo()
    pretrain_here("--resume", "--out-dir", tmp_path / "cut", "--log-every", 1)
    whole, cut = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("whole", "cut"))
    assert whole["step"] == cut["step"] == 6 and whole["args"]["device_data"] is True
    assert all(torch.equal(whole["model"][k], cut["model"][k]) for k in whole["model"])
    assert [e["loss"] for e in read_log(tmp_path / "cut")] == [e["loss"] for e in read_log(tmp_path / "whole")]

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


def test_decay_as_lr_runs_each_branch_output_at_its_own_lr(tmp_path, monkeypatch):
    """pretrain.py --decay-as-lr, as run: at every step the last branch's output layer moves at the logged lr x
    1/prod(alpha) (279x at alpha_min 0.6 and 12 blocks, by the paper's formula written out here) and a layer
    outside the encoder's branches at the logged lr."""
    models, steps = [], []
    param_groups, optimizer_step = pretrain.param_groups, pretrain.optimizer_step
    monkeypatch.setattr(pretrain, "param_groups", lambda model, *a, **k: models.append(model) or param_groups(model, *a, **k))

    def record(optimizer, scaler):
        steps.append({id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]})
        optimizer_step(optimizer, scaler)

    monkeypatch.setattr(pretrain, "optimizer_step", record)
    pretrain_here("--model", "vit_p4_32", "--decay-as-lr", "--max-steps", 3, "--batch-size", 8, "--log-every", 1,
                  "--out-dir", tmp_path)
    params = dict(models[0].named_parameters())
    last_branch, outside = id(params["encoder.blocks.11.mlp.fc2.weight"]), id(params["decoder_pred.weight"])
    scale = 1 / math.prod(1 - 0.4 * k / 23 for k in range(24))
    assert 279 < scale < 280 and len(steps) == 3
    for lrs, logged in zip(steps, read_log(tmp_path)):
        assert lrs[last_branch] == pytest.approx(logged["lr"] * scale, rel=1e-9)
        assert lrs[outside] == logged["lr"] > 0


def test_run_flags_reach_the_model_the_optimizer_and_the_data_order(tmp_path, capsys):
    """--alpha-min, --no-decoder-skips, --weight-decay and --seed as a run records and uses them: the config, the
    AdamW groups (decay on matrices only), and another seed's start (weights) and first batch (the logged loss)."""
    flags = ["--model", "vit_p4_32", "--max-steps", 1, "--batch-size", 8, "--log-every", 1]
    pretrain_here(*flags, "--alpha-min", 0.7, "--no-decoder-skips", "--weight-decay", 0.1, "--out-dir", tmp_path / "a")
    pretrain_here(*flags, "--alpha-min", 0.7, "--no-decoder-skips", "--weight-decay", 0.1, "--seed", 1,
                  "--out-dir", tmp_path / "b")
    a, b = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True) for run in ("a", "b"))
    assert a["config"]["alpha_min"] == 0.7 and a["config"]["decoder_skips"] is False and "mask_token" in a["model"]
    assert sorted(g["weight_decay"] for g in a["optimizer"]["param_groups"]) == [0.0, 0.1]
    assert not torch.equal(a["model"]["encoder.blocks.0.attn.qkv.weight"], b["model"]["encoder.blocks.0.attn.qkv.weight"])
    assert read_log(tmp_path / "a")[0]["loss"] != read_log(tmp_path / "b")[0]["loss"]
    capsys.readouterr()
    pretrain_here(*flags, "--alpha-schedule", "none", "--alpha-min", 0.7, "--out-dir", tmp_path / "c")
    assert "--alpha-min 0.7 does nothing under it" in capsys.readouterr().out


def test_decay_as_lr_groups_survive_torch_compile():
    """bench.py builds its optimizer from the compiled model, whose parameter names gain a prefix: the per-tensor
    groups of --decay-as-lr must still be found (they were not: 2 groups instead of one per scaled tensor)."""
    model = M.MAE(tiny(alpha_schedule="linear", decay_as_lr=True))
    groups = lambda m: [(g["weight_decay"], g.get("lr_scale"), [id(p) for p in g["params"]])
                        for g in pretrain.param_groups(m, 0.05)]
    assert len(groups(model)) == 2 + len(model.decay_scales()) > 2
    assert groups(torch.compile(model)) == groups(model)  # compiling is lazy: nothing runs here


def test_flops_match_the_vit_b16_count():
    # ViT-B/16, plain MAE decoder, mask 0.75: about 19.6 GFLOPs forward (issue 6's reference figure)
    cfg = M.preset("vit_b16", decoder_skips=False)
    assert common.flops_per_image(cfg, 0.75) / 1e9 == pytest.approx(19.6, abs=0.1)


@pytest.mark.parametrize("overrides", [dict(decoder_skips=True), dict(decoder_skips=False),
                                       dict(decoder_skips=True, depth=3)])  # odd: the last block feeds a skip too
def test_flops_match_torch_flop_counter(overrides):
    """MFU's numerator against torch's own count of the matmuls run: FlopCounterMode at batch 2 less batch 1 is
    the per-image part (parts computed once per batch, e.g. the skip decoder's embedding of positions, drop out).
    Its SDPA rule does not cover the CPU kernel, so the attention products 4*T*T*d per block are added by hand."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = M.preset("vit_m4_32", **overrides)
    model, counted = M.MAE(cfg), []
    for b in (1, 2):
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(b, 3, 32, 32))
        counted.append(counter.get_total_flops())  # a multiply-add counts 2, as in flops_per_image
    per_image = counted[1] - counted[0]
    t_enc, t_dec = 1 + 64 // 4, 1 + 64
    attention = cfg.depth * 4 * t_enc ** 2 * cfg.width + cfg.decoder_depth * 4 * t_dec ** 2 * cfg.decoder_width
    assert common.flops_per_image(cfg, 0.75) == per_image + attention


def test_pretrain_loss_falls_and_checkpoint_loads(tmp_path, capsys):
    out = tmp_path / "run"
    pretrain_here("--model", "vit_p4_32", "--max-steps", 40, "--batch-size", 64, "--blr", 5e-3, "--log-every", 10,
                  "--out-dir", out)
    stdout = capsys.readouterr().out
    assert "vit_p4_32" in stdout and "img/s" in stdout
    losses = [json.loads(line)["loss"] for line in open(out / "log.jsonl")]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.005, losses
    model = M.MAE.from_checkpoint(str(out / "ckpt.pt"))
    assert model.config.alpha_schedule == "linear" and model.config.width == 64
    assert (out / "recon_epoch001.png").exists()


def test_image_folder_pretraining_runs_and_skips_corrupt_files(tmp_path, capsys):
    root = write_png_folder(str(tmp_path / "imgs"), corrupt=2)
    pretrain_here("--model", "vit_p4_32", "--data", root, "--epochs", 1, "--batch-size", 14, "--workers", 0,
                  "--out-dir", tmp_path / "run")
    assert "skipped 1 unreadable image" in capsys.readouterr().err  # 14 files, 2 broken: the one epoch meets them
    assert M.MAE.from_checkpoint(str(tmp_path / "run" / "ckpt.pt")).config.img_size == 32


def test_keep_every_keeps_epoch_snapshots(tmp_path):
    root = write_png_folder(str(tmp_path / "imgs"))  # 12 training images: 3 steps of 4 per epoch
    pretrain_here("--model", "vit_p4_32", "--data", root, "--epochs", 4, "--batch-size", 4, "--keep-every", 2,
                  "--out-dir", tmp_path / "run")
    kept = sorted(f.name for f in (tmp_path / "run").glob("ckpt_epoch*.pt"))
    assert kept == ["ckpt_epoch002.pt", "ckpt_epoch004.pt"]
    assert torch.load(tmp_path / "run" / kept[0], weights_only=True)["step"] == 6
    last, final = (torch.load(tmp_path / "run" / f, weights_only=True) for f in (kept[1], "ckpt.pt"))
    assert all(torch.equal(last["model"][k], final["model"][k]) for k in final["model"])
    pretrain_here("--model", "vit_p4_32", "--data", root, "--epochs", 4, "--batch-size", 4, "--keep-every", 1,
                  "--max-steps", 4, "--out-dir", tmp_path / "capped")  # ends a third of the way into epoch 2
    assert sorted(f.name for f in (tmp_path / "capped").glob("ckpt_epoch*.pt")) == ["ckpt_epoch001.pt"]
    more = torch.load(tmp_path / "capped" / "ckpt.pt", weights_only=True)
    more["args"]["max_steps"] = 6  # to the end of epoch 2: a resume without --keep-every keeps its copy too
    torch.save(more, tmp_path / "capped" / "ckpt.pt")
    pretrain_here("--resume", "--out-dir", tmp_path / "capped")
    assert sorted(f.name for f in (tmp_path / "capped").glob("ckpt_epoch*.pt")) == ["ckpt_epoch001.pt", "ckpt_epoch002.pt"]


RECORDER = """# pretrain.main, recording each process's item order per epoch and its gradients at every optimizer step
import json, os, sys
sys.path.insert(0, {here!r})
import torch
import pretrain
rank, out = int(os.environ.get("RANK", 0)), sys.argv[1]
epoch_order, optimizer_step = pretrain.epoch_order, pretrain.optimizer_step
orders, grads = [], []

def recording_order(*args):
    orders.append(epoch_order(*args))
    with open(os.path.join(out, f"order{{rank}}.json"), "w") as f:
        json.dump(orders, f)
    return orders[-1]

def recording_step(optimizer, scaler):
    grads.append([p.grad.clone() for group in optimizer.param_groups for p in group["params"]])
    torch.save(grads, os.path.join(out, f"grads{{rank}}.pt"))
    optimizer_step(optimizer, scaler)

pretrain.epoch_order, pretrain.optimizer_step = recording_order, recording_step
pretrain.main(sys.argv[2:])
"""


def test_two_process_ddp_matches_one_process(tmp_path):
    """Same global batch of 16, as two accumulated micro-batches of 8 (DDP's no_sync path), same masks: the two
    ranks' items are disjoint halves of each one-process micro-batch, and the all-reduced gradient equals the
    one-process gradient at each of 4 steps (zero-initialised branches
    leave only decoder_pred with a gradient at step 1; by step 4 nearly every parameter has one). Weights after
    AdamW steps are a weak check: Adam's step ignores the gradient's scale, except through its eps."""
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER.format(here=HERE))
    root = write_png_folder(str(tmp_path / "imgs"), n_per_class=32)  # 64 images, 4 steps: cheaper than the embedded set
    common = ["--model", "vit_p4_32", "--data", root, "--max-steps", 4, "--batch-size", 8, "--accum-steps", 2, "--blr", 1e-3,
              "--log-every", 1]
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    run(recorder, tmp_path / "one", *common, "--out-dir", tmp_path / "one")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--standalone", str(recorder), str(tmp_path / "two"), *map(str, common),
                             "--out-dir", str(tmp_path / "two")], capture_output=True, text=True, timeout=300, cwd=HERE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert "Grad strides do not match" not in result.stderr  # DDP's warning about the decoder cls token's slice
    logged_one, logged_two = read_log(tmp_path / "one"), read_log(tmp_path / "two")  # the whole batch's loss, not rank 0's
    assert [e["loss"] for e in logged_two] == pytest.approx([e["loss"] for e in logged_one], rel=1e-6)
    one, rank0, rank1 = (torch.tensor(json.loads((tmp_path / d / f"order{r}.json").read_text())[0])
                         for d, r in (("one", 0), ("two", 0), ("two", 1)))
    assert not set(rank0.tolist()) & set(rank1.tolist())
    halves = torch.cat([rank0.view(-1, 4), rank1.view(-1, 4)], dim=1)  # micro-batch b of each rank, side by side
    assert torch.equal(halves.sort(dim=1).values, one.view(-1, 8).sort(dim=1).values)  # together: micro-batch b
    model = M.MAE(M.preset("vit_p4_32"))
    names = {id(p): n for n, p in model.named_parameters()}
    names = [names[id(p)] for group in pretrain.param_groups(model, 0.05) for p in group["params"]]
    steps_one, steps_two = torch.load(tmp_path / "one" / "grads0.pt"), torch.load(tmp_path / "two" / "grads0.pt")
    assert len(steps_one) == len(steps_two) == 4
    assert steps_one[-1][names.index("encoder.blocks.0.attn.qkv.weight")].norm() > 0  # the gradient reached block 0
    for step, (grads_one, grads_two) in enumerate(zip(steps_one, steps_two), start=1):
        for name, g1, g2 in zip(names, grads_one, grads_two, strict=True):  # float32: only rounding differs
            diff = (g2 - g1).norm()
            assert diff <= 1e-4 * g1.norm() + 1e-9, f"step {step}, {name}: {diff:.2e} off a gradient of norm {g1.norm():.2e}"


POISON = """import os, sys
sys.path.insert(0, {here!r})
import model, pretrain
forward, calls = model.MAE.forward, [0]

def poisoned(self, *args, **kwargs):  # rank 1's 6th training step gets a NaN loss; rank 0's stays finite
    loss, pred, mask = forward(self, *args, **kwargs)
    calls[0] += 1
    return (loss * float("nan") if os.environ["RANK"] == "1" and calls[0] == 6 else loss), pred, mask

model.MAE.forward = poisoned
pretrain.main(sys.argv[1:])
"""


def test_ddp_stops_every_rank_before_saving_after_a_non_finite_loss_on_one(tmp_path):
    """A NaN loss on rank 1 at step 6 (as the log counts them) reaches rank 0's weights through the all-reduce,
    while rank 0's own loss is still finite: the checkpoint due after step 6 must not be written, so ckpt.pt stays
    the good one of step 3."""
    (tmp_path / "poison.py").write_text(POISON.format(here=HERE))
    root = write_png_folder(str(tmp_path / "imgs"), n_per_class=32)
    flags = ["--model", "vit_p4_32", "--data", root, "--max-steps", 8, "--batch-size", 8, "--save-every", 3,
             "--log-every", 100, "--out-dir", tmp_path / "run"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             tmp_path / "poison.py", *map(str, flags)], capture_output=True, text=True,
                            timeout=300, cwd=HERE)
    assert result.returncode != 0 and "became non-finite at step 6" in result.stderr, result.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and all(v.isfinite().all() for v in ckpt["model"].values())


def test_describe_machine_names_the_cpu_generation(tmp_path):
    """A run's last digits differ between CPU generations; the console says which one ran it, as /proc/cpuinfo has it."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n"
                    "\nprocessor\t: 1\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n")
    kernels = torch.backends.cpu.get_cpu_capability()
    assert common.describe_machine("cpu", info) == f"AMD EPYC family 25 model 1, {kernels} kernels, torch {torch.__version__}"
    assert common.describe_machine("cpu", tmp_path / "absent") == f"unknown CPU, {kernels} kernels, torch {torch.__version__}"


# ----------------------------------------------------------------------------- reliability

import multiprocessing
import signal
import threading
import time


STOP_FLAGS = ["--model", "vit_p4_32", "--max-steps", 16, "--batch-size", 16, "--save-every", 3, "--blr", 2e-3,
              "--log-every", 1]


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    run("pretrain.py", *STOP_FLAGS, "--out-dir", out)
    return torch.load(out / "ckpt.pt", weights_only=True)


def signal_when_ready(command, send, ready, poll=0.05):
    """Start python with command, in a process group of its own; once ready(process) holds (asked every poll
    seconds), send(process) signals it. (exit code, stdout, stderr); a run that then hangs is killed, group and all."""
    proc = subprocess.Popen([sys.executable, *map(str, command)], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not ready(proc):
        time.sleep(poll)
    send(proc)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, stdout, stderr


def stop_run(out, send, ready=None, launcher=(), extra=(), poll=0.05):
    """signal_when_ready for the STOP_FLAGS run into out (with extra flags, under a launcher such as torchrun); ready
    defaults to 4 log lines."""
    log = out / "log.jsonl"
    ready = ready or (lambda proc: log.exists() and len(log.read_text().splitlines()) >= 4)
    return signal_when_ready([*launcher, "pretrain.py", *STOP_FLAGS, *extra, "--out-dir", out], send, ready, poll)


def to_group(how, times=1):
    """A send for stop_run: signal `how` to the run's whole process group, `times` times 0.1 s apart."""
    def send(proc):
        for _ in range(times):
            os.killpg(proc.pid, how)
            time.sleep(0.1)
    return send


def resumes_to_the_whole_run(out, whole_run, stopped_at):
    result = run("pretrain.py", "--resume", "--out-dir", out, "--log-every", 1)
    assert f"resuming at step {stopped_at}" in result.stdout
    resumed = torch.load(out / "ckpt.pt", weights_only=True)
    assert resumed["step"] == whole_run["step"] == 16
    for k in whole_run["model"]:
        assert torch.equal(whole_run["model"][k], resumed["model"][k]), k  # bit for bit
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == list(range(1, 17))  # none lost or repeated


def test_killed_run_resumes_to_identical_weights(tmp_path, whole_run):
    out = tmp_path / "killed"
    ckpt = out / "ckpt.pt"
    code, _, _ = stop_run(out, lambda proc: proc.send_signal(signal.SIGKILL),  # as soon as a mid-run checkpoint lands
                          lambda proc: ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= 6)
    assert code == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 6 <= killed_at < 16
    resumes_to_the_whole_run(out, whole_run, killed_at)


def test_ctrl_c_saves_the_step_under_way_and_resumes_to_identical_weights(tmp_path, whole_run):
    """Ctrl-C saves the step it lands in (due for a save or not), exits 130 with one line, and --resume goes on."""
    out = tmp_path / "stopped"
    code, stdout, stderr = stop_run(out, lambda proc: proc.send_signal(signal.SIGINT))
    assert code == 130, stderr
    stopped_at = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert 4 <= stopped_at < 16 and "Ctrl-C: saving after this step" in stdout
    assert stderr.strip().splitlines() == [f"stopped by Ctrl-C after step {stopped_at}, saved to {out / 'ckpt.pt'}; "
                                           "the same command with --resume goes on from there"]
    resumes_to_the_whole_run(out, whole_run, stopped_at)


def test_a_run_piped_into_tee_saves_on_ctrl_c_though_tee_is_gone(tmp_path):
    """`python pretrain.py | tee log`, then Ctrl-C, which ends tee too: the next print went to a pipe without a
    reader and raised BrokenPipeError before the save. The run's output now goes nowhere, and the run saves."""
    out = tmp_path / "piped"

    def reader_gone_then_ctrl_c(proc):
        proc.stdout.close()
        os.killpg(proc.pid, signal.SIGINT)

    code, _, stderr = stop_run(out, reader_gone_then_ctrl_c)
    stopped_at = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert code == 130 and stderr.strip().splitlines() == [
        f"stopped by Ctrl-C after step {stopped_at}, saved to {out / 'ckpt.pt'}; the same command with --resume goes "
        "on from there"], stderr


@pytest.mark.parametrize("code", [errno.EPIPE, errno.EIO, errno.ENOSPC])
def test_output_goes_to_devnull_once_its_reader_is_gone(code):
    """EPIPE (the pipe's reader ended) and EIO (the terminal closed): the write is dropped and the descriptor then
    leads to /dev/null, so nothing more reaches the pipe; any other error (a full disk) is still raised."""
    read_end, write_end = os.pipe()

    class Gone(io.StringIO):
        def write(self, text):
            raise OSError(code, os.strerror(code))

        def fileno(self):
            return write_end

    out = common.OutlivesItsReader(Gone())
    try:
        if code == errno.ENOSPC:
            with pytest.raises(OSError):
                out.write("x")
            return
        assert out.write("x") == 1
        os.write(write_end, b"after")  # now into /dev/null: the pipe's only write end is gone
        os.close(write_end)
        write_end = None
        assert os.read(read_end, 16) == b""
    finally:
        os.close(read_end)
        if write_end is not None:
            os.close(write_end)


@pytest.mark.parametrize("how,name,exit_code", [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGHUP, "SIGHUP", 129)])
def test_sigterm_to_every_process_of_a_run_saves_the_step_as_ctrl_c_does(tmp_path, how, name, exit_code):
    """What `timeout` or a cluster's scheduler at its time limit sends: SIGTERM to the whole process group, loader
    workers included, here twice; or SIGHUP, what a closed terminal or ssh session sends. The step under way is
    saved and the run exits 143 (129) with one line; the second signal changes nothing (a worker that died of the
    first would have ended the run unsaved)."""
    out = tmp_path / "run"
    code, stdout, stderr = stop_run(out, to_group(how, times=2), extra=["--workers", 1])
    assert code == exit_code, stderr
    stopped_at = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert 4 <= stopped_at < 16 and stdout.count(f"{name}: saving after this step") == 1
    assert stderr.strip().splitlines() == [f"stopped by {name} after step {stopped_at}, saved to {out / 'ckpt.pt'}; "
                                           "the same command with --resume goes on from there"]


def test_a_run_whose_terminal_closes_saves_its_step(tmp_path):
    """An ssh session that drops: the run's terminal (a pty here, the run its session leader) goes away, the kernel
    sends SIGHUP, and every later write to the terminal fails with EIO. The run saves the step under way and exits
    129 (it was killed by the SIGHUP, unsaved, until stop 36)."""
    import pty
    import select
    pid, terminal = pty.fork()
    if pid == 0:  # the run, in a session of its own on the new terminal
        os.environ["OMP_NUM_THREADS"] = "1"
        os.execv(sys.executable, [sys.executable, os.path.join(HERE, "pretrain.py"), *map(str, STOP_FLAGS),
                                  "--out-dir", str(tmp_path / "run")])
    shown, deadline = b"", time.time() + 120
    while b"step 4/" not in shown and time.time() < deadline:
        if select.select([terminal], [], [], 1)[0]:
            shown += os.read(terminal, 4096)
    os.close(terminal)  # the hang-up
    for _ in range(1200):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"the run did not stop after its terminal closed: {shown[-2000:]!r}")
    assert os.waitstatus_to_exitcode(status) == 129, shown[-2000:]
    assert 4 <= torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] < 16


@pytest.fixture
def stop_handlers_kept():
    """Tests that set handlers of Ctrl-C and SIGTERM in this process leave pytest's own in place after them."""
    kept = {s: signal.getsignal(s) for s in common.STOP_SIGNALS}
    yield
    for s, handler in kept.items():
        signal.signal(s, handler)


def loader_worker_started(run):
    """Whether a loader worker of the run exists yet, started by spawn or by a fork server (other processes of the
    session: the resource tracker, the fork server itself, `ldconfig` run by `import torch`)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat, cmdline = open(f"/proc/{pid}/stat").read(), open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        parent, _, session = map(int, stat.rsplit(")", 1)[1].split()[1:4])  # after the name: state, ppid, pgrp, sid
        worker = b"spawn_main" in cmdline or (b"forkserver" in cmdline and parent != run.pid)
        if session == run.pid and int(pid) != run.pid and worker:
            return True
    return False


def starting_workers_by(start_method):
    """A launcher (python's arguments before the script) that makes the script's processes start as on macOS (spawn)
    or Python 3.14's Linux (forkserver)."""
    return ["-c", f"import multiprocessing, runpy, sys; multiprocessing.set_start_method({start_method!r}); "
                  "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"]


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_sigterm_as_loader_workers_start_by_spawn_or_forkserver_saves(tmp_path, start_method):
    """Workers started by spawn (macOS's default) or by a fork server (Python 3.14's on Linux) must not die of a
    SIGTERM to the group that lands while they start: a dead spawned worker left the run waiting for ever, a dead
    fork-server worker ended it unsaved. The signal goes the moment a worker process exists."""
    out = tmp_path / "run"
    code, _, stderr = stop_run(out, to_group(signal.SIGTERM), loader_worker_started, starting_workers_by(start_method),
                               ["--workers", 1], 0.005)
    assert code == 143, stderr[-3000:]
    stopped_at = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert stderr.strip().splitlines()[-1].startswith(f"stopped by SIGTERM after step {stopped_at}, saved")


def torchrun_worker(parent, rank):
    """The pid of torchrun's worker process of that rank, read from /proc (Linux)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status, environ = open(f"/proc/{pid}/status").read(), open(f"/proc/{pid}/environ", "rb").read()
        except OSError:
            continue
        if f"PPid:\t{parent}\n" in status and f"RANK={rank}".encode() in environ.split(b"\0"):
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} under {parent}")


@pytest.mark.parametrize("how,one", [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGTERM, True),
                                    (signal.SIGHUP, False)], ids=["ctrl-c", "sigterm", "sigterm-rank-1", "sighup"])
def test_a_signal_to_a_torchrun_job_stops_every_process_at_one_saved_step(tmp_path, how, one):
    """Ctrl-C at a terminal, a scheduler's SIGTERM or a closed terminal's SIGHUP reaches torchrun and both
    processes, and torchrun passes it on once more. The processes must agree on one step, save it once and stop; the repeat must not stop them
    unsaved (under torchrun a second Ctrl-C is ignored, as a second SIGTERM always is). A SIGTERM to rank 1 alone
    stops both too, and rank 0, which speaks, names it and exits as it would have (143)."""
    out = tmp_path / "run"
    log = out / "log.jsonl"
    send = (lambda proc: os.kill(torchrun_worker(proc.pid, 1), how)) if one else to_group(how)
    _, stdout, stderr = stop_run(out, send, launcher=["-m", "torch.distributed.run", "--nproc_per_node", 2,
                                                      "--standalone"])  # a free port: parallel runs cannot collide
    stopped_at = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    by = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}[how]
    assert 4 <= stopped_at < 16 and f"stopped by {by} after step {stopped_at}, saved" in stderr, stderr[-3000:]
    assert stderr.count("stopped by") == 1 and "second Ctrl-C" not in stderr
    assert stdout.count(f"{by}: saving") == (0 if one else 1)  # rank 0 says it when it had the signal itself
    if one:
        assert stderr.count("exitcode  : 143") == 2, stderr[-3000:]  # both processes
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, stopped_at + 1))


def test_a_signal_during_the_stop_vote_of_torchrun_processes_counts_at_the_next_vote(monkeypatch, stop_handlers_kept):
    """Under torchrun the processes vote at each log line on stopping. A signal that lands while one process votes
    (after it cast 0) must not make that process alone stop: it went to the exit while the others trained on, and
    the job hung (1 run in 8 of the test above). Once the vote says stop, every process ignores later signals, as
    one that had the signal does: torchrun passes it on to the others when the first exits, and one landing as
    Python shut down ended a saved process with -15."""
    monkeypatch.setattr(pretrain.Stop, "asked", False)
    monkeypatch.setattr(pretrain.Stop, "exit_code", 130)
    monkeypatch.setattr(pretrain.Stop, "by", "Ctrl-C")
    votes = []

    def all_reduce(code, op):  # the others cast 0; this process's signal arrives during the first vote
        votes.append(int(code.item()))
        pretrain.Stop.exit_code, pretrain.Stop.asked = 143, True
    monkeypatch.setattr(pretrain.dist, "all_reduce", all_reduce)
    assert pretrain.stop_agreed(torch.device("cpu"), 2) is False  # as every other process reads the vote
    assert pretrain.stop_agreed(torch.device("cpu"), 2) is True and votes == [0, 143]
    assert [signal.getsignal(s) for s in common.STOP_SIGNALS] == [signal.SIG_IGN] * 3 and pretrain.Stop.by == "SIGTERM"


def test_ctrl_c_after_the_save_decision_stops_at_the_next_step_saved(tmp_path, monkeypatch, capsys):
    """A press that lands after a step decided not to save (here in its log line's host sync, as in a stalled
    `| less`) must not stop that step unsaved while saying it saved: the run goes on to the next step and saves it."""
    out, check, calls = tmp_path / "run", pretrain.stop_if_not_finite, []

    def check_then_press(*args, **kwargs):  # called at every log line: steps 1, 2, 3, ...
        check(*args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            pretrain.Stop.asked = True

    monkeypatch.setattr(pretrain.Stop, "asked", False)
    monkeypatch.setattr(pretrain, "stop_if_not_finite", check_then_press)
    with pytest.raises(SystemExit) as stopped:
        pretrain_here("--model", "vit_p4_32", "--max-steps", 8, "--batch-size", 8, "--save-every", 3, "--log-every", 1,
                      "--out-dir", out)
    assert stopped.value.code == 130 and "after step 5, saved" in capsys.readouterr().err
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 5  # the step it names, not step 3's save


def test_ctrl_c_during_start_up_stops_unsaved_and_leaves_the_folder_free(tmp_path, monkeypatch, capsys):
    """A press while the data loads (here: as the model is built) has no step of the run to save: the run stops
    before its first step, writes no checkpoint, and the same folder takes a new run."""
    build = pretrain.build

    def build_then_press(*args):
        pretrain.Stop.asked = True
        return build(*args)

    monkeypatch.setattr(pretrain.Stop, "asked", False)
    monkeypatch.setattr(pretrain, "build", build_then_press)
    with pytest.raises(SystemExit) as stopped:
        pretrain_here("--model", "vit_p4_32", "--max-steps", 2, "--batch-size", 8, "--out-dir", tmp_path / "run")
    assert stopped.value.code == 130 and "before the first step; nothing was saved" in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("ckpt*.pt"))
    monkeypatch.undo()
    pretrain_here("--model", "vit_p4_32", "--max-steps", 2, "--batch-size", 8, "--out-dir", tmp_path / "run")


def test_resumed_log_matches_the_whole_run_and_drops_a_torn_line(tmp_path, monkeypatch):
    """Saves at step 3, log lines every 2 steps: the step-4 line must not mix steps 3 and 4 in the whole run and
    step 4 alone in the resumed one. A line half-written by a killed run, or any line that is not a record,
    must not stop the resume."""
    out, save = tmp_path / "run", pretrain.save

    def save_and_copy(*args):  # save(model, optimizer, scaler, args, epoch, step, n_train, path)
        save(*args)
        if args[5] == 3:
            shutil.copy(args[-1], out / "step3.pt")

    monkeypatch.setattr(pretrain, "save", save_and_copy)
    flags = ["--model", "vit_p4_32", "--max-steps", 4, "--batch-size", 8, "--save-every", 3, "--log-every", 2]
    pretrain_here(*flags, "--out-dir", out)
    whole = read_log(out)
    with open(out / "log.jsonl", "a") as f:
        f.write('\nnot a record\n[5]\n{"step": 5, "epo')  # a blank line, a hand edit, a line cut by a kill
    (out / "ckpt.pt").unlink()  # going back in place: the later ckpt.pt moved away first, or the resume is refused
    pretrain_here("--resume", out / "step3.pt")
    resumed = read_log(out)
    assert [e["step"] for e in whole] == [e["step"] for e in resumed] == [2, 3, 4]
    assert [e["loss"] for e in whole] == [e["loss"] for e in resumed]


def test_a_report_that_cannot_be_written_leaves_the_old_one_whole(tmp_path, monkeypatch, capsys):
    """save_json writes through a temp file too: a disk that fills mid-write used to leave a cut JSON file."""
    path = tmp_path / "probe.json"
    common.save_json(path, {"acc": 0.5})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(common.os, "fsync", disk_full)
    with pytest.raises(SystemExit) as stop:
        common.save_json(path, {"acc": 0.7})
    monkeypatch.undo()
    error = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and len(error) == 1 and "No space left on device" in error[0]
    assert json.loads(path.read_text()) == {"acc": 0.5} and os.listdir(tmp_path) == ["probe.json"]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    common.save_atomic({"step": 1}, path)

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    def torch_disk_full(obj, f):  # as torch.save reports it: its zip writer's RuntimeError, raised over the OSError
        try:
            disk_full(obj, f)
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    for writer in (disk_full, torch_disk_full):
        monkeypatch.setattr(torch, "save", writer)
        with pytest.raises(OSError, match="No space left on device.*before, if any, is unchanged"):
            common.save_atomic({"step": 2}, path)
        assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind

    def ctrl_c_again(obj, f):  # the second Ctrl-C, which stops at once, lands mid-write
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", ctrl_c_again)
    with pytest.raises(KeyboardInterrupt):
        common.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_resume_accepts_flags_that_say_what_the_checkpoint_holds(tmp_path):
    """The checkpoint records no --img-size (None: the preset's 32) and its image folder as given; saying either
    again in another spelling resumes. A size that differs is refused, and so is ./glyphs for the named set
    glyphs: that spelling names a folder."""
    root = write_png_folder(str(tmp_path / "imgs"))
    run_dir = tmp_path / "run"
    pretrain_here("--model", "vit_p4_32", "--max-steps", 1, "--batch-size", 8, "--data", root, "--out-dir", run_dir)
    pretrain_here("--resume", "--out-dir", run_dir, "--img-size", 32, "--data", root + "/./")
    for other in (["--img-size", 64], ["--data", root + "2"]):
        with pytest.raises(SystemExit):
            pretrain_here("--resume", "--out-dir", run_dir, *other)
    pretrain_here("--model", "vit_p4_32", "--max-steps", 1, "--batch-size", 8, "--out-dir", tmp_path / "named")
    with pytest.raises(SystemExit):
        pretrain_here("--resume", "--out-dir", tmp_path / "named", "--data", "./glyphs")


def test_resume_refuses_a_preset_edited_since_the_checkpoint(tmp_path, monkeypatch, capsys):
    """The flags rebuild the model from its preset; once that preset says otherwise, a resume would train another
    network (same shapes: silently) or fail inside load_state_dict. Both end in one line naming the field."""
    pretrain_here("--model", "vit_p4_32", "--max-steps", 2, "--batch-size", 8, "--out-dir", tmp_path)
    for edit, named in ((dict(decoder_heads=4), "decoder_heads 4 (checkpoint: 2)"), (dict(depth=3), "depth 3")):
        monkeypatch.setitem(M.PRESETS, "vit_p4_32", {**M.PRESETS["vit_p4_32"], **edit})
        capsys.readouterr()
        with pytest.raises(SystemExit):
            pretrain_here("--resume", "--out-dir", tmp_path)
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and named in err and "preset vit_p4_32" in err
        monkeypatch.undo()
    pretrain_here("--resume", "--out-dir", tmp_path)  # put back, it goes on


def test_a_run_finds_its_image_folder_from_anywhere_and_after_a_move(tmp_path, monkeypatch, capsys):
    """--data imgs (relative) is recorded as an absolute path, so probe.py finds it from another folder. Once
    the folder has moved, probe.py and --resume say so in one line; --resume --data NEW goes on there (the same
    image count) and records it, and --data pointing at other data with another count is still refused."""
    monkeypatch.chdir(tmp_path)
    write_png_folder("imgs")
    pretrain_here("--model", "vit_p4_32", "--max-steps", 1, "--batch-size", 8, "--data", "imgs", "--out-dir", "run")
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["args"]["data"] == str(tmp_path / "imgs")
    ckpt_path = tmp_path / "run" / "ckpt.pt"
    call(PROBE, ckpt_path, "--n-train", 8, "--n-test", 4, "--epochs", 1, "--layers", 1)  # call() runs in the repo
    os.rename(tmp_path / "imgs", tmp_path / "moved")
    write_png_folder(str(tmp_path / "other"), n_per_class=7)
    capsys.readouterr()
    for command in ([PROBE, ckpt_path], [PRETRAIN, "--resume", ckpt_path]):
        result = call(*command, check=False)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
        assert "imgs, which is not there" in result.stderr and "pass --data" in result.stderr
    with pytest.raises(SystemExit):
        pretrain_here("--resume", ckpt_path, "--data", "other")  # 14 images, not the run's 12
    assert "the run trained on 12 images, the data now holds 14" in capsys.readouterr().err
    pretrain_here("--resume", ckpt_path, "--data", "moved")  # finished: nothing saved, so probe.py needs the flag too
    assert f"next: python probe.py {ckpt_path} --data {tmp_path / 'moved'}" in capsys.readouterr().out
    more = torch.load(ckpt_path, weights_only=True)
    more["args"]["max_steps"] = 2  # one step left to go
    torch.save(more, ckpt_path)
    pretrain_here("--resume", ckpt_path, "--data", "moved")
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["step"] == 2 and ckpt["args"]["data"] == str(tmp_path / "moved")


def test_the_next_commands_can_be_pasted_for_a_folder_with_a_space(tmp_path, capsys):
    pretrain_here("--model", "vit_p4_32", "--max-steps", 1, "--batch-size", 8, "--out-dir", tmp_path / "my run")
    hint = [line for line in capsys.readouterr().out.splitlines() if line.startswith("next: ")][0]
    probe_command = shlex.split(hint[len("next: "):].split("   and   ")[0])
    assert probe_command == ["python", "probe.py", str(tmp_path / "my run" / "ckpt.pt")]


def test_a_log_line_that_cannot_be_written_stops_in_one_line(tmp_path, monkeypatch, capsys):
    real_open = open

    def full_disk_for_the_log(path, mode="r", *args, **kwargs):
        if str(path).endswith("log.jsonl") and mode == "a":
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(pretrain, "open", full_disk_for_the_log, raising=False)
    with pytest.raises(SystemExit) as stop:
        pretrain_here("--model", "vit_p4_32", "--max-steps", 2, "--batch-size", 8, "--out-dir", tmp_path / "run")
    error = capsys.readouterr().err.splitlines()
    assert stop.value.code == 1 and len(error) == 1 and "could not write" in error[0] and "No space left" in error[0]


def test_a_second_run_into_a_folder_in_use_stops_in_one_line(tmp_path, capsys):
    """Another process holding the folder's lock (here: another open file of the same .lock, which flock
    treats alike) makes a run there stop before it writes; once the lock is let go, the run goes ahead."""
    import fcntl
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as other, pytest.MonkeyPatch.context() as patch:
        fcntl.flock(other, fcntl.LOCK_EX)
        patch.setattr(data, "get_dataset", lambda *a, **k: pytest.fail("the data were built before the check"))
        with pytest.raises(SystemExit) as stop:  # told before the data are built (a scan of ImageNet takes minutes)
            pretrain_here("--model", "vit_p4_32", "--max-steps", 1, "--batch-size", 8, "--out-dir", out)
    error = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and len(error) == 1 and "is in use by another pretrain.py run" in error[0]
    assert sorted(os.listdir(out)) == [".lock"]
    pretrain_here("--model", "vit_p4_32", "--max-steps", 1, "--batch-size", 8, "--out-dir", out)
    assert (out / "ckpt.pt").exists()
    shutil.rmtree(out)  # the folder made anew (a notebook calling main() again): the run locks the new .lock
    pretrain_here("--model", "vit_p4_32", "--max-steps", 1, "--batch-size", 8, "--out-dir", out)
    with open(out / ".lock") as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.parametrize("below", ["", "sub"])
def test_an_out_dir_where_a_file_is_stops_before_the_data(tmp_path, capsys, monkeypatch, below):
    (tmp_path / "afile").write_text("notes")
    monkeypatch.setattr(data, "get_dataset", lambda *a, **k: pytest.fail("the data were built before the check"))
    with pytest.raises(SystemExit) as stop:
        pretrain_here("--out-dir", tmp_path / "afile" / below)
    error = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and len(error) == 1 and "afile is a file, not a folder" in error[0]


def test_a_bad_input_found_after_the_out_dir_check_leaves_no_folder(tmp_path, capsys):
    """The out-dir is checked before the data are built, but only made once every input has passed."""
    with pytest.raises(SystemExit) as stop:
        pretrain_here("--data", tmp_path / "no_such_images", "--out-dir", tmp_path / "new" / "run")
    assert stop.value.code == 2 and len(capsys.readouterr().err.splitlines()) == 1
    assert not (tmp_path / "new").exists()


SCRIPTS = ["pretrain.py", "probe.py", "rank.py", "bench.py", "glyphs.py",
           *sorted(f"results/{f}" for f in os.listdir(os.path.join(HERE, "results")) if f.endswith(".py"))]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help_without_doing_its_work(script, monkeypatch, capsys):
    """--help prints usage and exits 0 before any work: results/baselines.py used to start its 5-minute job (and
    write over its committed result), glyphs.py to generate the data set and then fail."""
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the results scripts add the repo's folder to it
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(os.path.join(HERE, script), run_name="__main__")
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("usage:")


def test_glyphs_preview_into_a_missing_folder_stops_before_drawing(tmp_path, monkeypatch, capsys):
    """It used to draw both splits (a minute on CPU) and then fail to save, with a traceback."""
    monkeypatch.setattr(sys, "argv", ["glyphs.py", str(tmp_path / "no_such_folder" / "x.png")])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(os.path.join(HERE, "glyphs.py"), run_name="__main__")
    assert stop.value.code == 2 and "no_such_folder is not a folder this user can write" in capsys.readouterr().err


def test_a_facebookresearch_mae_training_checkpoint_loads(tmp_path):
    """checkpoint-N.pth of facebookresearch/mae's main_pretrain.py: the whole MAE's weights (decoder included, which
    is left out), the optimizer, the epoch, and the flags as an argparse.Namespace (which weights_only refuses unless
    allowed by name)."""
    source = randomise(M.MAE(tiny(alpha_schedule="none", decoder_skips=False, width=128, heads=2))).eval()
    weights = timm_layout(source) | {"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(32, 128)}
    torch.save({"model": weights, "optimizer": {"state": {}, "param_groups": []}, "epoch": 799, "scaler": {},
                "args": argparse.Namespace(model="mae_vit_base_patch16", norm_pix_loss=True)}, tmp_path / "checkpoint-799.pth")
    model, ckpt = probe.load_model(str(tmp_path / "checkpoint-799.pth"))
    imgs = torch.randn(2, 3, 32, 32)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(source.features(imgs), model.eval().features(imgs)))
    direct = M.MAE.from_checkpoint(str(tmp_path / "checkpoint-799.pth")).eval()  # the API reads it too
    assert all(torch.equal(a, b) for a, b in zip(direct.features(imgs), model.features(imgs)))
    assert probe.trained_args(ckpt) == {} and probe.epochs_done(ckpt) is None  # its data: --data says


def test_probe_refuses_weights_for_other_than_rgb_in_one_line(tmp_path, capsys):
    """A 1-channel patch embedding loads (its layout is valid) but every data set here is RGB: said at load."""
    state = timm_layout(M.MAE(tiny(width=128, heads=2, in_chans=1)))
    torch.save(state, tmp_path / "grey.pt")
    with pytest.raises(SystemExit) as stop:
        probe.load_model(str(tmp_path / "grey.pt"))
    assert stop.value.code == 2 and capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path / 'grey.pt'}: its patch embedding takes 1-channel images; the data here are 3-channel RGB"]


def test_the_closing_line_counts_this_sessions_steps(tmp_path, capsys):
    out = tmp_path / "run"
    pretrain_here("--model", "vit_p4_32", "--max-steps", 2, "--batch-size", 8, "--log-every", 1, "--out-dir", out)
    printed = capsys.readouterr().out
    assert "done: step 2 of 2 (2 in this session" in printed
    assert "epoch 1/1 step 2/2" in printed  # the capped run's epochs, not the 2 planned
    assert "note: the loss, 0.9" in printed  # 2 steps: still on the plateau, where probes mislead
    before = (out / "ckpt.pt").read_bytes()
    pretrain_here("--resume", "--out-dir", out)  # a finished run: said so, and nothing written
    printed = capsys.readouterr().out
    assert "done: step 2 of 2 (finished before this command: nothing left to train)" in printed
    assert (out / "ckpt.pt").read_bytes() == before
    assert "note: the loss, 0.9" in printed  # from the loss the checkpoint keeps


def test_the_plateau_note_is_for_runs_near_the_flat_prediction():
    """In norm-pix units a flat prediction of a 4 x 4 x 3 patch costs (48 - 1) / 48 = 0.979; the default run's
    plateau is 0.965 (README), its end 0.77."""
    cfg = M.preset("vit_m4_32")
    assert "still near 0.979" in common.plateau_note(0.965, cfg)
    assert common.plateau_note(0.77, cfg) is None and common.plateau_note(None, cfg) is None
    assert common.plateau_note(0.965, M.preset("vit_m4_32", norm_pix_loss=False)) is None


def test_a_report_about_to_be_replaced_is_named(tmp_path, capsys):
    report = tmp_path / "probe_compare.json"
    report.write_text(json.dumps({"checkpoints": [{"checkpoint": "a/ckpt.pt"}, {"checkpoint": "b/ckpt.pt"}]}))
    common.note_if_replacing(str(report), ["a/ckpt.pt", "b/ckpt.pt"])  # the same comparison again: no note
    common.note_if_replacing(str(report), ["./a/ckpt.pt", os.path.abspath("b/ckpt.pt")])  # spelled otherwise
    assert capsys.readouterr().out == ""
    common.note_if_replacing(str(report), ["a/ckpt.pt", "c/ckpt.pt"])
    assert capsys.readouterr().out.startswith(f"note: {report} holds the report of a/ckpt.pt, b/ckpt.pt; this run replaces")
    common.note_if_replacing(str(tmp_path / "none.json"), ["a/ckpt.pt"])  # nothing there: nothing said
    assert capsys.readouterr().out == ""


def test_eta_keeps_whole_days():
    assert pretrain.duration(59.9) == "00:00:59"
    assert pretrain.duration(23 * 3600 + 59 * 60 + 59) == "23:59:59"
    assert pretrain.duration(51 * 3600 + 5) == "2d 03:00:05"  # 51 h, which "%H:%M:%S" alone shows as 03:00:05


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    pretrain_here("--model", "vit_p4_32", "--max-steps", 2, "--batch-size", 8, "--out-dir", out)
    before = (out / "ckpt.pt").read_bytes()
    blown = torch.load(out / "ckpt.pt", weights_only=True)  # the same run, 28 steps more, from weights that overflow
    blown["args"]["max_steps"] = 30
    blown["model"]["encoder.patch_embed.weight"].fill_(1e38)
    torch.save(blown, out / "blown.pt")  # in the run's own folder: resuming it there is going back, not over
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        pretrain_here("--resume", out / "blown.pt")
    error = capsys.readouterr().err
    assert stop.value.code == 1 and "non-finite at step" in error and "lr" in error and "untouched" in error
    assert (out / "ckpt.pt").read_bytes() == before


def test_non_finite_weights_after_a_finite_loss_are_never_saved(tmp_path, monkeypatch):
    """An update that leaves an infinite weight although its loss was finite (an overflowing gradient), forced
    here at the third of 5 steps with a checkpoint every step: the run stops before saving, at step 2 (0-based),
    and ckpt.pt keeps the weights after step 2, all finite."""
    step, calls = pretrain.optimizer_step, []

    def overflowing_step(optimizer, scaler):
        step(optimizer, scaler)
        calls.append(1)
        if len(calls) == 3:
            optimizer.param_groups[0]["params"][0].data.fill_(float("inf"))

    monkeypatch.setattr(pretrain, "optimizer_step", overflowing_step)
    with pytest.raises(SystemExit) as stop:
        pretrain_here("--model", "vit_p4_32", "--max-steps", 5, "--batch-size", 8, "--save-every", 1, "--out-dir", tmp_path)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert stop.value.code == 1 and ckpt["step"] == 2 and all(v.isfinite().all() for v in ckpt["model"].values())


def test_resume_from_a_checkpoint_goes_on_in_its_folder(tmp_path, monkeypatch):
    """--resume PATH without --out-dir continues in PATH's folder (not in ./out): here a finished 2-step run, whose
    copy asks for a third step, ends with that run's ckpt.pt at step 3."""
    monkeypatch.chdir(tmp_path)
    pretrain_here("--model", "vit_p4_32", "--max-steps", 2, "--batch-size", 8, "--out-dir", tmp_path / "a")
    more = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    more["args"]["max_steps"] = 3
    torch.save(more, tmp_path / "a" / "ckpt_more.pt")
    pretrain_here("--resume", tmp_path / "a" / "ckpt_more.pt")
    assert torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["step"] == 3 and not (tmp_path / "out").exists()


def test_resuming_a_kept_checkpoint_never_writes_over_a_later_one(tmp_path, capsys):
    """A finished 2-epoch run (3 steps an epoch) keeps ckpt_epoch001.pt. Resuming that in the run's folder would
    overwrite the later ckpt.pt and cut the log back: refused in one line, nothing touched. Branching off into a
    new --out-dir is the way, and, resume being exact, the branch ends on the run's own final weights. Another
    run's checkpoint at the same step is refused too; the run's own ckpt.pt, from a kill after epoch 1, goes on
    past its kept copy of epoch 2 (rewriting it, as --save-every and --keep-every apart can leave them)."""
    root = write_png_folder(str(tmp_path / "imgs"))
    run_dir = tmp_path / "run"
    pretrain_here("--model", "vit_p4_32", "--data", root, "--epochs", 2, "--batch-size", 4, "--keep-every", 1,
                  "--out-dir", run_dir)
    before = snapshot(run_dir)
    capsys.readouterr()  # the run's own output
    with pytest.raises(SystemExit) as stop:
        pretrain_here("--resume", run_dir / "ckpt_epoch001.pt")
    error = capsys.readouterr().err
    assert stop.value.code == 2 and len(error.splitlines()) == 1 and "further along (step 6)" in error
    assert snapshot(run_dir) == before
    pretrain_here("--resume", run_dir / "ckpt_epoch001.pt", "--out-dir", tmp_path / "branch")
    final, branch = (torch.load(d / "ckpt.pt", weights_only=True)["model"] for d in (run_dir, tmp_path / "branch"))
    assert branch.keys() == final.keys() and all(torch.equal(branch[k], final[k]) for k in final)
    os.symlink(tmp_path, tmp_path / "link")  # the same folder by another road: the finished run ends at once
    pretrain_here("--resume", tmp_path / "link" / "run" / "ckpt.pt", "--out-dir", run_dir)
    foreign = torch.load(run_dir / "ckpt_epoch001.pt", weights_only=True)
    foreign["args"]["seed"] = 7  # another run's checkpoint at the same step, dropped into this run's folder
    torch.save(foreign, run_dir / "seed7.pt")
    shutil.copy(run_dir / "ckpt_epoch001.pt", run_dir / "ckpt.pt")  # as if killed after epoch 1
    capsys.readouterr()
    with pytest.raises(SystemExit):
        pretrain_here("--resume", run_dir / "seed7.pt")
    assert "ckpt.pt belongs to another run (--seed 0)" in capsys.readouterr().err
    pretrain_here("--resume", "--out-dir", run_dir)  # its own ckpt.pt goes on, past a kept copy further along
    again = torch.load(run_dir / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(again[k], final[k]) for k in final)


def snapshot(root):
    """Every file under root with its bytes: to prove a refused command wrote nothing."""
    return {os.path.join(d, f): open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(root) for f in fs}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    pretrain_here("--model", "vit_p4_32", "--max-steps", 2, "--batch-size", 8, "--out-dir", out / "run")
    return out


def test_reports_say_how_long_a_checkpoint_trained():
    """3 steps of a 6250-step epoch are not "0 epochs"; one epoch is singular; weights not from pretrain.py say nothing."""
    assert [probe.trained_for(e) for e in (3 / 6250, 1.0, 0.385, 2, None)] == [
        ", 0.00048 epochs trained", ", 1 epoch trained", ", 0.385 epochs trained", ", 2 epochs trained", ""]


def test_probe_and_rank_say_when_a_checkpoint_ended_on_the_early_plateau(finished_run, tmp_path):
    """Two steps end near the flat prediction's loss (0.979 for vit_p4_32): probe.py and rank.py say so, as pretrain.py
    did, from the loss the checkpoint keeps. The same weights with a loss past the plateau get no note."""
    plateau = finished_run / "run" / "ckpt.pt"
    past = torch.load(plateau, weights_only=True) | {"loss": 0.8}
    torch.save(past, tmp_path / "ckpt.pt")
    for script, sample in ((PROBE, ["--n-train", 8, "--n-val", 4, "--n-test", 4, "--epochs", 1, "--layers", 1]),
                           (RANK, ["--n", 8, "--n-tokens", 2])):
        for path, noted in ((plateau, True), (tmp_path / "ckpt.pt", False)):
            stdout = call(script, path, *sample, "--out", tmp_path / "report.json").stdout
            assert (f"note: {path}'s last pretraining loss, 0.9" in stdout) is noted, stdout


@pytest.mark.parametrize("script", ["probe.py", "rank.py", "bench.py"])
def test_ctrl_c_stops_probe_rank_and_bench_in_one_line(tmp_path, finished_run, monkeypatch, script):
    """Ctrl-C (KeyboardInterrupt, here raised as the device is picked) ends in one line and exit 130, as in
    pretrain.py, not a traceback, and writes nothing."""
    def pressed(name):
        raise KeyboardInterrupt
    monkeypatch.setattr(common, "pick_device", pressed)
    args = [] if script == "bench.py" else [finished_run / "run" / "ckpt.pt", "--out", tmp_path / "out.json"]
    try:
        result = call(script, *args, check=False)
    except KeyboardInterrupt:  # let through, it would stop pytest itself
        pytest.fail(f"{script} let Ctrl-C through as a traceback")
    assert (result.returncode, result.stderr) == (130, "stopped by Ctrl-C\n") and list(tmp_path.iterdir()) == []


def test_a_signal_while_loader_workers_start_is_acted_on_once_they_have(stop_handlers_kept):
    """The hold on the signals is the main thread's: the kernel hands a signal to another thread (torch's own,
    started before), and Python then ran the handler in the main thread while it started workers (a worker left
    without its start data printed a traceback under spawn). The handler must run once iter() has returned."""
    events, go = [], threading.Event()
    sender = threading.Thread(target=lambda: (go.wait(), os.kill(os.getpid(), signal.SIGTERM)))
    sender.start()  # before the hold, as torch's threads are

    class Starting:
        num_workers, multiprocessing_context = 1, multiprocessing.get_context("fork")

        def __iter__(self):
            go.set()
            sender.join()
            time.sleep(0.05)  # the signal has reached the process
            events.append("workers started")
            return iter(())
    signal.signal(signal.SIGTERM, lambda signum, frame: events.append("SIGTERM"))
    common.iter_holding_signals(Starting())
    assert events == ["workers started", "SIGTERM"]
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the hold is lifted


def test_loader_workers_hold_back_only_the_signals_the_main_process_acts_on(stop_handlers_kept):
    """probe.py acts on Ctrl-C and leaves SIGTERM (and SIGHUP) to its default: its workers hold back Ctrl-C only, so
    the DataLoader's terminate() (a SIGTERM) still ends a worker stuck in a read. pretrain.py acts on all three."""
    for term_handler, term_held in ((signal.SIG_DFL, False), (lambda signum, frame: None, True)):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, term_handler)
        signal.signal(signal.SIGHUP, term_handler)
        batches = common.iter_holding_signals(torch.utils.data.DataLoader(range(4), num_workers=1))
        status = open(f"/proc/{batches._workers[0].pid}/status").read()
        assert [int(x) for x in batches] == [0, 1, 2, 3]  # all read: the worker ends before any assert can fail
        blocked = int(status.split("SigBlk:")[1].split()[0], 16)
        assert [bool(blocked >> (s - 1) & 1) for s in common.STOP_SIGNALS] == [True, term_held, term_held]


def test_ctrl_c_as_probe_workers_start_by_spawn_is_one_line(tmp_path, finished_run):
    """A terminal's Ctrl-C reaches every process of the group: loader workers that spawn was still starting
    (macOS) each printed a traceback (150 lines) around probe.py's one line."""
    code, _, stderr = signal_when_ready([*starting_workers_by("spawn"), "probe.py", finished_run / "run" / "ckpt.pt",
                                         "--workers", 1, "--out", tmp_path / "probe.json"],
                                        to_group(signal.SIGINT), loader_worker_started, 0.005)
    assert (code, stderr) == (130, "stopped by Ctrl-C\n")


PRETRAIN, PROBE, RANK = "pretrain.py", "probe.py", "rank.py"
BAD_INPUTS = [  # (script, arguments, words the one-line message must hold); {run} is a finished run's folder
    (PRETRAIN, "--alpha-schedule linaer", "unknown alpha schedule 'linaer'; choose one of none, linear"),
    (PRETRAIN, "--alpha-min 1.5", "argument --alpha-min: needs a finite number in (0, 1], got '1.5'"),
    (PRETRAIN, "--alpha-min 0", "argument --alpha-min: needs a finite number in (0, 1], got '0'"),
    (PRETRAIN, "--img-size 30", "image size 30 is not divisible by patch size 4"),
    (PRETRAIN, "--mask-ratio 1.0", "argument --mask-ratio: needs a finite number in (0, 1)"),
    (PRETRAIN, "--mask-ratio 0.01", "mask ratio 0.01 hides 0 of 64 patches: it must hide at least one"),
    (PRETRAIN, "--model vit_x", "unknown model preset 'vit_x'; choose one of vit_b16"),
    (PRETRAIN, "--data imagenett", "unknown dataset 'imagenett'"),
    (PRETRAIN, "--data {tmp}/nowhere", "missing or empty data folder"),
    (PRETRAIN, "--data {tmp}/empty", "missing or empty data folder"),
    (PRETRAIN, "--data {tmp}/mismatched", "train/ and val/ need the same class folders; in one only: ['cat', 'dog']"),
    (PRETRAIN, "--data {tmp}/garbled --batch-size 4", "no image under '{tmp}/garbled/val' can be decoded"),
    (PRETRAIN, "--resume {tmp}/resized/ckpt.pt", "the run trained on 49999 images, the data now holds 50000"),
    (PRETRAIN, "--resume {tmp}/edited/ckpt.pt", "giving 0.9655 at sub-layer 2, but alpha() now gives 0.9652"),
    (PROBE, "{tmp}/edited/ckpt.pt", "{tmp}/edited/ckpt.pt: trained with alpha schedule 'linear' giving 0.9655"),
    (PRETRAIN, "--compile-mode reduce-overhead --accum-steps 2", "--compile-mode reduce-overhead cannot accumulate"),
    (PRETRAIN, "--resume {tmp}/nowhere.pt", "checkpoint {tmp}/nowhere.pt does not exist"),
    (RANK, "--compare {run}/ckpt.pt", "required: checkpoint; the first checkpoint goes before --compare"),
    (PROBE, "{run}/ckpt.pt {run}/ckpt.pt", "; to compare checkpoints, give the first, then --compare and the others"),
    (PROBE, "{run}/ckpt.pt --n-trian 5", "unrecognized arguments: --n-trian 5 (see --help)"),  # no hint: a typo
    (PRETRAIN, "--resume {tmp}/notes.txt", "is not a checkpoint"),
    (PRETRAIN, "--resume --out-dir {run} --alpha-min 0.7", "flags do not fit the checkpoint"),
    (PRETRAIN, "--resume --out-dir {tmp}/fresh", "nothing to resume in {tmp}/fresh"),
    (PRETRAIN, "--resume --out-dir {run} --max-steps 4", "--max-steps 4 (checkpoint: 2); drop them to resume (the lr "
     "schedule is fitted to the run's length, so --max-steps cannot change on resume"),
    (PRETRAIN, "--resume --out-dir {run} --epochs 7", "so --epochs cannot change on resume, nor can a finished run be "
     "lengthened"),
    (PRETRAIN, "--out-dir {run}", "--out-dir {run} already holds a run (ckpt.pt): add --resume"),  # nothing overwritten
    (PRETRAIN, "--out-dir {tmp}/kept", "--out-dir {tmp}/kept already holds a run (ckpt_epoch002.pt)"),
    (PRETRAIN, "--resume {tmp}/shallow.pt --out-dir {run}", "already holds another run (ckpt.pt): resuming"),
    (PRETRAIN, "--epochs 3 --warmup-epochs 3.5", "--warmup-epochs 3.5 is longer than the run (3 epochs)"),
    (PRETRAIN, "--out-dir {tmp}/notes.txt/sub", "cannot write to --out-dir"),
    (PRETRAIN, "--batch-size 1 --env-world 2", "batch size 1 must be a positive multiple of the 2 processes"),
    (PRETRAIN, "--epochs zero", "argument --epochs: needs a whole number >= 1, got 'zero'"),
    (PRETRAIN, "--keep-every -1", "argument --keep-every: needs a whole number >= 0"),
    (PRETRAIN, "--blr nan", "argument --blr: needs a finite number > 0, got 'nan'"),
    (PRETRAIN, "--device cuda:0", "--device cuda:0: no CUDA device on this machine"),
    (PRETRAIN, "--device mps", "--device mps: MPS (Apple GPUs) is not available here"),
    (PRETRAIN, "--device meta", "--device meta: not supported here; use auto, cpu, cuda, cuda:N or mps"),
    (PRETRAIN, "--data cifar10 --download --data-root {tmp}/notes.txt/sub", "could not download cifar10 to"),  # no network
    ("bench.py", "--loader --batch-size 40000", "--loader needs at least 2 batches of 40000 images"),
    ("bench.py", "--steps 0", "argument --steps: needs a whole number >= 1"),
    (PROBE, "{tmp}/nowhere.pt", "checkpoint {tmp}/nowhere.pt does not exist"),
    (PROBE, "{tmp}/notes.txt", "is not a checkpoint"),
    (PROBE, "{run}", "{run} is a folder; pass the checkpoint file in it"),
    (PROBE, "{run}/ckpt.pt --lr -1", "argument --lr"),
    (PROBE, "{run}/ckpt.pt --layers 0,13", "--layers 0,13: this encoder has blocks 1 to 12"),
    (PROBE, "{run}/ckpt.pt --data imagenett", "unknown dataset"),
    (PROBE, "{run}/ckpt.pt --data cifar10 --data-root {tmp}/none",
     "cifar10 is missing or incomplete under '{tmp}/none': rerun with --download"),  # a flag probe.py has: see below
    (PROBE, "{run}/ckpt.pt --data cifar10 --download --data-root {tmp}/notes.txt/sub", "could not download cifar10 to"),
    (RANK, "{run}/ckpt.pt --data cifar10 --download --data-root {tmp}/notes.txt/sub", "could not download cifar10 to"),
    (PROBE, "{run}/ckpt.pt --compare {tmp}/nowhere.pt", "checkpoint {tmp}/nowhere.pt does not exist"),  # run's probe.json kept
    (PROBE, "{run}/ckpt.pt --compare {tmp}/shallow.pt", "--compare: the checkpoints have different depths"),
    (PROBE, "{run}/ckpt.pt --n-train 1", "the linear probe needs at least 2 train images; the sample holds 1"),
    (PROBE, "{run}/ckpt.pt --out {tmp}/notes.txt/probe.json", "cannot write {tmp}/notes.txt/probe.json"),  # before the work
    (RANK, "{run}/ckpt.pt --compare {run}/ckpt.pt --out {tmp}/notes.txt/rank.json", "cannot write {tmp}/notes.txt/rank.json"),
    (PROBE, "{tmp}/odd.pt", "{tmp}/odd.pt: not a checkpoint of pretrain.py nor a ViT state_dict"),  # a dict, but of neither checkpoint layout
    (RANK, "{tmp}/nowhere.pt", "checkpoint {tmp}/nowhere.pt does not exist"),
    (RANK, "{tmp}/notes.txt", "is not a checkpoint"),
    (RANK, "{run}/ckpt.pt --data {tmp}/empty", "missing or empty data folder"),
    (RANK, "{run}/ckpt.pt --n -5", "argument --n: needs a whole number >= 0, got '-5'"),
    (RANK, "{run}/ckpt.pt --out {run}/ckpt.pt", "argument --out: needs a file name ending in .json"),  # not over the checkpoint
    (PROBE, "{run}/ckpt.pt --out {run}", "argument --out: needs a file name ending in .json"),
    (PROBE, "{run}/ckpt.pt --out {tmp}/probe.png", "argument --out"),
]


def refuse(script, arguments, in_process, monkeypatch=None):
    """(exit code, stderr) of one bad command, run here by call() or as its own process by run(). Any exception
    other than the exit fails the test: no traceback reaches a user."""
    args, env = arguments.split(), {}
    if "--env-world" in args:  # what torchrun would set for 2 processes; refused before any process group starts
        args = args[:args.index("--env-world")]
        env = dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")
    if not in_process:
        result = run(script, *args, check=False, env=env)
        return result.returncode, result.stderr
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = call(script, *args, check=False)
    return result.returncode, result.stderr


@pytest.mark.parametrize("script,arguments,needle", BAD_INPUTS, ids=[f"{s}:{a}" for s, a, _ in BAD_INPUTS])
def test_bad_input_gets_one_clear_line(script, arguments, needle, finished_run, monkeypatch):
    if ("cuda" in arguments and torch.cuda.is_available()) or ("mps" in arguments and torch.backends.mps.is_available()):
        pytest.skip("this machine has the device")
    tmp = finished_run
    os.makedirs(tmp / "empty" / "train", exist_ok=True)
    for split, cls in (("train", "cat"), ("val", "dog")):
        os.makedirs(tmp / "mismatched" / split / cls, exist_ok=True)
    (tmp / "notes.txt").write_text("not a checkpoint")
    os.makedirs(tmp / "kept", exist_ok=True)
    (tmp / "kept" / "ckpt_epoch002.pt").write_bytes(b"a run's kept copy")
    if not (tmp / "garbled").exists():  # a folder whose held-out images are all unreadable
        write_png_folder(str(tmp / "garbled"), n_per_class=2)
        for png in (tmp / "garbled" / "val").glob("*/*.png"):
            png.write_bytes(b"not a png")
    if not (tmp / "resized").exists():  # the finished run, as if its data had lost an image since
        os.makedirs(tmp / "resized")
        moved = torch.load(tmp / "run" / "ckpt.pt", weights_only=True)
        torch.save({**moved, "n_train": 49999}, tmp / "resized" / "ckpt.pt")
    if not (tmp / "edited").exists():  # the finished run, as if alpha() had been edited since it trained
        os.makedirs(tmp / "edited")
        trained = torch.load(tmp / "run" / "ckpt.pt", weights_only=True)
        trained["alphas"][2] += 3e-4
        torch.save(trained, tmp / "edited" / "ckpt.pt")
    if not (tmp / "odd.pt").exists():
        torch.save({"model": 5}, tmp / "odd.pt")
    if not (tmp / "shallow.pt").exists():
        torch.save(M.MAE(M.preset("vit_p4_32", depth=6)).checkpoint(), tmp / "shallow.pt")
    fill = lambda text: text.format(tmp=tmp, run=tmp / "run")
    before = snapshot(tmp)
    code, err = refuse(script, fill(arguments), True, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert fill(needle) in lines[0]
    assert snapshot(tmp) == before


@pytest.mark.parametrize("script,arguments,needle", [BAD_INPUTS[0], BAD_INPUTS[-1]])
def test_bad_input_through_the_real_command_line(script, arguments, needle, finished_run):
    code, err = refuse(script, arguments.format(tmp=finished_run, run=finished_run / "run"), False)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err and needle in err, err




# ----------------------------------------------------------------------------- every numeric flag, every bad value

import argparse

import bench
import probe
import rank

# What each kind of flag takes, written out by hand for the values every numeric flag is tried with.
TRIED = ["0", "1", "3", "0.5", "-1", "nan", "inf", "-inf", "1e30", "99999999999999999999", "abc", ""]
TAKES = {
    "count >= 1": {"1", "3", "99999999999999999999"},
    "count >= 0": {"0", "1", "3", "99999999999999999999"},
    "workers": {"0", "1", "3"},  # 0 .. 256
    "seed": {"0", "1", "3"},  # 0 .. 2**32 - 1: a negative seed is refused
    "real > 0": {"1", "3", "0.5", "1e30", "99999999999999999999"},
    "real >= 0": {"0", "1", "3", "0.5", "1e30", "99999999999999999999"},
    "fraction (0, 1)": {"0.5"},
    "alpha (0, 1]": {"1", "0.5"},
}
TEXT, SWITCH = "text, checked by the stage", "switch"
FLAG_TABLE = {  # every flag of every script; a flag added to a parser without a row here fails the next test
    "pretrain": {
        "--model": TEXT, "--img-size": "count >= 1", "--alpha-schedule": TEXT, "--alpha-min": "alpha (0, 1]",
        "--decay-as-lr": SWITCH, "--decoder-skips": SWITCH, "--mask-ratio": "fraction (0, 1)", "--data": TEXT,
        "--download": SWITCH,
        "--data-root": TEXT, "--epochs": "count >= 1", "--max-steps": "count >= 1", "--batch-size": "count >= 1",
        "--accum-steps": "count >= 1", "--blr": "real > 0", "--weight-decay": "real >= 0",
        "--warmup-epochs": "real >= 0", "--seed": "seed", "--out-dir": TEXT, "--device": TEXT, "--compile": SWITCH,
        "--compile-mode": TEXT, "--resume": TEXT, "--workers": "workers", "--log-every": "count >= 1", "--save-every": "count >= 0",
        "--keep-every": "count >= 0", "--device-data": SWITCH},
    "probe": {
        "checkpoint": TEXT, "--data": TEXT, "--data-root": TEXT, "--download": SWITCH, "--device": TEXT,
        "--batch-size": "count >= 1", "--workers": "workers", "--compare": TEXT, "--layers": TEXT,
        "--n-train": "count >= 0",
        "--n-val": "count >= 0", "--n-test": "count >= 0",
        "--epochs": "count >= 1", "--lr": "real > 0", "--precision": TEXT, "--out": TEXT},
    "rank": {
        "checkpoint": TEXT, "--data": TEXT, "--data-root": TEXT, "--download": SWITCH, "--device": TEXT,
        "--batch-size": "count >= 1", "--workers": "workers", "--compare": TEXT, "--n": "count >= 0",
        "--n-tokens": "count >= 0", "--precision": TEXT, "--out": TEXT},
    "bench": {
        "--model": TEXT, "--img-size": "count >= 1", "--alpha-schedule": TEXT, "--alpha-min": "alpha (0, 1]",
        "--decay-as-lr": SWITCH, "--decoder-skips": SWITCH, "--mask-ratio": "fraction (0, 1)",
        "--batch-size": "count >= 1", "--steps": "count >= 1", "--device": TEXT, "--compile": SWITCH,
        "--compile-mode": TEXT, "--profile": SWITCH, "--loader": SWITCH, "--data": TEXT, "--data-root": TEXT,
        "--workers": "workers"},
}
PARSERS = {"pretrain": pretrain.build_parser, "probe": probe.build_parser, "rank": rank.build_parser,
           "bench": bench.build_parser}
NUMERIC = [(script, flag) for script, flags in FLAG_TABLE.items() for flag, kind in flags.items() if kind in TAKES]


def test_flag_table_covers_every_parser():
    for script, build in PARSERS.items():
        actions = [a for a in build()._actions if not isinstance(a, argparse._HelpAction)]
        assert {(a.option_strings or [a.dest])[0] for a in actions} == set(FLAG_TABLE[script]), script


def parse_one(script, flag, value):
    """(namespace or None, exit code, stderr) of one parse, in process."""
    argv = (["ckpt.pt"] if script in ("probe", "rank") else []) + [f"{flag}={value}"]  # '=' lets "-1" through as a value
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return PARSERS[script]().parse_args(argv), None, err.getvalue()
        except SystemExit as stop:
            return None, stop.code, err.getvalue()


@pytest.mark.parametrize("script,flag", NUMERIC, ids=[f"{s}:{f}" for s, f in NUMERIC])
def test_numeric_flag_takes_its_range_and_refuses_the_rest_in_one_line(script, flag, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    takes = TAKES[FLAG_TABLE[script][flag]]
    for value in TRIED:
        args, code, err = parse_one(script, flag, value)
        if value in takes:
            parsed = getattr(args, flag.lstrip("-").replace("-", "_"))
            assert code is None and parsed == (int if isinstance(parsed, int) else float)(value), (value, err)
        else:
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: argument {flag}:"), (value, err)
    assert os.listdir(tmp_path) == []


def test_a_given_zero_is_never_replaced_by_a_default():
    args, _ = pretrain.parse_args(["--warmup-epochs", "0", "--weight-decay", "0", "--save-every", "0"])
    pretrain.fill_defaults(args, torch.device("cpu"))
    assert (args.warmup_epochs, args.weight_decay, args.save_every) == (0, 0, 0)
    args, _ = pretrain.parse_args([])
    pretrain.fill_defaults(args, torch.device("cpu"))
    assert (args.epochs, args.batch_size, args.blr, args.workers) == (pretrain.CPU_EPOCHS, 128, 1.5e-3, 0)
    assert args.warmup_epochs == pytest.approx(0.05 * pretrain.CPU_EPOCHS)


def test_a_compile_mode_implies_compile_unless_refused():
    cases = {(): (False, None), ("--compile-mode", "reduce-overhead"): (True, "reduce-overhead"),
             ("--compile-mode", "max-autotune", "--no-compile"): (False, "max-autotune"), ("--compile",): (True, None)}
    for argv, expected in cases.items():
        args, _ = pretrain.parse_args(list(argv))
        pretrain.fill_defaults(args, torch.device("cpu"))
        assert (args.compile, args.compile_mode) == expected, argv


# ----------------------------------------------------------------------------- decay is a learning rate (SPEC 8)

def decayed_and_as_lr(skips, alpha_min=0.6):
    """The decayed MAE and its residual twin under decay_as_lr, float64, from the same seed."""
    cfg = dict(img_size=16, patch_size=4, width=16, depth=4, heads=2, decoder_width=16, decoder_depth=3,
               decoder_heads=2, alpha_schedule="linear", alpha_min=alpha_min, decoder_skips=skips)
    models = []
    for as_lr in (False, True):
        torch.manual_seed(0)
        models.append(M.MAE(M.MAEConfig(**cfg, decay_as_lr=as_lr)).double())
    return models


def hand_scales(model):
    """The multipliers of SPEC 8 written out: c_k is the running product of the paper's linear alphas."""
    n, a_min = 2 * model.config.depth, model.config.alpha_min
    c = list(itertools.accumulate((1 - (1 - a_min) * k / (n - 1) for k in range(n)), operator.mul))
    scales = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if name.startswith("encoder.blocks.") and parts[4] in ("proj", "fc2"):
            scales[name] = 1 / c[2 * int(parts[2]) + (parts[4] == "fc2")]
        if name.startswith("skips.") and parts[2] in ("fc1_enc", "mask_token"):
            block = [3, 1][int(parts[1])]  # depth 4: skips read blocks 3 (after the final norm) and 1
            c_b = 1.0 if block == 3 else c[2 * block + 1]
            scales[name] = c_b if parts[2] == "fc1_enc" else 1 / c_b
    return scales


@pytest.mark.parametrize("skips", [False, True])
def test_decay_is_a_learning_rate_under_adamw(skips):
    decayed, as_lr = decayed_and_as_lr(skips)
    scales = hand_scales(decayed)
    assert as_lr.decay_scales() == pytest.approx(scales) and decayed.decay_scales() == {}
    for model in (decayed, as_lr):
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.eps = 1e-15  # the one inexact piece: LayerNorm's eps sees the decayed stream's scale
    g = torch.Generator().manual_seed(1)
    imgs, noise = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64), torch.rand(4, 16, generator=g)
    optimizers = [torch.optim.AdamW(pretrain.param_groups(m, 0.05), betas=(0.9, 0.95), eps=1e-8) for m in (decayed, as_lr)]
    for step in range(8):
        for model, optimizer in zip((decayed, as_lr), optimizers):
            for group in optimizer.param_groups:
                group["lr"] = 3e-3 * group.get("lr_scale", 1.0)
            loss = model(imgs, noise=noise.double())[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    ours = dict(as_lr.named_parameters())
    for name, p in decayed.named_parameters():
        expected = p.detach() * scales.get(name, 1.0)
        error = (ours[name].detach() - expected).norm() / expected.norm().clamp_min(1e-30)
        assert error < 1e-6, (name, float(error))


@pytest.mark.parametrize("skips", [False, True])
def test_rescaled_residual_model_computes_the_decayed_one_at_the_real_eps(skips):
    decayed, as_lr = decayed_and_as_lr(skips, alpha_min=0.7)
    randomise(decayed)
    with torch.no_grad():
        for name, p in as_lr.named_parameters():
            p.copy_(decayed.get_parameter(name) * as_lr.decay_scales().get(name, 1.0))
    imgs, noise = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.rand(2, 16, dtype=torch.float64)
    (loss_a, pred_a, _), (loss_b, pred_b, _) = decayed(imgs, noise=noise), as_lr(imgs, noise=noise)
    assert torch.allclose(pred_a, pred_b, rtol=1e-4, atol=1e-6) and loss_a.item() == pytest.approx(loss_b.item(), rel=1e-5)


# ----------------------------------------------------------------------------- evaluation: probe.py and rank.py



def test_effective_rank_hand_computed_cases():
    assert rank.effective_ranks(torch.eye(6)).item() == pytest.approx(6)  # all singular values equal: full rank
    u, v = torch.randn(50, 1), torch.randn(1, 30)
    assert rank.effective_ranks(u @ v).item() == pytest.approx(1, abs=1e-9)  # rank one
    q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    for k in (2, 5, 17):  # k equal singular values and the rest zero: exactly k
        assert rank.effective_ranks(q[:, :k] @ q[:k, :]).item() == pytest.approx(k, rel=1e-9)
    x = torch.randn(100, 20)
    assert rank.effective_ranks(x * 1000).item() == pytest.approx(rank.effective_ranks(x).item(), rel=1e-9)  # scale-free
    # two singular values 3 and 1: p = (3/4, 1/4), erank = exp(-(3/4 ln 3/4 + 1/4 ln 1/4)) = 1.7548...
    assert rank.effective_ranks(torch.diag(torch.tensor([3.0, 1.0]))).item() == pytest.approx(1.75476, abs=1e-5)
    s = torch.linalg.svdvals(x.double())
    p = s / s.sum()
    assert rank.effective_ranks(x).item() == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-9)


def test_token_ranks_come_from_images_spread_over_the_sample():
    """Image i (a pixel holding i) has tokens of rank i + 1; 12 images in batches of 5. --n-tokens 4 must rank
    images 0, 3, 6, 9 (mean rank 5.5), not the first four (2.5): a class-sorted folder starts with one class."""
    class Ranked(torch.nn.Module):
        config, alphas = M.preset("vit_p4_32", depth=1), [1.0, 1.0]

        def features(self, imgs):
            return [torch.stack([torch.diag((torch.arange(16) <= i).float()) for i in imgs.flatten().long()])]

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(12.0), torch.zeros(12)), 5)
    for n_tokens, mean_rank in ((4, 5.5), (12, 6.5), (50, 6.5)):
        rows, counted = rank.rank_profile(Ranked(), loader, torch.device("cpu"), n_tokens)
        assert counted == min(n_tokens, 12) and rows[0]["tokens"] == pytest.approx(mean_rank), (n_tokens, rows)
    rows, counted = rank.rank_profile(Ranked(), loader, torch.device("cpu"), 0)
    assert counted == 0 and rows[0]["tokens"] is None  # not measured: no number that reads like a rank of 0


def test_ranks_are_measured_in_fp32_even_where_probes_use_autocast(monkeypatch):
    """bf16 rounding of a nearly constant cls token adds small singular values (3-11% more rank on the default
    checkpoint). rank.py must not take probe.py's autocast: with it swapped for CPU bf16, the ranks stay put."""
    torch.manual_seed(0)
    model = M.MAE(M.preset("vit_p4_32", depth=2)).eval()
    with torch.no_grad():  # no zero-initialised branches: at init the cls token is the same for every image
        for weight in (p for p in model.encoder.parameters() if p.dim() > 1):
            weight.normal_(0, 0.05)
    images = torch.utils.data.TensorDataset(torch.rand(24, 3, 32, 32), torch.zeros(24))
    loader = torch.utils.data.DataLoader(images, 12)
    fp32, _ = rank.rank_profile(model, loader, torch.device("cpu"), 4)
    monkeypatch.setattr(probe, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    bf16 = probe.extract_features(model, loader, torch.device("cpu"), [2], name="bf16")
    assert rank.effective_ranks(bf16["cls"])[0].item() != pytest.approx(fp32[1]["cls"], rel=1e-3)  # autocast shows
    assert rank.rank_profile(model, loader, torch.device("cpu"), 4)[0] == fp32
    assert probe.PRECISIONS[rank.build_parser().parse_args(["x.pt"]).precision] == torch.float32  # the CLI's default
    # --precision bf16 asks for that autocast on any device, the CPU included
    asked = probe.extract_features(model, loader, torch.device("cpu"), [2], dtype=probe.PRECISIONS["bf16"])
    assert torch.equal(asked["cls"], bf16["cls"])
    assert [probe.precision_name(torch.device("cpu"), p) for p in probe.PRECISIONS] == ["fp32", "fp32", "bf16"]


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


def test_knn_votes_by_exp_similarity_over_t_by_hand():
    """One test point (1, 0), k = 3. Class 0 has one neighbour at cosine 1, class 1 two at cosine 0.8 (one of
    them 5 long: features are normalised), class 0 five more at cosine 0.5, beyond k. By hand, t = 0.07:
    class 0 exp(1 / 0.07) = 1.6e6 beats 2 exp(0.8 / 0.07) = 1.8e5, where a plain majority says class 1;
    t = 1: e = 2.72 loses to 2 e^0.8 = 4.45, unless the five beyond k vote too (+ 5 e^0.5 = 8.2)."""
    c = math.sqrt(0.75)
    train_x = torch.tensor([[2.0, 0.0], [4.0, 3.0], [0.8, -0.6], [0.5, c], [0.5, -c], [1.0, 2 * c], [1.0, -2 * c],
                            [1.5, 3 * c]])
    train_y = torch.tensor([0, 1, 1, 0, 0, 0, 0, 0])
    test_x, test_y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert probe.knn_accuracy(train_x, train_y, test_x, test_y, k=3, t=0.07) == 100.0
    assert probe.knn_accuracy(train_x, train_y, test_x, test_y, k=3, t=1.0) == 0.0


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
    heads = probe.fit_linear_probes(torch.stack([train_x, noise_train]), train_y, n_classes=4)
    accs = probe.head_accuracy(heads, torch.stack([test_x, noise_test]), test_y)
    assert accs[0] >= 99.0, accs
    assert accs[1] < 40, accs  # a head on noise stays near chance (25%): heads do not leak into each other


def test_best_block_is_chosen_on_validation_and_reported_on_test():
    rows = [{"layer": 1, "lp_mean": 90.0, "val_lp_mean": 50.0, "knn_mean": 10.0, "val_knn_mean": 70.0},
            {"layer": 2, "lp_mean": 60.0, "val_lp_mean": 80.0, "knn_mean": 40.0, "val_knn_mean": 20.0},
            {"layer": 3, "lp_mean": 70.0, "val_lp_mean": 60.0, "knn_mean": 90.0, "val_knn_mean": 30.0}]
    head = probe.headline(rows)
    assert (head["layer"], head["linear_probe"], head["knn"]) == (3, 70.0, 90.0)  # the last block
    assert head["best_linear_probe"] == {"layer": 2, "test": 60.0, "val": 80.0}  # test alone would pick block 1
    assert head["best_knn"] == {"layer": 1, "test": 10.0, "val": 70.0}
    assert probe.describe_headline(head, depth=3).startswith("last block 3:")
    assert probe.describe_headline(head, depth=12).startswith("deepest probed block 3:")  # --layers 1,2,3 of 12


def test_validation_sample_is_disjoint_from_the_probe_sample():
    args = probe.build_parser().parse_args(["x.pt", "--n-train", "300", "--n-val", "200", "--n-test", "50"])
    splits = probe.probe_splits(data.EMBEDDED, 32, "./data", args)
    train, val = set(splits["train"].indices), set(splits["val"].indices)
    assert (len(train), len(val), len(splits["test"])) == (300, 200, 50) and not train & val
    args.n_train = 0  # all of the train split but the validation images
    splits = probe.probe_splits(data.EMBEDDED, 32, "./data", args)
    assert len(splits["train"]) + len(splits["val"]) == len(data.get_dataset(data.EMBEDDED, "train", 32, False))
    assert not set(splits["train"].indices) & set(splits["val"].indices)


def test_an_unreadable_file_is_replaced_from_its_own_sample(tmp_path, capsys):
    """Of a folder, the probe's train and val samples stay disjoint when a file of one cannot be read: the folder's
    next readable file, served before, could be in the other sample."""
    root = write_png_folder(str(tmp_path / "imgs"), n_per_class=8)
    args = probe.build_parser().parse_args(["x.pt", "--n-train", "8", "--n-val", "4"])
    splits = probe.probe_splits(root, 32, "./data", args)
    train, val = splits["train"], splits["val"]
    broken = next(i for i in val.indices if i + 1 in train.indices)  # its folder successor is a train image
    with open(train.dataset.samples[broken][0], "wb") as f:
        f.write(b"not a png")
    seen = {split: [x for x, _ in splits[split]] for split in ("train", "val")}
    assert not any(torch.equal(a, b) for a in seen["val"] for b in seen["train"])
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().err
    args.n_val = 1  # a sample of one unreadable file, in a folder of readable ones: one line, exit 2
    lone = probe.probe_splits(root, 32, "./data", args)["val"].indices[0]
    with open(train.dataset.samples[lone][0], "wb") as f:
        f.write(b"not a png")
    with pytest.raises(SystemExit) as stop:
        probe.probe_splits(root, 32, "./data", args)
    assert stop.value.code == 2 and "no image of a sample of 1 under" in capsys.readouterr().err


def test_probe_and_rank_on_a_folder_of_no_readable_image_say_so_in_one_line(finished_run, tmp_path):
    """With DataLoader workers (the default on CUDA) a worker's DataError came back as a whole traceback."""
    root = write_png_folder(str(tmp_path / "imgs"), n_per_class=2)
    for png in (tmp_path / "imgs").glob("*/*/*.png"):
        png.write_bytes(b"not a png")
    ckpt = finished_run / "run" / "ckpt.pt"
    for script, size, split in ((PROBE, "--n-train", "train"), (RANK, "--n", "val")):  # the split each reads first
        result = call(script, ckpt, "--data", root, "--workers", 2, size, 4, "--out", tmp_path / "x.json", check=False)
        assert result.returncode == 2 and result.stderr.splitlines() == [
            f"error: no image under {os.path.join(root, split)!r} can be decoded: replace the files in the data folder"]


def test_probe_and_rank_that_fail_leave_no_folder_for_their_report(finished_run, tmp_path):
    """--out is checked before the work, in the nearest folder that is there: its own folder is made only to save."""
    for script in (PROBE, RANK):
        result = call(script, finished_run / "run" / "ckpt.pt", "--data", "imagenett", "--out", tmp_path / "new" / "x.json",
                      check=False)
        assert result.returncode == 2 and "unknown dataset" in result.stderr and not (tmp_path / "new").exists()


def test_probe_and_rank_end_to_end(finished_run):
    ckpt = finished_run / "run" / "ckpt.pt"
    out = call(PROBE, ckpt, "--n-train", 200, "--n-test", 100, "--epochs", 3, "--layers", "1,12").stdout
    result = alone_probe = json.load(open(finished_run / "run" / "probe.json"))
    assert [r["layer"] for r in result["layers"]] == [1, 12] and result["n_test"] == 100
    assert result["epochs_done"] == 2 * 8 / 50_000 and "deepest probed block 12" not in out  # 2 steps of 8 images
    assert result["headline"]["pooling"] in out and "k-NN" in out
    assert all(0 <= r["lp_mean"] <= 100 and 0 <= r["knn_cls"] <= 100 for r in result["layers"])
    out = call(PROBE, ckpt, "--compare", ckpt, "--n-train", 200, "--n-val", 100, "--n-test", 100, "--epochs", 3,
              "--layers", "1,12").stdout
    result = json.load(open(finished_run / "run" / "probe_compare.json"))
    assert json.load(open(finished_run / "run" / "probe.json")) == alone_probe  # --compare leaves each run's own
    first, second = result["checkpoints"]
    assert first["layers"] == second["layers"] and first["n_val"] == 100 and "(+0.0/+0.0)" in out
    assert first["headline"]["best_linear_probe"]["layer"] in (1, 12) and "best linear probe block" in out
    out = call(RANK, ckpt, "--n", 64, "--n-tokens", 8).stdout
    alone = json.load(open(finished_run / "run" / "rank.json"))
    layers = alone["checkpoints"][0]["layers"]
    assert len(layers) == 12 and "linear" in out and "0.600" in out  # the schedule is shown
    assert all(1 <= r["mean"] <= 64 for r in layers)
    out = call(RANK, ckpt, "--n", 64, "--n-tokens", 8, "--compare", ckpt).stdout  # its own file, rank.json kept
    assert "difference to [0]" in out and out.count("(+0.00)") == 12  # the side-by-side table, a row per block
    both = json.load(open(finished_run / "run" / "rank_compare.json"))["checkpoints"]
    assert json.load(open(finished_run / "run" / "rank.json")) == alone and both[0]["layers"] == both[1]["layers"] == layers


def test_probe_without_a_validation_sample_picks_no_block(finished_run, tmp_path):
    """--n-val 0: every train image goes to the probe, nothing is held out to pick a block, so the headline is the
    last block's alone and no row has validation numbers."""
    out = call(PROBE, finished_run / "run" / "ckpt.pt", "--n-train", 50, "--n-val", 0, "--n-test", 50, "--epochs", 1,
               "--layers", "1,12", "--out", tmp_path / "probe.json").stdout
    report = json.load(open(tmp_path / "probe.json"))
    assert report["n_val"] == 0 and not any(key.startswith("best") for key in report["headline"])
    assert not any(key.startswith("val_") for row in report["layers"] for key in row) and "best" not in out


def test_compare_tables_print_each_checkpoints_difference_to_the_first(finished_run, tmp_path):
    """Against another encoder (the run's, its blocks shaken by noise) every difference printed is the two reports'
    own numbers subtracted; a checkpoint compared with itself (above) would print +0.0 whatever the subtraction."""
    ckpt, other = finished_run / "run" / "ckpt.pt", tmp_path / "shaken.pt"
    shaken = torch.load(ckpt, weights_only=True)
    g = torch.Generator().manual_seed(0)
    shaken["model"] = {k: v + 0.5 * torch.randn(v.shape, generator=g) if k.startswith("encoder.blocks") else v
                       for k, v in shaken["model"].items()}
    torch.save(shaken, other)
    out = call(PROBE, ckpt, "--compare", other, "--n-train", 200, "--n-val", 100, "--n-test", 100, "--epochs", 3,
               "--layers", "1,12", "--out", tmp_path / "probe.json").stdout
    first, second = (c["layers"] for c in json.load(open(tmp_path / "probe.json"))["checkpoints"])
    cells = [f"({b['lp_mean'] - a['lp_mean']:+.1f}/{b['knn_mean'] - a['knn_mean']:+.1f})" for a, b in zip(first, second)]
    assert all(cell in out for cell in cells) and any(cell != "(+0.0/+0.0)" for cell in cells), (cells, out)
    out = call(RANK, ckpt, "--compare", other, "--n", 64, "--n-tokens", 8, "--out", tmp_path / "rank.json").stdout
    first, second = (c["layers"] for c in json.load(open(tmp_path / "rank.json"))["checkpoints"])
    cells = [f"{b['mean']:7.2f} ({b['mean'] - a['mean']:+.2f})" for a, b in zip(first, second)]
    assert all(cell in out for cell in cells) and any(not cell.endswith("(+0.00)") for cell in cells), (cells, out)


def test_a_short_probe_still_anneals():
    """Warm-up is a tenth of the probe's epochs: 5 of the default 50, 0.3 of 3 (it was min(5, epochs): all warm-up)."""
    recipe = lambda *flags: probe.probe_recipe(probe.build_parser().parse_args(["x.pt", *flags]))
    assert recipe()["warmup_epochs"] == 5 and recipe()["epochs"] == 50
    short = recipe("--epochs", "3", "--lr", "0.02")
    assert short["warmup_epochs"] == pytest.approx(0.3)
    set_lrs = []  # what the probe's loop sets at each of its 3 epochs x 10 steps (40 images, batch 4)
    step = torch.optim.AdamW.step
    def record(optimizer, *args, **kwargs):
        set_lrs.append(optimizer.param_groups[0]["lr"])
        return step(optimizer, *args, **kwargs)
    with mock.patch.object(torch.optim.AdamW, "step", record):
        probe.fit_linear_probes(torch.randn(2, 40, 8), torch.arange(40) % 4, 4, short | {"batch_size": 4})
    warm = [0.02 * k / 3 for k in (1, 2, 3)]  # 0.3 of 3 epochs = 3 of 30 steps, then a cosine from --lr to 0
    assert set_lrs[:4] == pytest.approx(warm + [0.02]) and len(set_lrs) == 30 and set_lrs[-1] < 0.0002


def test_reports_are_named_after_their_checkpoint(tmp_path):
    """A run's ckpt.pt gets probe.json; a kept copy or a weights file in the same folder gets its own name."""
    assert common.beside(tmp_path / "ckpt.pt", "probe.json") == str(tmp_path / "probe.json")
    assert common.beside(tmp_path / "ckpt_epoch010.pt", "probe.json") == str(tmp_path / "probe_epoch010.json")
    assert common.beside(tmp_path / "mae_vit_b.pth", "rank_compare.json") == str(tmp_path / "rank_compare_mae_vit_b.json")


def test_probe_compare_reads_every_checkpoint_on_the_first_ones_data(finished_run, tmp_path):
    """--compare probes all checkpoints on one data set: the first's name and torchvision root, not each its own."""
    ckpt = torch.load(finished_run / "run" / "ckpt.pt", map_location="cpu", weights_only=False)
    paths = []
    for name, root in (("first", "/root/of/first"), ("second", "/root/of/second")):
        ckpt["args"]["data_root"] = root
        torch.save(ckpt, tmp_path / f"{name}.pt")
        paths.append(tmp_path / f"{name}.pt")
    seen = []
    real = probe.probe_splits
    with mock.patch.object(probe, "probe_splits", lambda name, size, root, args, stats: seen.append((name, root)) or
                           real(name, size, root, args, stats)), contextlib.redirect_stdout(io.StringIO()):
        probe.main([str(paths[0]), "--compare", str(paths[1]), "--n-train", "100", "--n-val", "50", "--n-test", "50",
                    "--epochs", "1", "--layers", "12", "--out", str(tmp_path / "both.json")])
    assert seen == [(ckpt["args"]["data"], "/root/of/first")] * 2


def test_public_vit_h_weights_get_16_heads():
    """Public ViTs have 64 channels a head, except ViT-H (1280 wide, 16 heads of 80): a width alone must say so."""
    source = M.MAE(M.preset("vit_p4_32", width=1280, depth=1, heads=16, alpha_schedule="none", decoder_skips=False))
    assert M.from_timm(timm_layout(source)).config.heads == 16


def test_public_weights_path(tmp_path):
    # heads = width / 64 when a state_dict does not say, as for the public ViT-B/16 (768 / 64 = 12)
    source = randomise(M.MAE(M.preset("vit_p4_32", width=128, heads=2, alpha_schedule="none", decoder_skips=False)))
    state = timm_layout(source)  # a ViT state_dict as mae_pretrain_vit_base.pth holds it
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": state}, path)
    out = call(PROBE, path, "--data", data.EMBEDDED, "--n-train", 100, "--n-test", 50, "--epochs", 2, "--layers", 12).stdout
    assert "schedule none" in out
    result = call(PROBE, path, check=False)
    assert result.returncode == 2 and "--data" in result.stderr
    call(RANK, path, "--data", data.EMBEDDED, "--n", 32, "--n-tokens", 4)


def test_saved_figures_are_256_colour_and_look_the_same(tmp_path):
    """save_figure against matplotlib's own PNG of the same figure: palette mode, same size, pixels within a few
    levels on average (measured 0.1 of 255 on this plot), and under half the bytes (measured 30%)."""
    plt = pytest.importorskip("matplotlib.pyplot")
    from PIL import Image
    fig, ax = plt.subplots()
    for i in range(6):
        ax.plot(np.sin(np.linspace(0, 6, 200) + i), label=f"line {i}")
    ax.legend()
    fig.savefig(tmp_path / "plain.png", dpi=120, bbox_inches="tight")
    common.save_figure(fig, tmp_path / "small.png")  # closes the figure too
    plain, small = Image.open(tmp_path / "plain.png"), Image.open(tmp_path / "small.png")
    assert small.mode == "P" and small.size == plain.size
    diff = np.abs(np.asarray(plain.convert("RGB"), float) - np.asarray(small.convert("RGB"), float))
    assert diff.mean() < 2, diff.mean()
    assert (tmp_path / "small.png").stat().st_size < (tmp_path / "plain.png").stat().st_size / 2


# ----------------------------------------------------------------------------- benchmark

def test_bench_smoke():
    before = set(os.listdir(HERE))
    out = call("bench.py", "--model", "vit_p4_32", "--batch-size", 8, "--steps", 2, "--profile").stdout
    assert "GFLOPs per image" in out
    assert all(field in out for field in ("ms/step", "img/s", "mfu", "peak mem"))
    assert out.count("Self CPU time total") == 1 and "aten::" in out  # --profile: one kernel table, ours
    out = call("bench.py", "--loader", "--model", "vit_p4_32", "--batch-size", 8, "--steps", 2).stdout
    assert f"bench loader: {data.EMBEDDED}" in out and "img/s" in out
    assert "bench device path (--device-data) on cpu" in out
    assert set(os.listdir(HERE)) == before  # a benchmark writes nothing (no out/, no log)


def test_profile_sorts_kernels_by_kind_and_bounds_mfu_by_hand():
    """Kernel names of the forms an H100 trace of a compiled step shows (cuBLAS, flash and cuDNN attention, Inductor's
    Triton kernels, fused AdamW), with made-up times in ms per step: 46 ms of matmul, 7 of attention, 8 fused by
    Inductor, 3 of optimizer, 1 other, so 65 busy; 26.5 TFLOPs a step over the 53 ms of matmul and attention at
    a 1 PFLOP/s peak is 50% MFU at most."""
    kernels = [("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", 30), ("triton_tem_fused_addmm_gelu_3", 6),
               ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_execute_kernel__5x_cublas", 10),
               ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, cutlass::bfloat16_t>>", 4),
               ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", 2), ("triton_per_fused_native_layer_norm_7", 5),
               ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128", 1),
               ("triton_poi_fused__scaled_dot_product_flash_attention_backward_2", 3),
               ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", 3),
               ("Memcpy DtoD (Device -> Device)", 1)]
    by_kind = bench.time_by_kind([(name, ms / 1e3) for name, ms in kernels])
    expected = {"matmul": 46, "attention": 7, bench.INDUCTOR: 8, "optimizer": 3, "other": 1}
    assert by_kind.keys() == expected.keys()
    assert all(by_kind[kind] == pytest.approx(ms / 1e3) for kind, ms in expected.items())
    lines = bench.describe_kinds(by_kind, 0.080, 26.5e12, 1e15)
    assert "65.0 ms busy in a 80.0 ms step" in lines[0] and "matmul" in lines[1] and "70.8%" in lines[1]
    assert "50.0% MFU" in lines[-1]


# ----------------------------------------------------------------------------- the study's summary

def write_finished_run(folder, lp, knn, ranks, val, test, losses, tag=""):
    """The files study.py reads from a finished run: per-block LP / k-NN / ranks, the validation-picked block's
    validation and test LP, and the logged losses (tag "_e010": a curve's files at epoch 10)."""
    folder.mkdir(parents=True)
    head = {"pooling": "mean", "best_linear_probe": {"layer": 1, "val": val, "test": test},
            "best_knn": {"layer": knn.index(max(knn)) + 1, "val": val, "test": max(knn)}}
    (folder / f"probe{tag}.json").write_text(json.dumps({"headline": head,
                                                         "layers": [{"lp_mean": a, "knn_mean": k} for a, k in zip(lp, knn)]}))
    (folder / f"rank{tag}.json").write_text(json.dumps({"checkpoints": [{"layers": [{"mean": r} for r in ranks]}]}))
    (folder / "log.jsonl").write_text("".join(json.dumps({"step": i + 1, "epoch": i, "loss": x}) + "\n"
                                              for i, x in enumerate(losses)))  # a line per epoch


def test_study_picks_blr_on_validation_and_summarises_by_hand(tmp_path):
    """Fake finished runs of one arm, two blocks each. Seed 0 sweeps three blrs: 5e-05 and 5e-04 tie on validation
    (the lower wins) and 1.5e-04 has the best test accuracy but a worse validation score (test never chooses).
    Seed 1 ran at the chosen blr; seed 2 never finished and is left out."""
    fake = {  # (blr, seed): (LP per block, k-NN per block, ranks per block, validation LP, test LP at the picked block, loss)
        ("5e-05", 0): ([12.0, 10.0], [9.0, 11.0], [6.0, 3.0], 60.0, 12.0, 0.9),
        ("1.5e-04", 0): ([90.0, 95.0], [90.0, 95.0], [6.0, 3.0], 50.0, 95.0, 0.5),
        ("5e-04", 0): ([12.0, 10.0], [9.0, 11.0], [6.0, 3.0], 60.0, 12.0, 0.9),
        ("5e-05", 1): ([14.0, 20.0], [13.0, 15.0], [8.0, 5.0], 70.0, 14.0, 0.7),
    }
    for (blr, seed), (lp, knn, ranks, val, test, loss) in fake.items():
        write_finished_run(tmp_path / "runs" / f"none-blr{blr}-s{seed}", lp, knn, ranks, val, test, [2.0, loss])
    call("results/study.py", "--collect", "--out", tmp_path, "--seeds", 0, 1, 2, "--arms", "none",
        "--blrs", "5e-5", "1.5e-4", "5e-4")
    table = json.loads((tmp_path / "study.json").read_text())["table"]["none"]
    assert table["blr"] == 5e-5 and table["seeds"] == 2
    assert table["sweep"] == {"5e-05": 60.0, "1.5e-04": 50.0, "5e-04": 60.0}
    assert table["lp_last"] == [15.0, 5.0]       # mean of 10 and 20, population std 5
    assert table["lp_best"] == [13.0, 1.0]       # the validation-picked blocks' test accuracy: 12 and 14
    assert table["knn_last"] == [13.0, 2.0]      # 11 and 15
    assert table["erank_last"] == [4.0, 1.0]     # 3 and 5
    assert table["loss"] == pytest.approx([0.8, 0.1])  # the last logged loss of each run
    before = (tmp_path / "study.json").read_text()
    quick = call("results/study.py", "--collect", "--out", tmp_path, "--arms", "none", "--epochs", 1, check=False)
    assert quick.returncode == 2 and "holds a study of 2-epoch runs" in quick.stderr and len(quick.stderr.splitlines()) == 1
    assert (tmp_path / "study.json").read_text() == before


def test_study_sweeps_past_an_edge_pick(tmp_path):
    """--blrs 5e-4 1.5e-3 picks the top, so 5e-3 is swept; it wins and is again the top, so 1.5e-2 is swept; it
    loses, so the pick (5e-3) is inside what was tried and 5e-2 is never read, though a run of it lies there."""
    for blr, val in {"5e-04": 50.0, "1.5e-03": 60.0, "5e-03": 70.0, "1.5e-02": 65.0, "5e-02": 99.0}.items():
        write_finished_run(tmp_path / "runs" / f"none-blr{blr}-s0", [val], [val], [1.0], val, val, [1.0])
    call("results/study.py", "--collect", "--out", tmp_path, "--seeds", 0, "--arms", "none", "--blrs", "5e-4", "1.5e-3")
    table = json.loads((tmp_path / "study.json").read_text())["table"]["none"]
    assert table["blr"] == 5e-3 and table["sweep"] == {"5e-04": 50.0, "1.5e-03": 60.0, "5e-03": 70.0, "1.5e-02": 65.0}
    summary = json.loads((tmp_path / "study.json").read_text())
    assert common.describe_machine("cpu") in summary["machine"] and summary["minutes"] is None  # none before: this machine
    summary |= {"machine": "the runs' machine", "minutes": 42.0, "command": "results/study.py --out X"}
    (tmp_path / "study.json").write_text(json.dumps(summary))
    call("results/study.py", "--collect", "--out", tmp_path, "--seeds", 0, "--arms", "none", "--blrs", "5e-4", "1.5e-3",
        "--extend", 0)
    summary = json.loads((tmp_path / "study.json").read_text())
    assert summary["table"]["none"]["blr"] == 1.5e-3
    assert (summary["machine"], summary["minutes"], summary["command"]) == ("the runs' machine", 42.0, "results/study.py --out X")


def test_spread_over_seeds_by_hand(tmp_path):
    """Two arms' curves at epoch 10: arm a at seeds 0 and 1, arm b at seed 0 only (its seed-1 run was not measured
    at epoch 10), so b has no spread and no gap is called; the means and population stds are worked by hand. The
    final loss is the last one logged in epoch 10 (0-based 9), not the one the run logged after it."""
    fake = {("s0", "a"): (50.0, 70.0, 3.0, 0.5), ("s1", "a"): (60.0, 74.0, 5.0, 0.7), ("s0", "b"): (40.0, 30.0, 2.0, 0.6)}
    for (seed, arm), (lp_last, knn_last, erank, loss) in fake.items():  # two blocks: the first is the picked one
        write_finished_run(tmp_path / seed / "runs" / arm, [1.0, lp_last], [2.0, knn_last], [9.0, erank], 0.0, 10.0,
                           [2.0] * 9 + [loss, 9.9], tag="_e010")
    write_finished_run(tmp_path / "s1" / "runs" / "b", [1.0], [1.0], [1.0], 0.0, 1.0, [1.0], tag="_e008")
    result = call("results/spread.py", "--dirs", tmp_path / "s0", tmp_path / "s1", "--arms", "a", "b", "--out", tmp_path)
    table = json.loads((tmp_path / "spread.json").read_text())["table"]
    assert table["a"]["seeds"] == 2 and table["b"]["seeds"] == 1
    assert table["a"]["lp_last"] == [55.0, 5.0] and table["a"]["knn_last"] == [72.0, 2.0]
    assert table["a"]["erank_last"] == [4.0, 1.0] and table["a"]["lp_best"] == [10.0, 0.0]
    assert table["a"]["loss"][0] == pytest.approx(0.6) and table["a"]["loss"][1] == pytest.approx(0.1)
    assert table["b"]["lp_last"] == [40.0, 0.0]
    assert "lp_last +15.0 (one seed: no spread yet)" in result.stdout
    missing = call("results/spread.py", "--dirs", tmp_path / "s0", "--epoch", 9, "--out", tmp_path, check=False)
    assert missing.returncode == 2 and "no run of" in missing.stderr and len(missing.stderr.splitlines()) == 1
    for seed_dir in ("s0", "s1"):  # both curves made at seed 0: one seed counted twice is no spread
        (tmp_path / seed_dir / "curve.json").write_text(json.dumps({"seed": 0, "epochs": 10}))
    twice = call("results/spread.py", "--dirs", tmp_path / "s0", tmp_path / "s1", "--arms", "a", "--out", tmp_path, check=False)
    assert twice.returncode == 2 and "two curves of the same seed" in twice.stderr
    typo = call("results/spread.py", "--dirs", tmp_path / "s9", check=False)  # --out defaults to the first of --dirs
    assert typo.returncode == 2 and not (tmp_path / "s9").exists()  # a refused call leaves no folder behind
    call("results/spread.py", "--dirs", tmp_path / "s0", "--arms", "a", "--out", tmp_path / "new")
    assert (tmp_path / "new" / "spread.md").exists()


def test_overview_reads_each_setting_by_hand(tmp_path):
    """A study summary holding the skip pair (and only half of the no-skip pair) and a curve with both arms at
    epoch 200: two rows, decay minus baseline read by the study's rule, the one-seed row claiming nothing."""
    stats = lambda lp, knn, rank, seeds=3: {"lp_best": lp, "knn_best": knn, "erank_last": rank, "seeds": seeds}
    (tmp_path / "study_glyphs").mkdir()
    (tmp_path / "study_glyphs" / "study.json").write_text(json.dumps({"table": {
        "none": stats([70.0, 2.0], [50.0, 3.0], [15.0, 1.0]), "linear-0.8": stats([60.0, 1.0], [45.0, 1.0], [5.0, 0.5]),
        "none-noskips": stats([1.0, 0.0], [1.0, 0.0], [1.0, 0.0])}}))
    point = lambda epoch, lp, knn, rank: {"epoch": epoch, "lp_best": lp, "knn_best": knn, "erank_last": rank}
    (tmp_path / "curve_glyphs_run2").mkdir()
    (tmp_path / "curve_glyphs_run2" / "curve.json").write_text(json.dumps({"curves": {
        "none": [point(100, 1.0, 1.0, 1.0), point(200, 99.0, 90.0, 20.0)], "linear-0.8": [point(200, 98.5, 93.0, 30.0)]}}))
    result = call("results/overview.py", "--root", tmp_path, "--out", tmp_path / "new")  # a folder made for it
    rows = [line for line in (tmp_path / "new" / "overview.md").read_text().splitlines() if line.startswith("| ") and "epochs" in line]
    assert len(rows) == 2 and rows == [line for line in result.stdout.splitlines() if line in rows]
    assert rows[0].startswith("| 2 CPU epochs, skips | none / linear-0.8 | 3 | 70.0 ± 2.0 / 60.0 ± 1.0: -10.0 (a difference)")
    assert "| 50.0 ± 3.0 / 45.0 ± 1.0: -5.0 (within seed spread) | 15.0 ± 1.0 / 5.0 ± 0.5: -10.0 (a difference) |" in rows[0]
    assert rows[1] == ("| 200 GPU epochs, skips | none / linear-0.8 | 1 | 99.0 / 98.5: -0.5 (one seed: no spread yet) | "
                       "90.0 / 93.0: +3.0 (one seed: no spread yet) | 20.0 / 30.0: +10.0 (one seed: no spread yet) |")
    empty = call("results/overview.py", "--root", tmp_path / "nothing", "--out", tmp_path, check=False)
    assert empty.returncode == 2 and len(empty.stderr.splitlines()) == 1 and "no summary" in empty.stderr


def test_gaps_subtract_the_arms_at_shared_checkpoints(tmp_path):
    """Decay minus baseline at the epochs both arms reached (epoch 4, baseline only, is left out), each gap marked
    within spread when inside twice the larger of the two arms' stds (on the band itself too), all worked by hand.
    Each gap lies between the band of the larger std and that of the smaller one, so a band from either arm alone
    or from the smaller std reads otherwise."""
    point = lambda epoch, lp, knn_last, knn_best, rank: {"epoch": epoch, "lp_best": lp, "knn_last": knn_last,
                                                         "knn_best": knn_best, "erank_last": rank}
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "curve.json").write_text(json.dumps({"curves": {
        "none": [point(2, 70.0, 50.0, 55.0, 15.0), point(4, 1.0, 1.0, 1.0, 1.0)],
        "linear-0.8": [point(2, 67.0, 52.5, 61.0, 13.5)]}}))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "curve.json").write_text(json.dumps({"curves": {"none": [point(2, 1.0, 1.0, 1.0, 1.0)]}}))
    std = lambda lp, knn_last, knn_best, rank: {"lp_best": [0, lp], "knn_last": [0, knn_last], "knn_best": [0, knn_best],
                                                "erank_last": [0, rank]}
    (tmp_path / "spread.json").write_text(json.dumps({"table": {"none": std(2.0, 1.0, 3.0, 0.5),
                                                                "linear-0.8": std(1.0, 1.5, 1.0, 1.0)}}))
    result = call("results/gaps.py", "--curves", f"my curve={tmp_path / 'c'}", "--spread", tmp_path / "spread.json",
                  "--out", tmp_path / "new")  # bands 4, 3, 6, 2; the smaller std's 2, 2, 2, 1
    rows = [line for line in (tmp_path / "new" / "gaps.md").read_text().splitlines() if line.startswith("| my curve")]
    assert rows == ["| my curve | 2 | -3.0 (within) | +2.5 (within) | +6.0 (within) | -1.5 (within) |"]
    assert rows[0] in result.stdout
    (tmp_path / "wide.json").write_text(json.dumps({"table": {"none": std(1.0, 1.0, 2.9, 0.5),
                                                              "linear-0.8": std(1.0, 1.0, 1.0, 0.5)}}))
    call("results/gaps.py", "--curves", f"my curve={tmp_path / 'c'}", "--spread", tmp_path / "wide.json", "--out", tmp_path / "w")
    assert "| my curve | 2 | -3.0 | +2.5 | +6.0 | -1.5 |" in (tmp_path / "w" / "gaps.md").read_text()  # bands 2, 2, 5.8, 1
    spread = ["--spread", tmp_path / "spread.json"]
    for bad in (["--curves", "no label"], ["--curves", f"x={tmp_path / 'nowhere'}"], ["--curves", f"x={tmp_path / 'half'}"],
                ["--curves", f"x={tmp_path / 'c'}", f"x={tmp_path / 'c'}"], ["--curves", f"x={tmp_path / 'c'}", "--spread", tmp_path / "no.json"],
                ["--curves", f"x={tmp_path / 'c'}", "--arms", "none", "linear-0.6"],
                ["--curves", f"x={tmp_path / 'c'}", "--spread", tmp_path / "c" / "curve.json"]):  # no spread table
        refused = call("results/gaps.py", *spread, *bad, "--out", tmp_path / "refused", check=False)
        assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1 and not (tmp_path / "refused").exists(), bad


def test_decay_as_lr_scales_print_each_schedules_multipliers(tmp_path):
    """--scales trains nothing and prints, per schedule, the last branch's lr multiplier 1 / prod(alpha_k) over
    the 24 sub-layers of 12 blocks: for linear to 0.6 the paper's alphas 1 - 0.4 k / 23 written out here (279.5),
    and for exp to 0.6, alpha_min ** (k / 23), 0.6 ** -12 = 459.4."""
    result = call("results/decay_as_lr.py", "--scales", "--out", tmp_path / "new")  # a folder made for it
    linear = 1 / math.prod(1 - 0.4 * k / 23 for k in range(24))
    assert f"linear to 0.6: alphas 1.000 ... 0.600, lr multiplier of the branches 1.00 ... {linear:.1f}" in result.stdout
    assert f"exp to 0.6: alphas 1.000 ... 0.600, lr multiplier of the branches 1.00 ... {0.6 ** -12:.1f}" in result.stdout
    assert len(result.stdout.splitlines()) >= 2 * (len(M.SCHEDULES) - 1) and not (tmp_path / "new" / "overlay.json").exists()
    with mock.patch.object(M, "SCHEDULES", (*M.SCHEDULES, "sqrt")):  # a name added before its formula
        half_done = call("results/decay_as_lr.py", "--scales", "--out", tmp_path, check=False)
    assert half_done.returncode == 2 and len(half_done.stderr.splitlines()) == 1 and "'sqrt'" in half_done.stderr


def write_depth_probe(path, knn, picked, lp=None):
    """probe.py's JSON as results/depth.py reads it: 12 blocks of mean-pooled k-NN (and LP, the same unless given),
    the block `picked` on validation for both."""
    lp = lp or knn
    head = {"pooling": "mean", "best_knn": {"layer": picked, "test": knn[picked - 1]},
            "best_linear_probe": {"layer": picked, "test": lp[picked - 1]}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"headline": head, "layers": [{"layer": b + 1, "knn_mean": k, "lp_mean": a}
                                                             for b, (k, a) in enumerate(zip(knn, lp))]}))


def test_depth_profile_measures_by_hand(tmp_path):
    """Two seeds per arm of the 2-epoch skip setting. none: blocks 5-8 at 20, 10-12 at 40, 40 and 30 (seed 0, picked
    block 10: fall 10) or 40, 40, 36 (seed 1, picked 11: fall 4); decay: 5 in the middle, 30, 40, 40 on top, picked
    at 12 or 11 (fall 0). So fall 7 ± 3 against 0 ± 0 and top minus middle 17.67 ± 1 against 31.67 ± 0: both gaps
    beyond twice the larger std, in the GPU's direction. The no-skip arms have one arm's runs only: no row."""
    sys.path.insert(0, os.path.join(HERE, "results"))
    import depth
    (tmp_path / "study_glyphs").mkdir()
    (tmp_path / "study_glyphs" / "study.json").write_text(json.dumps({"table": {
        "none": {"blr": 1.5e-3}, "linear-0.8": {"blr": 1.5e-3}, "none-noskips": {"blr": 5e-4}}}))
    runs = tmp_path / "study_glyphs" / "runs"
    write_depth_probe(runs / "none-blr1.5e-03-s0" / "probe.json", [10.0] * 4 + [20.0] * 4 + [30.0, 40.0, 40.0, 30.0], 10)
    write_depth_probe(runs / "none-blr1.5e-03-s1" / "probe.json", [10.0] * 4 + [20.0] * 4 + [30.0, 40.0, 40.0, 36.0], 11)
    for seed, picked in ((0, 12), (1, 11)):
        write_depth_probe(runs / f"linear-0.8-blr1.5e-03-s{seed}" / "probe.json", [5.0] * 8 + [10.0, 30.0, 40.0, 40.0], picked)
    write_depth_probe(runs / "none-noskips-blr5e-04-s0" / "probe.json", [1.0] * 12, 12)
    result = call("results/depth.py", "--root", tmp_path, "--out", tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "depth.json").read_text())
    assert list(summary) == ["2 CPU epochs, skips"]
    none, decay = summary["2 CPU epochs, skips"]["arms"]["none"], summary["2 CPU epochs, skips"]["arms"]["linear-0.8"]
    assert none["knn_fall"] == [7.0, 3.0] and decay["knn_fall"] == [0.0, 0.0]
    assert none["knn_peak"] == [10.5, 0.5] and decay["knn_peak"] == [11.5, 0.5]
    assert none["knn_top_minus_middle"] == pytest.approx([110 / 3 - 20 + 1, 1.0])  # 17.67: (36.67 + 38.67) / 2 - 20
    assert decay["knn_top_minus_middle"] == pytest.approx([110 / 3 - 5, 0.0])
    assert none["knn_by_block"][11] == [33.0, 3.0] and none["lp_fall"] == [7.0, 3.0]
    assert summary["2 CPU epochs, skips"]["reading"] == "the GPU's shape, seen"
    assert "| k-NN fall | 7.0 ± 3.0 | 0.0 ± 0.0 | -7.0 (a difference) |" in result.stdout
    assert "blocks 5-8 -15.0, blocks 10-12 -1.0" in result.stdout  # 5 - 20; (30 + 40 + 40) / 3 - (40 + 40 + 33) / 3
    # the two other calls of the protocol, on tables written by hand
    row = lambda fall, rise, seeds=3: {"knn_fall": fall, "knn_top_minus_middle": rise, "seeds": seeds}
    assert depth.reading({"a": row([5.0, 1.0], [5.0, 1.0]), "d": row([9.0, 1.0], [9.0, 1.0])}, "a", "d") == "against the GPU's shape"
    assert depth.reading({"a": row([5.0, 1.0], [5.0, 1.0]), "d": row([1.0, 1.0], [6.0, 1.0])}, "a", "d") == "not separated"
    assert depth.reading({"a": row([5.0, 0.0], [5.0, 0.0], 1), "d": row([1.0, 0.0], [9.0, 0.0])}, "a", "d") == "one seed: not tested"
    (runs / "linear-0.8-blr1.5e-03-s1" / "probe.json").write_text(json.dumps({"headline": {"pooling": "mean"}, "layers": [
        {"layer": 12, "knn_mean": 1.0, "lp_mean": 1.0}]}))  # probe.py --layers 12 --n-val 0
    partial = call("results/depth.py", "--root", tmp_path, "--out", tmp_path / "out", check=False)
    assert partial.returncode == 2 and len(partial.stderr.splitlines()) == 1 and "blocks 1-12" in partial.stderr
    empty = call("results/depth.py", "--root", tmp_path / "nothing", "--out", tmp_path / "out", check=False)
    assert empty.returncode == 2 and len(empty.stderr.splitlines()) == 1 and "no setting" in empty.stderr


def test_a_curve_made_before_calls_were_listed_counts_as_one_call():
    sys.path.insert(0, os.path.join(HERE, "results"))
    from curve import calls_so_far
    legacy = {"curves": {}, "epochs": 200, "minutes": 7.5, "machine": "an H200", "command": "results/curve.py --epochs 200"}
    assert calls_so_far(legacy) == [{"minutes": 7.5, "machine": "an H200", "command": "results/curve.py --epochs 200"}]
    assert calls_so_far({"curves": {}}) == [] and calls_so_far({"calls": [legacy]}) == [legacy]


def test_the_overlay_gap_pairs_log_lines_by_step():
    """A run resumed from a stop at step 30 logs a line there that its twin has not: paired by position, every later
    line would be compared with another step's."""
    sys.path.insert(0, os.path.join(HERE, "results"))
    from decay_as_lr import max_gap
    whole = [(20, 0.96), (40, 0.90), (60, 0.85)]
    resumed = [(20, 0.96), (30, 0.93), (40, 0.91), (60, 0.85)]
    assert max_gap(whole, resumed) == pytest.approx(0.01)


def test_study_arm_names_give_their_flags():
    sys.path.insert(0, os.path.join(HERE, "results"))
    from study import arm_flags
    assert arm_flags("none-noskips") == ["--alpha-schedule", "none", "--no-decoder-skips"]
    assert arm_flags("linear-0.9") == ["--alpha-schedule", "linear", "--alpha-min", "0.9"]
    assert arm_flags("linear-0.8-noskips") == ["--alpha-schedule", "linear", "--no-decoder-skips", "--alpha-min", "0.8"]
    for bad in ("linear-best-noskips", "linear-nan", "linear-0", "cosine-0.8", "linear-0.8-wide"):
        with pytest.raises(ValueError, match="is not an arm"):
            arm_flags(bad)


def test_study_scripts_stop_a_run_past_its_time_with_ctrl_c_then_a_kill(tmp_path, monkeypatch):
    """curve.py --train-seconds: the run gets SIGINT first (pretrain.py then saves the step under way; a kill would
    lose everything since its last save), and a kill only if it has not stopped grace seconds later."""
    monkeypatch.syspath_prepend(os.path.join(HERE, "results"))
    import study
    polite, stubborn = tmp_path / "polite.py", tmp_path / "stubborn.py"
    polite.write_text("import pathlib, signal, sys, time\n"
                      f"signal.signal(signal.SIGINT, lambda *a: (pathlib.Path({str(tmp_path / 'saved')!r}).touch(), sys.exit(130)))\n"
                      "time.sleep(60)\n")
    stubborn.write_text("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)\n")
    for script, grace in ((polite, 20), (stubborn, 1)):
        start = time.time()
        with pytest.raises(subprocess.TimeoutExpired):
            study.sh(script, timeout=3, grace=grace)  # time enough for the polite one to set up its handler
        assert time.time() - start < 12  # the polite one stopped at once, the stubborn one was killed
    assert (tmp_path / "saved").exists()
    with pytest.raises(subprocess.CalledProcessError):  # a failure is still one
        study.sh("-c", "import sys; sys.exit(3)")


def test_study_scripts_pass_a_sigterm_on_to_their_runs_and_stop_in_one_line(tmp_path):
    """`kill <study pid>` signals the study alone: without passing it on, its runs would go on unwatched. The run
    (a stub that saves on SIGTERM, then exits 0 as pretrain.py does when the signal lands in its last step) gets
    it; the script the pool thread would start next (probe.py after pretraining) never starts; and the study exits
    143 with one line."""
    run_stub, next_stub = tmp_path / "run.py", tmp_path / "next.py"
    run_stub.write_text("import pathlib, signal, sys, time\n"
                        f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(tmp_path / 'saved')!r}).touch(), sys.exit(0)))\n"
                        f"pathlib.Path({str(tmp_path / 'ready')!r}).touch()\n"
                        "time.sleep(60)\n")
    next_stub.write_text(f"import pathlib; pathlib.Path({str(tmp_path / 'next-ran')!r}).touch()\n")
    study_like = (f"import subprocess, sys; sys.path.insert(0, {os.path.join(HERE, 'results')!r}); import study\n"
                  "from concurrent.futures import ThreadPoolExecutor\n"
                  "def run(_):\n"
                  "    try:\n"
                  f"        study.sh({str(run_stub)!r}); study.sh({str(next_stub)!r})\n"
                  "    except subprocess.CalledProcessError as error:\n"
                  "        assert study.ended(error) == \"stopped\"\n"
                  "def main():\n"
                  "    with ThreadPoolExecutor(1) as pool:\n"
                  "        list(pool.map(run, [0]))\n"
                  "study.stop_in_one_line(main)\n")
    proc = subprocess.Popen([sys.executable, "-c", study_like], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (tmp_path / "ready").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and (tmp_path / "saved").exists() and not (tmp_path / "next-ran").exists()
    assert stderr.strip().splitlines() == ["stopped by SIGTERM; the runs under way were told to save their step (their "
                                           "logs say where they stopped), and the same command goes on from there"]


def test_curve_probes_each_kept_checkpoint(tmp_path):
    """curve.py's last point is the finished run: it must match probe.py and rank.py run on ckpt.pt directly."""
    root = write_png_folder(str(tmp_path / "imgs"))
    tiny_run = "--model vit_p4_32 --batch-size 4 --data " + root
    quick = ["--probe-args=--epochs 3", "--rank-args=--n 0 --n-tokens 4"]
    call("results/curve.py", "--arms", "none", "--epochs", 2, "--every", 1, "--out", tmp_path / "c",
        f"--pretrain-args={tiny_run}", *quick)
    points = json.loads((tmp_path / "c" / "curve.json").read_text())["curves"]["none"]
    assert [p["epoch"] for p in points] == [1, 2]
    final = tmp_path / "c" / "runs" / "none" / "ckpt.pt"
    call("probe.py", final, "--epochs", 3, "--out", tmp_path / "probe.json")
    call("rank.py", final, "--n", 0, "--n-tokens", 4, "--out", tmp_path / "rank.json")
    probe = json.loads((tmp_path / "probe.json").read_text())
    pool = probe["headline"]["pooling"]
    assert points[-1]["lp_last"] == probe["layers"][-1]["lp_" + pool]
    assert points[-1]["erank_last"] == json.loads((tmp_path / "rank.json").read_text())["checkpoints"][0]["layers"][-1][pool]
    for kept in (tmp_path / "c" / "runs" / "none").glob("ckpt_epoch*.pt"):  # measured: the JSONs now hold the curve
        kept.unlink()
    call("results/curve.py", "--arms", "none", "--out", tmp_path / "c", "--collect")  # the request is read back
    summary = json.loads((tmp_path / "c" / "curve.json").read_text())
    assert summary["curves"]["none"] == points and (summary["epochs"], summary["every"], summary["seed"]) == (2, 1, 0)
    assert len(summary["calls"]) == 1 and summary["minutes"] == summary["calls"][0]["minutes"]  # a collect is no call
    older = {k: v for k, v in summary.items() if k != "arm_blr"}  # a curve.json from before --arm-blr was recorded
    (tmp_path / "c" / "curve.json").write_text(json.dumps(older))
    call("results/curve.py", "--arms", "none", "--out", tmp_path / "c", "--collect")
    assert json.loads((tmp_path / "c" / "curve.json").read_text()) == older  # not "arm_blr": {}, which would refuse a resume
    legacy = {k: v for k, v in summary.items() if k != "calls"}  # a curve.json from before calls were listed
    (tmp_path / "c" / "curve.json").write_text(json.dumps(legacy))
    call("results/curve.py", "--arms", "none", "--out", tmp_path / "c", "--collect")
    assert json.loads((tmp_path / "c" / "curve.json").read_text())["calls"] == summary["calls"]  # its one call, kept
    (tmp_path / "c" / "curve.json").write_text(json.dumps(summary))
    other = call("results/curve.py", "--arms", "none", "--epochs", 2, "--every", 1, "--seed", 7, "--out", tmp_path / "c",
                 check=False)  # seed 0's runs must not be measured as seed 7's
    assert other.returncode == 2 and "made with --seed 0" in other.stderr and len(other.stderr.splitlines()) == 1
    uneven = call("results/curve.py", "--arms", "none", "--epochs", 10, "--every", 4, "--out", tmp_path / "u", check=False)
    assert uneven.returncode == 2 and "--every 4 must divide --epochs 10" in uneven.stderr  # epoch 10 never kept
    assert json.loads((tmp_path / "c" / "curve.json").read_text()) == summary
    run_dir = tmp_path / "c" / "runs" / "none"  # a begun run whose ckpt.pt was not brought back (a GPU loan's)
    for name in ("ckpt.pt", "probe_e002.json", "rank_e002.json"):
        (run_dir / name).unlink()
    log = (run_dir / "log.jsonl").read_text()
    again = call("results/curve.py", "--arms", "none", "--epochs", 2, "--every", 1, "--out", tmp_path / "c",
                 f"--pretrain-args={tiny_run}", *quick)
    assert "holds a begun run, measured, but no ckpt.pt" in again.stdout and (run_dir / "log.jsonl").read_text() == log
    assert not (run_dir / "ckpt.pt").exists()  # not restarted from epoch 0 under its epoch-1 point
    resumed = json.loads((tmp_path / "c" / "curve.json").read_text())
    calls = resumed["calls"]  # the first call, then this one
    assert [entry["command"].count("--epochs 2") for entry in calls] == [1, 1] and summary["calls"] == calls[:1]
    assert resumed["minutes"] == round(calls[0]["minutes"] + calls[1]["minutes"], 1)
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "c" / "blocks.png").stat().st_size > 0 and (tmp_path / "c" / "curve.png").stat().st_size > 0
