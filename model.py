"""A masked autoencoder (He et al. 2021) whose encoder shortcuts decay with depth.

Zhang et al., "Residual Connections Harm Abstract Feature Learning in Masked Autoencoders" (2404.10947):
every encoder sub-layer computes x = alpha_k * x + f(x) with a fixed alpha_k that falls from 1 to alpha_min.
Read top to bottom: alpha, blocks, ViT encoder, MAE, config, checkpoint loading.

einops axis letters: b batch, n tokens, d channels, h/w patch grid, p1/p2 pixels inside a patch,
c colour channels, nh attention heads, hd channels per head.
"""
import argparse
import itertools
import math
import operator
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

SCHEDULES = ("none", "linear", "cosine", "exp", "step")


def alpha(t, schedule="linear", alpha_min=0.6):
    """Weight of the identity shortcut at relative depth t in [0, 1]: 1 at t = 0, alpha_min at t = 1 (none: 1).
    A new schedule: its name in SCHEDULES above, its formula here. Checkpoints store the alphas they trained with,
    so editing an existing formula makes its old checkpoints refuse to load instead of loading as another net."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown alpha schedule {schedule!r}; choose one of {', '.join(SCHEDULES)} "
                         "(a new one goes into SCHEDULES and alpha() in model.py)")
    if not 0 < alpha_min <= 1:
        raise ValueError(f"alpha_min must be in (0, 1], got {alpha_min}")
    if schedule == "none":
        return 1.0  # the standard residual baseline
    if schedule == "linear":
        return 1 - (1 - alpha_min) * t  # the paper
    if schedule == "cosine":
        return alpha_min + (1 - alpha_min) * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "exp":
        return alpha_min ** t
    if schedule == "step":
        return 1.0 if t < 0.5 else alpha_min
    raise ValueError(f"alpha schedule {schedule!r} is in SCHEDULES but alpha() has no formula for it")


def encoder_alphas(depth, schedule, alpha_min):
    """One alpha per encoder sub-layer k = 0 .. 2*depth-1 (attention and MLP each count), in order."""
    n = 2 * depth
    alphas = []
    for k in range(n):
        given = alpha(k / (n - 1), schedule, alpha_min)
        try:
            a = float(given)  # numpy and 0-d torch numbers too, stored as plain floats (torch.load weights_only)
        except (TypeError, ValueError):
            a = math.nan
        if not (math.isfinite(a) and a > 0):  # an edited formula: 0 cuts the stream (and --decay-as-lr divides by it)
            raise ValueError(f"alpha() gives {given!r} for schedule {schedule!r} at sub-layer {k} "
                             f"(t = {k / (n - 1):.3f}): a shortcut weight must be a number above 0")
        alphas.append(a)
    return alphas


def check_alphas(ckpt):
    """Refuse a checkpoint whose stored schedule alphas are not what alpha() gives now (it was edited since)."""
    cfg = ckpt["config"]
    if cfg["alpha_schedule"] not in SCHEDULES:
        raise ValueError(f"trained with alpha schedule {cfg['alpha_schedule']!r}, which model.py no longer has: put "
                         "its name back into SCHEDULES and its formula into alpha()")
    now = encoder_alphas(cfg["depth"], cfg["alpha_schedule"], cfg["alpha_min"])
    for k, (then, today) in enumerate(zip(ckpt.get("alphas", now), now)):
        if not math.isclose(then, today, rel_tol=1e-9):
            d = next(d for d in range(4, 18) if f"{then:.{d}g}" != f"{today:.{d}g}")  # enough digits to differ
            raise ValueError(f"trained with alpha schedule {cfg['alpha_schedule']!r} giving {then:.{d}g} at sub-layer {k}, "
                             f"but alpha() now gives {today:.{d}g}: restore alpha(), or give the edited schedule its own "
                             "name in SCHEDULES")


def shortcut_weights(cfg):
    """The alphas the encoder uses: the schedule's, or all 1 when decay is taken as a learning rate."""
    return [1.0] * 2 * cfg.depth if cfg.decay_as_lr else encoder_alphas(cfg.depth, cfg.alpha_schedule, cfg.alpha_min)


def stream_scales(depth, schedule, alpha_min):
    """c_k = alpha_0 * ... * alpha_k: the decayed stream after sub-layer k is c_k times the residual one (README:
    "Decay is a learning rate")."""
    return list(itertools.accumulate(encoder_alphas(depth, schedule, alpha_min), operator.mul))


# ----------------------------------------------------------------------------- blocks

class Attention(nn.Module):
    def __init__(self, dim, heads, qkv_bias=True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        # 'three nh hd' is timm's qkv layout, so public ViT weights load unchanged
        q, k, v = rearrange(self.qkv(x), "b n (three nh hd) -> three b nh n hd", three=3, nh=self.heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(x, "b nh n hd -> b n (nh hd)"))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; the two shortcut weights are fixed numbers, not parameters."""

    def __init__(self, dim, heads, mlp_ratio, a_attn=1.0, a_mlp=1.0):
        super().__init__()
        self.a_attn, self.a_mlp = a_attn, a_mlp
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), MLP(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = self.a_attn * x + self.attn(self.norm1(x))
        x = self.a_mlp * x + self.mlp(self.norm2(x))
        return x


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sine-cosine embedding [grid*grid, dim] (MAE's): half the channels for rows, half for columns."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for pos in (xs.flatten(), ys.flatten()):
        angles = pos[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def with_cls_slot(pos):  # the cls token gets a zero positional embedding, as in MAE
    return torch.cat([torch.zeros(1, pos.shape[1]), pos])[None]


# ----------------------------------------------------------------------------- encoder

class ViT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        p, grid = cfg.patch_size, cfg.img_size // cfg.patch_size
        self.patch_size = p
        self.patch_embed = nn.Linear(p * p * cfg.in_chans, cfg.width)  # a stride-p conv, written as a Linear
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.register_buffer("pos_embed", with_cls_slot(sincos_pos_embed(cfg.width, grid)), persistent=False)
        a = shortcut_weights(cfg)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, a[2 * i], a[2 * i + 1]) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6) if cfg.encoder_norm else nn.Identity()

    def embed(self, imgs):
        return self.patch_embed(patchify(imgs, self.patch_size)) + self.pos_embed[:, 1:]

    def add_cls(self, x):
        cls = repeat(self.cls_token + self.pos_embed[:, :1], "1 1 d -> b 1 d", b=x.shape[0])
        return torch.cat([cls, x], dim=1)

    def forward(self, x):
        """x: embedded tokens with cls [b, n, d]. Returns the output (after the final norm) and the block outputs."""
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return self.norm(x), outs


def patchify(imgs, p):
    return rearrange(imgs, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)


def unpatchify(x, p, c=3):
    h = math.isqrt(x.shape[1])
    return rearrange(x, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h, p1=p, p2=p, c=c)


def random_masking(noise, mask_ratio):
    """Per-sample random masking by argsort of noise [b, n]: small noise is kept. mask: 1 = hidden."""
    n = noise.shape[1]
    n_keep = n - int(n * mask_ratio)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    mask = (ids_restore >= n_keep).to(noise.dtype)
    return ids_keep, ids_restore, mask


def gather_tokens(x, ids):
    return torch.gather(x, 1, repeat(ids, "b n -> b n d", d=x.shape[-1]))


def unshuffle(tokens, mask_token, ids_restore):
    """Visible tokens [b, 1+k, d] (cls first) back to full length [b, 1+n, d], hidden places = mask_token."""
    b, n = ids_restore.shape
    fill = mask_token.expand(b, n + 1 - tokens.shape[1], -1).to(tokens.dtype)
    patches = gather_tokens(torch.cat([tokens[:, 1:], fill], dim=1), ids_restore)
    return torch.cat([tokens[:, :1], patches], dim=1)


# ----------------------------------------------------------------------------- MAE

class SkipFuse(nn.Module):
    """The authors' encoder-to-decoder skip: concat(decoder state, un-shuffled encoder feature) -> MLP, added."""

    def __init__(self, dec_dim, enc_dim):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, enc_dim))
        # one Linear over the concatenation, written as two summed, so each half can get its own learning rate
        self.fc1_dec, self.fc1_enc = nn.Linear(dec_dim, dec_dim), nn.Linear(enc_dim, dec_dim, bias=False)
        self.act, self.fc2 = nn.SiLU(), nn.Linear(dec_dim, dec_dim)

    def reset_fc1(self):
        """Xavier-uniform over the concatenated input, as the single Linear of the authors' code."""
        dec, enc = self.fc1_dec.in_features, self.fc1_enc.in_features
        joint = nn.init.xavier_uniform_(torch.empty(self.fc1_dec.out_features, dec + enc))
        with torch.no_grad():
            self.fc1_dec.weight.copy_(joint[:, :dec])
            self.fc1_enc.weight.copy_(joint[:, dec:])

    def forward(self, x, feature, ids_restore):
        full = unshuffle(feature, self.mask_token, ids_restore)
        return x + self.fc2(self.act(self.fc1_dec(x) + self.fc1_enc(full)))


def standard_strides(grad):
    """The decoder cls token's gradient is a slice of the torch.cat in decode(), with its strides; DDP expects a
    parameter's own and warned ("Grad strides do not match bucket view strides") at every torchrun start."""
    return grad.clone(memory_format=torch.contiguous_format)


def skip_blocks(cfg):
    """The encoder blocks that feed the decoder's skips, deepest first: the last and every second one below it (11,
    9, ..., 1 of 12), one per decoder block at most; none without skips. Counted from the last, so that an odd depth
    has its last block read (else it gets no gradient) and one block feeds the decoder at all."""
    return list(range(cfg.depth - 1, -1, -2))[:cfg.decoder_depth] if cfg.decoder_skips else []


class MAE(nn.Module):
    def __init__(self, config):
        super().__init__()
        cfg = self.config = config
        dd, grid = cfg.decoder_width, cfg.img_size // cfg.patch_size
        self.encoder = ViT(cfg)
        self.register_buffer("decoder_pos_embed", with_cls_slot(sincos_pos_embed(dd, grid)), persistent=False)
        if cfg.decoder_skips:  # the decoder starts from positions alone and reads every second encoder block
            self.decoder_cls_token = nn.Parameter(torch.zeros(1, 1, dd))
            self.decoder_cls_token.register_hook(standard_strides)
            self.decoder_embed = nn.Linear(dd, dd)
            self.skips = nn.ModuleList(SkipFuse(dd, cfg.width) for _ in self.skip_blocks)
        else:  # plain MAE: the decoder reads the encoder output, hidden places filled by a mask token
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
            self.decoder_embed = nn.Linear(cfg.width, dd)
        self.decoder_blocks = nn.ModuleList(
            Block(dd, cfg.decoder_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, cfg.patch_size ** 2 * cfg.in_chans)
        self.apply(init_weights)
        for block in [*self.encoder.blocks, *self.decoder_blocks]:  # every residual branch starts at zero
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.mlp.fc2.weight)
        for skip in getattr(self, "skips", []):
            skip.reset_fc1()
            nn.init.zeros_(skip.fc2.weight)
        nn.init.zeros_(self.decoder_pred.weight)
        for name, param in self.named_parameters():
            if name.endswith(("cls_token", "mask_token")):
                nn.init.normal_(param, std=0.02)
        with torch.no_grad():  # decay as a learning rate starts from the decayed model's function
            for name, scale in self.decay_scales().items():
                self.get_parameter(name).mul_(scale)

    @property
    def alphas(self):
        """The schedule's alpha per encoder sub-layer, as checkpoints, probe.py and rank.py report it. Under
        decay_as_lr the shortcuts themselves are 1 (shortcut_weights) and the decay is in the learning rates."""
        return encoder_alphas(self.config.depth, self.config.alpha_schedule, self.config.alpha_min)

    @property
    def skip_blocks(self):
        return skip_blocks(self.config)

    def decay_scales(self):
        """{parameter name: s} under decay_as_lr, else {}. The residual encoder whose parameters are s times the
        decayed encoder's computes the same function (exactly, but for LayerNorm's eps), so AdamW trains it the
        same way with that tensor's lr x s, eps / s and weight decay / s (README: "Decay is a learning rate").
        Each branch's last layer reads s = 1 / c_k; a skip reads block b's raw output (scale c of its MLP
        sub-layer; the deepest skip reads after the final norm, scale 1): its encoder-side fc1 takes s = c, its mask
        token 1 / c."""
        cfg = self.config
        if not cfg.decay_as_lr:
            return {}
        c = stream_scales(cfg.depth, cfg.alpha_schedule, cfg.alpha_min)
        scales = {}
        for i in range(cfg.depth):
            for k, layer in ((2 * i, "attn.proj"), (2 * i + 1, "mlp.fc2")):
                scales |= {f"encoder.blocks.{i}.{layer}.{t}": 1 / c[k] for t in ("weight", "bias")}
        for j, b in enumerate(self.skip_blocks):
            c_b = 1.0 if b == cfg.depth - 1 else c[2 * b + 1]
            scales |= {f"skips.{j}.fc1_enc.weight": c_b, f"skips.{j}.mask_token": 1 / c_b}
        return scales

    def forward(self, imgs, mask_ratio=None, noise=None):
        """Returns (loss on hidden patches, predicted patches [b, n, p*p*c], mask [b, n] with 1 = hidden)."""
        mask_ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        x = self.encoder.embed(imgs)
        if noise is None:
            noise = torch.rand(x.shape[:2], device=x.device)
        ids_keep, ids_restore, mask = random_masking(noise, mask_ratio)
        latent, outs = self.encoder(self.encoder.add_cls(gather_tokens(x, ids_keep)))
        pred = self.decode(latent, outs, ids_restore)
        return self.loss(imgs, pred, mask), pred, mask

    def decode(self, latent, outs, ids_restore):
        if self.config.decoder_skips:
            outs = outs[:-1] + [latent]  # the last block is read after the final norm
            x = torch.cat([self.decoder_cls_token, self.decoder_pos_embed[:, 1:]], dim=1)
            # in the model's dtype, as the pos_embed added to the other streams makes them: a bf16 stream under
            # autocast would round away the small updates of the zero-initialised branches
            x = self.decoder_embed(x).to(self.decoder_pos_embed.dtype).expand(latent.shape[0], -1, -1)
        else:
            x = unshuffle(self.decoder_embed(latent), self.mask_token, ids_restore) + self.decoder_pos_embed
        for i, block in enumerate(self.decoder_blocks):
            if self.config.decoder_skips and i < len(self.skips):
                x = self.skips[i](x, outs[self.skip_blocks[i]], ids_restore)
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def loss(self, imgs, pred, mask):
        target = patchify(imgs, self.config.patch_size)
        if self.config.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    @torch.no_grad()
    def features(self, imgs):
        """Tokens [b, 1+n, d] after every encoder block for unmasked images; the last is after the final norm."""
        latent, outs = self.encoder(self.encoder.add_cls(self.encoder.embed(imgs)))
        return outs[:-1] + [latent]

    def checkpoint(self, **training_state):
        """The one checkpoint format: plain dicts and tensors, so torch.load(weights_only=True) reads it."""
        return {"config": asdict(self.config), "alphas": self.alphas, "model": self.state_dict(), **training_state}

    @classmethod
    def from_checkpoint(cls, source, heads=None):
        """Rebuild from a pretrain.py checkpoint (path or dict) or a timm / facebookresearch-mae ViT state_dict."""
        ckpt = read_checkpoint(source) if not isinstance(source, dict) else source
        if "config" in ckpt and "model" in ckpt:
            check_alphas(ckpt)
            model = cls(MAEConfig(**ckpt["config"]))
            model.load_state_dict(ckpt["model"])
            return model
        return from_timm(ckpt.get("model", ckpt), heads)


def read_checkpoint(path):
    """torch.load of weights and plain data only, which also lets through the argparse.Namespace that holds the flags
    of facebookresearch/mae's training checkpoints (checkpoint-N.pth)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- config

@dataclass
class MAEConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    alpha_schedule: str = "linear"
    alpha_min: float = 0.6
    # On by default: in the paper's ablation removing the skips drops the decayed model from 83.6 to 61.5.
    decoder_skips: bool = True
    # Standard MAE norms the encoder output; the authors' code does not. We keep it (public weights have it).
    encoder_norm: bool = True
    norm_pix_loss: bool = True
    mask_ratio: float = 0.75
    # Train the residual encoder (alpha = 1) with the learning rates that make it the decayed one (decay_scales).
    decay_as_lr: bool = False

    def __post_init__(self):
        if self.depth < 1:
            raise ValueError(f"depth {self.depth}: the encoder needs at least one block")
        encoder_alphas(self.depth, self.alpha_schedule, self.alpha_min)  # raises on a bad schedule, alpha_min, formula
        if self.img_size % self.patch_size:
            raise ValueError(f"image size {self.img_size} is not divisible by patch size {self.patch_size}")
        n = (self.img_size // self.patch_size) ** 2
        if not 0 < int(n * self.mask_ratio) < n:  # the loss is a mean over hidden patches; the encoder needs one visible
            raise ValueError(f"mask ratio {self.mask_ratio} hides {int(n * self.mask_ratio)} of {n} patches: "
                             "it must hide at least one and leave at least one")
        if self.decay_as_lr and not self.encoder_norm:
            raise ValueError("decay as a learning rate needs the final encoder norm: without it the output keeps the stream's scale")
        for width, heads in ((self.width, self.heads), (self.decoder_width, self.decoder_heads)):
            if width % heads or width % 4:
                raise ValueError(f"width {width} must be divisible by 4 and by its {heads} heads")


PRESETS = {
    "vit_b16": dict(),  # the paper: ViT-B/16 at 224 px, decoder 512 x 8
    "vit_s16": dict(width=384, heads=6, decoder_width=256, decoder_depth=4, decoder_heads=8),
    "vit_t16": dict(width=192, heads=3, decoder_width=128, decoder_depth=4, decoder_heads=4),
    # 32 px images, patch 4 (64 patches), still 12 blocks deep so that the depth schedule means something
    "vit_t4_32": dict(img_size=32, patch_size=4, width=192, heads=3, decoder_width=128, decoder_depth=4,
                      decoder_heads=4),
    "vit_m4_32": dict(img_size=32, patch_size=4, width=128, heads=4, decoder_width=64, decoder_depth=2,
                      decoder_heads=4),
    "vit_p4_32": dict(img_size=32, patch_size=4, width=64, heads=2, decoder_width=32, decoder_depth=1,
                      decoder_heads=2),  # for smoke tests
}


def preset(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return MAEConfig(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------- public ViT weights

def from_timm(state, heads=None):
    """An MAE around a timm-layout ViT encoder state_dict (e.g. mae_pretrain_vit_base.pth); decoder left at init."""
    state = state if isinstance(state, dict) else {}  # e.g. {"model": 5}: refused below as no ViT either
    enc = {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}
    if "patch_embed.proj.weight" not in enc:
        raise ValueError("not a checkpoint of pretrain.py nor a ViT state_dict (no 'config' or 'patch_embed.proj.weight')")
    conv = enc.pop("patch_embed.proj.weight")  # [d, c, p, p]
    width, in_chans, p = conv.shape[0], conv.shape[1], conv.shape[2]
    pos = enc.pop("pos_embed", None)
    grid = math.isqrt(pos.shape[1] - 1) if pos is not None else 224 // p
    depth = len({k.split(".")[1] for k in enc if k.startswith("blocks.")})
    cfg = MAEConfig(img_size=grid * p, patch_size=p, in_chans=in_chans, width=width, depth=depth,
                    heads=heads or {1280: 16}.get(width, width // 64),  # 64 channels a head; ViT-H: 80
                    mlp_ratio=enc["blocks.0.mlp.fc1.weight"].shape[0] / width,
                    alpha_schedule="none", decoder_skips=False, encoder_norm="norm.weight" in enc)
    enc["patch_embed.weight"] = rearrange(conv, "d c p1 p2 -> d (p1 p2 c)")
    enc["patch_embed.bias"] = enc.pop("patch_embed.proj.bias")
    model = MAE(cfg)
    if pos is not None and not torch.allclose(pos.float(), model.encoder.pos_embed, atol=1e-4):
        raise ValueError("the ViT's positional embeddings are learned, not MAE's fixed sin-cos ones; not supported")
    missing, unexpected = model.encoder.load_state_dict(enc, strict=False)
    if missing or unexpected:
        raise ValueError(f"ViT state_dict does not fit: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    return model

