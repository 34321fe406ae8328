"""The embedded dataset "glyphs": one capital letter per 32 x 32 grey image, drawn from the font Pillow carries
inside it, under the nuisances of a small natural set (place, size, rotation, shear, stroke width, elastic warp,
textured object and background, pixel noise). Generated from a seed in seconds, the same bytes on every run, and
cached on disk. data.py serves it like any other dataset; this file is only how it is drawn (as nanoGPT keeps a
dataset's preparation apart from training).

    python glyphs.py results/glyphs/preview.png    # time the generator, save 16 images per class
"""
import functools
import hashlib
import math
import os
import time
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import PIL
from PIL import Image, ImageDraw, ImageFont

GLYPHS = "AEFGHKMRSX"  # no two alike under the allowed rotations or a mirror flip
SIZE, CANVAS = 32, 64  # output side; side of the high-resolution glyph masks and of the render before 2x2 pooling
# Nuisance knobs (ranges of uniform draws unless said otherwise), frozen in issue 12 on the `none` arm alone;
# results/README.md has the variants tried. Wider background, contrast and ink ranges swamp the letter.
ROTATION = 20.0  # degrees either way
SCALE = (0.6, 0.85)  # cap height as a fraction of the image side
CAP = 67  # cap height of Aileron at size 96, in pixels of the 128-px rendering
ASPECT, SHEAR = 0.15, 0.15  # log-aspect and shear either way
ELASTIC = 0.05, 4  # displacement (fraction of half the canvas) and cells of its smooth random field
STROKES = (-1, 0, 1, 2)  # pixels of erosion (<0) or dilation (>0) of the 128-px rendering
BACKGROUND = (0.0, 0.15)  # grey level of the background before texture
CONTRAST = (0.6, 0.85)  # |object - background| before texture
LIGHT_ON_DARK = 1.0  # share of images with a lighter object than background (mixed polarity stalled the MAE)
TEXTURE, TEXTURE_CELLS = (0.0, 0.02), (3, 8)  # smooth-noise amplitudes and grid cells; letter and ground apart
NOISE = (0.0, 0.01)  # standard deviation of per-pixel Gaussian noise
SPLIT_SIZES = {"train": 50_000, "test": 10_000}
CHUNK = 2000  # images rendered at once (it sets the order of the random draws, so it is part of the data)


def _glyph_masks():
    """float [len(GLYPHS) * len(STROKES), 1, CANVAS, CANVAS]: each glyph's cap box centred, every stroke width."""
    font, hi = ImageFont.load_default(size=96), 2 * CANVAS  # FreeType's Aileron, embedded in Pillow
    masks = []
    for ch in GLYPHS:
        image = Image.new("L", (2 * hi, 2 * hi))
        ImageDraw.Draw(image).text((hi, hi), ch, fill=255, font=font, anchor="mm")
        box = np.argwhere(np.asarray(image) > 127)  # threshold: FreeType versions differ only at the edge
        (top, left), (bottom, right) = box.min(0), box.max(0) + 1
        centre = (top + bottom) // 2, (left + right) // 2
        mask = np.asarray(image)[centre[0] - hi // 2:centre[0] + hi // 2, centre[1] - hi // 2:centre[1] + hi // 2]
        masks.append(torch.from_numpy((mask > 127).astype(np.float32)))
    masks = torch.stack(masks)[:, None]  # [glyphs, 1, 128, 128]
    strokes = [F.max_pool2d(masks, 2 * abs(s) + 1, 1, abs(s)) if s > 0 else
               -F.max_pool2d(-masks, 2 * abs(s) + 1, 1, abs(s)) if s < 0 else masks for s in STROKES]
    return F.avg_pool2d(torch.stack(strokes, 1).flatten(0, 1), 2)  # [glyphs * strokes, 1, 64, 64]


def _uniform(gen, n, low, high, *shape):
    return torch.rand(n, *shape, generator=gen) * (high - low) + low


@functools.lru_cache(maxsize=None)
def _upsampling(cells, size):
    """Bicubic upsampling from cells to size points as a matrix [size, cells] (interpolate applied to unit vectors)."""
    units = torch.eye(cells)[:, None, :, None]
    return F.interpolate(units, (size, 1), mode="bicubic", align_corners=True)[:, 0, :, 0].T.contiguous()


def _smooth(gen, n, cells, size, channels=1):
    """Smooth random fields [n, channels, size, size], about unit variance: a cells x cells grid, upsampled."""
    up = _upsampling(cells, size)
    return torch.einsum("yi,ncij,xj->ncyx", up, torch.randn(n, channels, cells, cells, generator=gen), up)


def _geometry(gen, n):
    """Sampling grids [n, CANVAS, CANVAS, 2]: an output pixel -> where it reads the glyph mask."""
    angle = _uniform(gen, n, -ROTATION, ROTATION) * math.pi / 180
    height = _uniform(gen, n, *SCALE)
    scale = height * 2 * CANVAS / CAP  # glyph units -> image units, both [-1, 1] across
    aspect, shear = _uniform(gen, n, -ASPECT, ASPECT).exp(), _uniform(gen, n, -SHEAR, SHEAR)
    cos, sin = angle.cos(), angle.sin()
    linear = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # rotation
    linear = linear @ torch.stack([torch.stack([aspect, shear], -1),
                                   torch.stack([torch.zeros(n), 1 / aspect], -1)], -2) * scale[:, None, None]
    room = (1 - 0.9 * height).clamp(min=0)  # the glyph stays (mostly) inside the frame
    shift = _uniform(gen, n, -1, 1, 2) * room[:, None]
    inverse = torch.linalg.inv(linear)  # glyph -> image is linear; the grid needs image -> glyph
    theta = torch.cat([inverse, -(inverse @ shift[..., None])], -1)
    grid = F.affine_grid(theta, (n, 1, CANVAS, CANVAS), align_corners=False)
    field = _smooth(gen, n, ELASTIC[1], CANVAS, channels=2)  # [n, 2, 64, 64] displacements along x and y
    return grid + ELASTIC[0] * field.permute(0, 2, 3, 1)


def _render(gen, labels, masks):
    """uint8 [n, SIZE, SIZE] images of the glyphs `labels` with every nuisance drawn from `gen`."""
    n = len(labels)
    stroke = torch.randint(len(STROKES), (n,), generator=gen)
    mask = F.grid_sample(masks[labels * len(STROKES) + stroke], _geometry(gen, n), align_corners=False)
    mask = F.avg_pool2d(mask, CANVAS // SIZE)  # [n, 1, 32, 32] coverage, anti-aliased
    background = _uniform(gen, n, *BACKGROUND, 1, 1, 1)
    contrast = _uniform(gen, n, *CONTRAST, 1, 1, 1)
    sign = torch.where(torch.rand(n, 1, 1, 1, generator=gen) < LIGHT_ON_DARK, 1.0, -1.0)
    room = torch.where(sign > 0, 1 - background, background)  # keep the object inside [0, 1] if it can be
    background = torch.where(room < contrast, background - sign * (contrast - room), background)
    textures = [sum(_uniform(gen, n, *TEXTURE, 1, 1, 1) * _smooth(gen, n, cells, SIZE) for cells in TEXTURE_CELLS)
                for _ in ("background", "object")]
    image = background + textures[0] + mask * (sign * contrast + textures[1] - textures[0])
    image = image + _uniform(gen, n, *NOISE, 1, 1, 1) * torch.randn(n, 1, SIZE, SIZE, generator=gen)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0]


def generate(split, seed, count=None):
    """uint8 images [count, 32, 32] and int64 labels, count (default: the split's size) a multiple of the classes.

    Every draw comes from one generator seeded by (seed, split), so the same arguments give the same bytes.
    """
    gen = torch.Generator().manual_seed(seed * 2 + ("train", "test").index(split))
    count = SPLIT_SIZES[split] if count is None else count
    labels = (torch.arange(count) % len(GLYPHS))[torch.randperm(count, generator=gen)]  # balanced classes
    masks = _glyph_masks()
    images = torch.cat([_render(gen, part, masks) for part in labels.split(CHUNK)])
    return images.numpy(), labels.numpy()


def generator_tag():
    """Part of the cache's name: this file (knobs and code), Pillow (the font) and torch (the random draws and the
    resampling), so an edit or an upgrade is never served the images of the generator before it."""
    with open(__file__, "rb") as source:
        return hashlib.sha1(source.read() + f"{PIL.__version__} {torch.__version__}".encode()).hexdigest()[:10]


@functools.lru_cache(maxsize=4)
def make_glyphs(split, seed=0):
    """uint8 images [N, 32, 32] and int64 labels [N] of the "train" or "test" split, cached on disk."""
    if split not in ("train", "test"):
        raise ValueError(f"glyphs has splits 'train' and 'test', not {split!r}")
    cache = os.path.expanduser(f"~/.cache/decayed-mae/glyphs-{generator_tag()}-{split}-{seed}.npz")
    try:
        with np.load(cache) as saved:
            return saved["images"], saved["labels"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # none yet, or a damaged one: draw again
        pass
    images, labels = generate(split, seed)
    try:  # a cache that cannot be written only costs time on the next run
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        partial = f"{cache}.{os.getpid()}.tmp"  # renamed only when complete, so readers never see half a file
        with open(partial, "wb") as file:
            np.savez(file, images=images, labels=labels)
        os.replace(partial, cache)
    except OSError:
        pass
    return images, labels


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preview", nargs="?", default="/tmp/glyphs_preview.png",
                   help="where the 16-images-per-class preview goes (.png or .jpg; default %(default)s)")
    out = p.parse_args().preview
    if os.path.splitext(out)[1].lower() not in (".png", ".jpg", ".jpeg"):
        p.error(f"the preview needs a .png or .jpg name, got {out!r}")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):  # found now, not after a minute of drawing
        p.error(f"cannot write the preview {out!r}: {folder} is not a folder this user can write")
    for split in ("train", "test"):
        start = time.time()
        images, labels = generate(split, 0)
        print(f"glyphs {split}: {images.shape} in {time.time() - start:.1f}s, "
              f"per class {np.bincount(labels).tolist()}")
    rows = torch.from_numpy(np.concatenate([images[labels == label][:16] for label in range(len(GLYPHS))]))
    grid = torchvision.utils.make_grid(rows[:, None] / 255.0, nrow=16, padding=1, pad_value=1.0)
    torchvision.utils.save_image(F.interpolate(grid[None], scale_factor=2, mode="nearest"), out)
    print(f"rows are {', '.join(GLYPHS)} -> {out}")
