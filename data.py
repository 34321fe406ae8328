"""Datasets for MAE pretraining and probing: the embedded "glyphs" set, torchvision datasets held in memory as
uint8 tensors, and ImageFolder roots with train/ and val/.

"glyphs": one capital letter per 32 x 32 grey image, drawn from the font Pillow carries inside it, under the
nuisances of a small natural set (place, size, rotation, shear, stroke width, elastic warp, textured object and
background, pixel noise). Generated from a seed in seconds, the same bytes on every run, and cached on disk.

Unreadable ImageFolder files are skipped lazily (the next readable item is served instead and a
running count is printed at 1, 10, 100, ... skips), so a large folder is never pre-scanned.
"""
import functools
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms import v2

class DataError(Exception):
    """A problem with the requested data, worded for the person running the script."""

EMBEDDED = "glyphs"
DATASETS = ("glyphs", "cifar10", "cifar100", "stl10", "mnist", "fashion-mnist")
MEAN_STD = {
    "glyphs": ((0.2030,) * 3, (0.2546,) * 3),  # measured on its train split
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "mnist": ((0.1307,) * 3, (0.3081,) * 3),
    "fashion-mnist": ((0.2860,) * 3, (0.3530,) * 3),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NATIVE_SIZE = {"glyphs": 32, "cifar10": 32, "cifar100": 32, "stl10": 96, "mnist": 28, "fashion-mnist": 28}
GLYPHS = "AEFGHKMRSX"  # no two alike under the allowed rotations or a mirror flip
GLYPHS_VERSION = 1  # part of the disk-cache name: bump whenever the generator's output changes
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


def _generate_glyphs(split, seed, count=None):
    """uint8 images [count, 32, 32] and int64 labels, count (default: the split's size) a multiple of the classes.

    Every draw comes from one generator seeded by (seed, split), so the same arguments give the same bytes.
    """
    gen = torch.Generator().manual_seed(seed * 2 + ("train", "test").index(split))
    count = SPLIT_SIZES[split] if count is None else count
    labels = (torch.arange(count) % len(GLYPHS))[torch.randperm(count, generator=gen)]  # balanced classes
    masks = _glyph_masks()
    images = torch.cat([_render(gen, part, masks) for part in labels.split(CHUNK)])
    return images.numpy(), labels.numpy()


@functools.lru_cache(maxsize=4)
def make_glyphs(split, seed=0):
    """uint8 images [N, 32, 32] and int64 labels [N] of the "train" or "test" split, cached on disk."""
    if split not in ("train", "test"):
        raise DataError(f"glyphs has splits 'train' and 'test', not {split!r}")
    cache = os.path.expanduser(f"~/.cache/decayed-mae/glyphs-v{GLYPHS_VERSION}-{split}-{seed}.npz")
    try:
        with np.load(cache) as saved:
            return saved["images"], saved["labels"]
    except (OSError, KeyError, ValueError):
        pass
    images, labels = _generate_glyphs(split, seed)
    try:  # a cache that cannot be written only costs time on the next run
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        partial = f"{cache}.{os.getpid()}.tmp"  # renamed only when complete, so readers never see half a file
        with open(partial, "wb") as file:
            np.savez(file, images=images, labels=labels)
        os.replace(partial, cache)
    except OSError:
        pass
    return images, labels

# ---- datasets ----

class TensorImages(torch.utils.data.Dataset):
    """uint8 images [N, C, H, W] (C is 1 or 3) and labels; the transform runs per item."""

    def __init__(self, images, labels, transform, classes):
        self.images, self.labels = images, torch.as_tensor(labels, dtype=torch.int64)
        self.transform = transform
        self.classes, self.num_classes = list(classes), len(classes)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index].expand(3, -1, -1)), int(self.labels[index])

class SkippingImageFolder(torchvision.datasets.ImageFolder):
    """An ImageFolder that serves the next readable image in place of one that fails to decode."""
    skipped = 0  # per process: each DataLoader worker keeps its own count

    def __getitem__(self, index):
        for offset in range(len(self)):
            try:
                return super().__getitem__((index + offset) % len(self))
            except (OSError, ValueError, SyntaxError) as error:  # what PIL raises for broken files
                SkippingImageFolder.skipped = count = SkippingImageFolder.skipped + 1
                if str(count).strip("0") == "1":  # report at 1, 10, 100, ... skips
                    print(f"warning: skipped {count} unreadable image(s), latest: {error}", file=sys.stderr)
        raise DataError(f"no image under {self.root!r} can be decoded: replace the files in the data folder")

def _transform(stats, img_size, train_aug, native_size=None):
    """native_size None means variable-size PIL images from a folder (ImageNet-style evaluation)."""
    bicubic = v2.InterpolationMode.BICUBIC
    if train_aug:
        crop = v2.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=bicubic)
        geometry = [crop, v2.RandomHorizontalFlip()]
    elif native_size is None:
        geometry = [v2.Resize(int(img_size * 256 / 224), interpolation=bicubic), v2.CenterCrop(img_size)]
    else:
        geometry = [v2.Resize(img_size, interpolation=bicubic)] if img_size != native_size else []
    to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(*MEAN_STD[stats])]
    return v2.Compose(geometry + to_float)

def _torchvision_arrays(name, split, download, root):
    """uint8 images [N, C, H, W], labels and class names of a torchvision dataset."""
    sets, train = torchvision.datasets, split != "test"
    if name == "stl10":
        ds = sets.STL10(root, split={"pretrain": "train+unlabeled"}.get(split, split), download=download)
        return torch.from_numpy(ds.data), ds.labels, ds.classes  # unlabeled images have label -1
    if name in ("cifar10", "cifar100"):
        ds = (sets.CIFAR10 if name == "cifar10" else sets.CIFAR100)(root, train=train, download=download)
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2), ds.targets, ds.classes
    ds = (sets.MNIST if name == "mnist" else sets.FashionMNIST)(root, train=train, download=download)
    return ds.data[:, None], ds.targets, ds.classes

def _checked_folder(data):
    """The ImageFolder root `data` after checking it has non-empty train/ and val/."""
    if os.sep not in data and not os.path.exists(data):
        raise DataError(f"unknown dataset {data!r}: use one of {', '.join(DATASETS)}, "
                        "or a path to an ImageFolder root with train/ and val/")
    for part in (os.path.join(data, "train"), os.path.join(data, "val")):
        if not os.path.isdir(part) or not os.listdir(part):
            raise DataError(f"missing or empty data folder {part!r}: an ImageFolder root needs "
                            "train/ and val/, each with one folder of images per class")
    return data

def get_dataset(data, split, img_size, train_aug, download=False, root="./data"):
    """Items are (float [3, img_size, img_size] normalised with MEAN_STD, int label)."""
    if split not in ("pretrain", "train", "test"):
        raise DataError(f"unknown split {split!r}: use pretrain, train or test")
    if data == EMBEDDED:
        images, labels = make_glyphs("test" if split == "test" else "train")
        images, classes = torch.from_numpy(images)[:, None], list(GLYPHS)
    elif data in DATASETS:
        try:
            images, labels, classes = _torchvision_arrays(data, split, download, root)
        except RuntimeError:  # torchvision's "Dataset not found or corrupted"
            raise DataError(f"{data} is missing or incomplete under {root!r}: "
                            f"rerun with --download, or put it under {root}") from None
    else:
        folder = os.path.join(_checked_folder(data), "val" if split == "test" else "train")
        try:
            dataset = SkippingImageFolder(folder, transform=_transform("imagenet", img_size, train_aug))
        except (FileNotFoundError, RuntimeError) as error:
            raise DataError(f"missing or empty data folder {folder!r} ({error})") from None
        dataset.num_classes = len(dataset.classes)
        return dataset
    return TensorImages(images, labels, _transform(data, img_size, train_aug, NATIVE_SIZE[data]), classes)

def num_classes(data):
    if data in DATASETS:
        return 100 if data == "cifar100" else 10
    train = os.path.join(_checked_folder(data), "train")
    return sum(os.path.isdir(os.path.join(train, entry)) for entry in os.listdir(train))

if __name__ == "__main__":  # python data.py [preview.png]: time the generator, save 16 images per class
    for split in ("train", "test"):
        start = time.time()
        images, labels = _generate_glyphs(split, 0)
        print(f"glyphs {split}: {images.shape} in {time.time() - start:.1f}s, "
              f"per class {np.bincount(labels).tolist()}")
    out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/glyphs_preview.png"
    rows = torch.from_numpy(np.concatenate([images[labels == label][:16] for label in range(len(GLYPHS))]))
    grid = torchvision.utils.make_grid(rows[:, None] / 255.0, nrow=16, padding=1, pad_value=1.0)
    torchvision.utils.save_image(F.interpolate(grid[None], scale_factor=2, mode="nearest"), out)
    print(f"rows are {', '.join(GLYPHS)} -> {out}")
