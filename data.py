"""Datasets for MAE pretraining and probing: the embedded procedural "shapes" set, torchvision
datasets held in memory as uint8 tensors, and ImageFolder roots with train/ and val/.

Unreadable ImageFolder files are skipped lazily (the next readable item is served instead and a
running count is printed at 1, 10, 100, ... skips), so a large folder is never pre-scanned.
"""
import functools
import os
import sys
import time

import numpy as np
import torch
import torchvision
from torchvision.transforms import v2

class DataError(Exception):
    """A problem with the requested data, worded for the person running the script."""

EMBEDDED = "shapes"
DATASETS = ("shapes", "cifar10", "cifar100", "stl10", "mnist", "fashion-mnist")
MEAN_STD = {
    "shapes": ((0.4786, 0.4788, 0.4776), (0.2338, 0.2333, 0.2339)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "mnist": ((0.1307,) * 3, (0.3081,) * 3),
    "fashion-mnist": ((0.2860,) * 3, (0.3530,) * 3),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NATIVE_SIZE = {"shapes": 32, "cifar10": 32, "cifar100": 32, "stl10": 96, "mnist": 28, "fashion-mnist": 28}
SHAPE_NAMES = ("disc", "ring", "triangle", "square", "frame", "plus", "star", "crescent", "heart", "T")
# Nuisance knobs: a linear probe on raw pixels gets 11% (chance 10%), a small 4-conv CNN 91% in 3 epochs.
BRIGHTER_SHARE, LOW_CONTRAST_SHARE, COPIES, COPY_SCALE = 0.95, 0.15, 4, (0.28, 0.42)
SHAPES_VERSION = 4  # part of the disk-cache name: bump whenever the generator's output changes

# ---- "shapes": signed distance functions in shape-local units (outer radius about 1) ----

def _box(u, v, half_w, half_h, cu=0.0, cv=0.0):
    du, dv = np.abs(u - cu) - half_w, np.abs(v - cv) - half_h
    return np.hypot(np.maximum(du, 0), np.maximum(dv, 0)) + np.minimum(np.maximum(du, dv), 0)

def _triangle(u, v, radius=1.0):
    wedge = 2 * np.pi / 3  # distance to the edge facing each third of the plane
    angle = np.mod(np.arctan2(v, u), wedge) - wedge / 2
    return np.hypot(u, v) * np.cos(angle) - radius * np.cos(wedge / 2)

def _star(u, v, inner=0.45, half=np.pi / 5):
    """Five points: fold the plane onto one half-spike, tip at (1, 0) and notch at angle `half`."""
    angle = np.abs(np.mod(np.arctan2(v, u) + half, 2 * half) - half)
    r = np.hypot(u, v)
    edge_u, edge_v = inner * np.cos(half) - 1, inner * np.sin(half)
    return (edge_v * (r * np.cos(angle) - 1) - edge_u * r * np.sin(angle)) / np.hypot(edge_u, edge_v)

def _heart(u, v, half=0.55):
    """A diamond with discs on its two upper sides, built in axes rotated by 45 degrees."""
    a, b = (u + v) / np.sqrt(2), (v - u) / np.sqrt(2)
    lobes = np.minimum(np.hypot(a - half, b), np.hypot(a, b - half)) - half
    return np.minimum(_box(a, b, half, half), lobes)

SHAPE_SDF = (
    lambda u, v: np.hypot(u, v) - 0.85,
    lambda u, v: np.abs(np.hypot(u, v) - 0.68) - 0.2,
    _triangle,
    lambda u, v: _box(u, v, 0.7, 0.7),
    lambda u, v: np.abs(_box(u, v, 0.62, 0.62)) - 0.16,
    lambda u, v: np.minimum(_box(u, v, 0.85, 0.25), _box(u, v, 0.25, 0.85)),
    _star,
    lambda u, v: np.maximum(np.hypot(u + 0.2, v) - 0.85, 0.75 - np.hypot(u - 0.25, v)),
    lambda u, v: _heart(u, v - 0.08),
    lambda u, v: np.minimum(_box(u, v, 0.85, 0.25, 0, 0.6), _box(u, v, 0.25, 0.85, 0, -0.1)),
)

SIZE = 32
_PIXEL = (np.arange(SIZE, dtype=np.float32) + 0.5) / (SIZE / 2) - 1  # pixel centres in [-1, 1]
X, Y = _PIXEL[None, None, :], _PIXEL[None, :, None]

def _uniform(rng, n, low, high, *shape):
    return rng.uniform(low, high, (n, *shape)).astype(np.float32)

def _coverage(sdf_pixels):
    return np.clip(0.5 - sdf_pixels, 0, 1)[..., None]  # anti-aliased edge about one pixel wide

def _smooth_noise(rng, n, cells):
    pos = np.linspace(0, cells - 1, SIZE)
    lo = np.minimum(pos.astype(int), cells - 2)
    interp = np.zeros((SIZE, cells), np.float32)  # bilinear upsampling as a matrix
    interp[np.arange(SIZE), lo], interp[np.arange(SIZE), lo + 1] = 1 - (pos - lo), pos - lo
    # einsum, not matmul: multithreaded BLAS sums in varying order and breaks run-to-run identity
    return np.einsum("yi,nij,xj->nyx", interp, _uniform(rng, n, 0, 1, cells, cells), interp)

def _background(rng, n, first):
    """Blend of `first` and a random colour by stripes, a gradient, smooth noise or flat 50/50."""
    angle, phase = _uniform(rng, n, 0, 2 * np.pi, 1, 1), _uniform(rng, n, 0, 2 * np.pi, 1, 1)
    along = X * np.cos(angle) + Y * np.sin(angle)
    stripes = 0.5 + 0.5 * np.sin(along * np.pi * _uniform(rng, n, 1, 7, 1, 1) + phase)
    gradient = np.clip(0.5 + along * _uniform(rng, n, 0.2, 0.7, 1, 1), 0, 1)
    noise = _smooth_noise(rng, n, int(rng.integers(3, 9)))
    kind = rng.integers(0, 4, n)[:, None, None]
    pattern = np.select([kind == 0, kind == 1, kind == 2], [stripes, gradient, noise], 0.5)
    return first + (_uniform(rng, n, 0, 1, 1, 1, 3) - first) * pattern[..., None]

def _colours(rng, n):
    """Foreground and background colours [n, 1, 1, 3], sometimes of low contrast."""
    background, foreground = _uniform(rng, n, 0, 1, 3), _uniform(rng, n, 0, 1, 3)
    offset = foreground - background
    distance = np.linalg.norm(offset, axis=1, keepdims=True) + 1e-6
    low_contrast = rng.random((n, 1)) < LOW_CONTRAST_SHARE
    target = np.where(low_contrast, _uniform(rng, n, 0.2, 0.35, 1), np.maximum(distance, 0.35))
    foreground = np.clip(background + offset / distance * target, 0, 1)
    # with symmetric colours all classes share one mean image; bright-on-dark gives pixels a weak cue
    swap = (foreground.mean(1) > background.mean(1)) != (rng.random(n) < BRIGHTER_SHARE)
    foreground[swap], background[swap] = background[swap], foreground[swap]
    return foreground[:, None, None], background[:, None, None]

def _paint_clutter(rng, image, slots, share):
    """Each slot paints, with probability `share`, a blob or a thin segment of a random colour."""
    n = len(image)
    for _ in range(slots):
        active = (rng.random(n) < share)[:, None, None, None]
        cx, cy = _uniform(rng, n, -1, 1, 1, 1), _uniform(rng, n, -1, 1, 1, 1)
        angle, length = _uniform(rng, n, 0, np.pi, 1, 1), _uniform(rng, n, 0.0, 0.45, 1, 1)
        along = np.clip((X - cx) * np.cos(angle) + (Y - cy) * np.sin(angle), -length, length)
        dist = np.hypot(X - cx - along * np.cos(angle), Y - cy - along * np.sin(angle))
        blob_radius, line_radius = _uniform(rng, n, 0.08, 0.22, 1, 1), _uniform(rng, n, 0.04, 0.09, 1, 1)
        radius = np.where(length < 0.15, blob_radius, line_radius)
        alpha = _coverage((dist - radius) * SIZE / 2) * active
        image += (_uniform(rng, n, 0, 1, 1, 1, 3) - image) * alpha
    return image

def _render_class(rng, label, n):
    """2 to 4 small copies of one shape, each at its own place, size and angle: the class is which shape,
    a property every patch near a copy carries, while where the copies fall changes every pixel."""
    colour, background = _colours(rng, n)
    image = _paint_clutter(rng, _background(rng, n, background), 2, 0.5)
    copies = rng.integers(2, COPIES + 1, n)
    for k in range(COPIES):
        scale = _uniform(rng, n, *COPY_SCALE, 1, 1)  # outer radius as a fraction of half the image
        cx, cy = (_uniform(rng, n, -1, 1, 1, 1) * (1 - scale) for _ in range(2))
        angle = _uniform(rng, n, 0, 2 * np.pi, 1, 1)
        dx, dy = (X - cx) / scale, (Y - cy) / scale
        u, v = dx * np.cos(angle) + dy * np.sin(angle), dy * np.cos(angle) - dx * np.sin(angle)
        shown = (k < copies)[:, None, None, None]
        image += (colour - image) * _coverage(SHAPE_SDF[label](u, v) * scale * SIZE / 2) * shown
    image += _uniform(rng, n, 0, 0.05, 1, 1, 1) * rng.standard_normal(image.shape, np.float32)
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)

def _generate_shapes(split, seed):
    rng = np.random.default_rng(np.random.SeedSequence([seed, ("train", "test").index(split)]))
    per_class = {"train": 50_000, "test": 10_000}[split] // len(SHAPE_NAMES)
    images = np.concatenate([_render_class(rng, label, per_class) for label in range(len(SHAPE_NAMES))])
    labels = np.repeat(np.arange(len(SHAPE_NAMES), dtype=np.int64), per_class)
    order = rng.permutation(len(labels))
    return images[order], labels[order]

@functools.lru_cache(maxsize=4)
def make_shapes(split, seed=0):
    """uint8 images [N, 32, 32, 3] and int64 labels [N] of the "train" or "test" split."""
    if split not in ("train", "test"):
        raise DataError(f"shapes has splits 'train' and 'test', not {split!r}")
    cache = os.path.expanduser(f"~/.cache/decayed-mae/shapes-v{SHAPES_VERSION}-{split}-{seed}.npz")
    try:
        with np.load(cache) as saved:
            return saved["images"], saved["labels"]
    except (OSError, KeyError, ValueError):
        pass
    images, labels = _generate_shapes(split, seed)
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
        images, labels = make_shapes("test" if split == "test" else "train")
        images, classes = torch.from_numpy(images).permute(0, 3, 1, 2), SHAPE_NAMES
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

if __name__ == "__main__":  # python data.py [preview.png]: time the generator and save 8 images per class
    for split in ("train", "test"):
        start = time.time()
        images, labels = _generate_shapes(split, 0)
        print(f"shapes {split}: {images.shape} in {time.time() - start:.1f}s, "
              f"per class {np.bincount(labels).tolist()}")
    out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/shapes_preview.png"
    rows = np.concatenate([images[labels == label][:8] for label in range(len(SHAPE_NAMES))])
    torchvision.utils.save_image(torch.from_numpy(rows).permute(0, 3, 1, 2) / 255.0, out, nrow=8)
    print(f"rows are {', '.join(SHAPE_NAMES)} -> {out}")
