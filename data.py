"""Datasets for MAE pretraining and probing, each item (float image normalised with MEAN_STD, int label): the
embedded "glyphs" set (drawn by glyphs.py) and torchvision datasets, both held in memory as uint8 tensors, and
ImageFolder roots with train/ and val/.

Unreadable ImageFolder files are skipped lazily (the next readable item is served instead and a
running count is printed at 1, 10, 100, ... skips), so a large folder is never pre-scanned.
"""
import math
import os
import sys

import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

from glyphs import GLYPHS, make_glyphs


class DataError(Exception):
    """A problem with the requested data, worded for the person running the script."""


EMBEDDED = "glyphs"
DATASETS = ("glyphs", "cifar10", "cifar100", "stl10")
MEAN_STD = {
    "glyphs": ((0.2030,) * 3, (0.2546,) * 3),  # measured on its train split
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NATIVE_SIZE = {"glyphs": 32, "cifar10": 32, "cifar100": 32, "stl10": 96}


class TensorImages(torch.utils.data.Dataset):
    """uint8 images [N, C, H, W] (C is 1 or 3) and labels; the transform runs per item."""

    def __init__(self, images, labels, transform, classes):
        self.images, self.labels = images, torch.as_tensor(labels, dtype=torch.int64)
        self.transform = transform
        self.classes = list(classes)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index].expand(3, -1, -1)), int(self.labels[index])



def random_resized_crops(gen, n, height, width, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """Boxes (top, left, h, w), float tensors [n], drawn as v2.RandomResizedCrop draws them (10 tries of area
    and log-ratio, the first that fits; else the central fallback), for n images at once."""
    u = torch.rand(2, n, 10, generator=gen, device=gen.device)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[0])
    aspect = (math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1]).exp()
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    fw, fh = min(width, round(height * ratio[1])), min(height, round(width / ratio[0]))  # fallback: clamp the ratio
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    spot = torch.rand(2, n, generator=gen, device=gen.device)  # top-left corner: uniform over the places that fit
    top = torch.where(found, (spot[0] * (height - h + 1)).floor(), (height - h) // 2)
    left = torch.where(found, (spot[1] * (width - w + 1)).floor(), (width - w) // 2)
    return top, left, h, w


def crop_and_flip(images, top, left, h, w, flip, size):
    """uint8 images [n, C, H, W] -> float [n, 3, size, size] in 0..255: each one's box resampled to size x size
    (bicubic), mirrored where flip is -1. Inside the box this is v2.functional.resized_crop."""
    height, width = images.shape[-2:]
    theta = torch.zeros(len(images), 2, 3, device=images.device)  # output [-1, 1] -> the box, in grid_sample's units
    theta[:, 0, 0], theta[:, 0, 2] = flip * w / width, (2 * left + w) / width - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / height, (2 * top + h) / height - 1
    grid = F.affine_grid(theta, (len(images), 3, size, size), align_corners=False)
    imgs = images.float().expand(-1, 3, -1, -1)
    return F.grid_sample(imgs, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp(0, 255)


class DeviceBatches:
    """The small-image fast path: the whole uint8 train set on the device; each batch is cropped (as
    v2.RandomResizedCrop), flipped, resampled, normalised and given its mask noise there. All draws come from
    a generator seeded by (seed, epoch, micro-batch) for the whole global batch, then sliced per rank, so a
    resumed run or one spread over processes sees what one uninterrupted process sees."""

    def __init__(self, dataset, mean_std, img_size, device):
        self.images, self.img_size, self.device = dataset.images.to(device), img_size, device
        self.mean, self.std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in mean_std)

    def batch(self, index, seed, epoch, micro, n_patches, rank=0, world=1):
        """index: the global micro-batch's items; returns this rank's share: (images, mask noise)."""
        gen = torch.Generator(self.device).manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + micro)
        n, (height, width) = len(index), self.images.shape[-2:]
        boxes = random_resized_crops(gen, n, height, width)
        flip = torch.where(torch.rand(n, generator=gen, device=gen.device) < 0.5, -1.0, 1.0)
        noise = torch.rand(n, n_patches, generator=gen, device=gen.device)
        mine = slice(rank * n // world, (rank + 1) * n // world)
        imgs = crop_and_flip(self.images[index[mine].to(self.device)], *(t[mine] for t in (*boxes, flip)), self.img_size)
        return (imgs / 255 - self.mean) / self.std, noise[mine]

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
    ds = (sets.CIFAR10 if name == "cifar10" else sets.CIFAR100)(root, train=train, download=download)
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2), ds.targets, ds.classes


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
            return SkippingImageFolder(folder, transform=_transform("imagenet", img_size, train_aug))
        except (FileNotFoundError, RuntimeError) as error:
            raise DataError(f"missing or empty data folder {folder!r} ({error})") from None
    return TensorImages(images, labels, _transform(data, img_size, train_aug, NATIVE_SIZE[data]), classes)

