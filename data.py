"""Datasets for MAE pretraining and probing, each item (float image normalised with MEAN_STD, int label): the
embedded "glyphs" set (drawn by glyphs.py) and torchvision datasets, both held in memory as uint8 tensors, and
ImageFolder roots with train/ and val/.

ImageFolder files and folders whose names start with "." (macOS's ._x.jpg, .ipynb_checkpoints) are not data, and
symbolic links are followed to each real folder once per class (walk_once).
Unreadable files (and those over Pillow's decompression-bomb limit) are skipped lazily: the next readable item
is served instead (within a Sample, the sample's next one), and a running count of the files found unreadable
(shared by the DataLoader's workers) is printed at 1, 10, 100, ..., so a large folder is never pre-scanned.
16-bit and float images are scaled to 8 bits (PIL's convert("RGB") would clip them).
"""
import contextlib
import functools
import os
import sys

try:
    import fcntl
except ImportError:  # Windows: downloads go unlocked
    fcntl = None

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
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
        self.transform, self.classes = transform, list(classes)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index].expand(3, -1, -1)), int(self.labels[index])


def load_rgb(path):
    """An image file as 8-bit RGB. PIL's convert("RGB") clips wider values, so first: 16-bit images (I;16, and I
    holding values over 255, as older Pillow opens 16-bit PNGs) are divided by 257 (65535 -> 255), and float
    images within 0..1 are multiplied by 255; I or F images of 8-bit values are kept as they are."""
    with open(path, "rb") as f:
        image = Image.open(f)
        if image.mode.startswith("I") or image.mode == "F":
            values = np.asarray(image, dtype=np.float64)
            wide = image.mode.startswith("I;16") or (image.mode == "I" and values.max() > 255)
            scale = 1 / 257 if wide else 255 if image.mode == "F" and values.max() <= 1 else 1
            image = Image.fromarray((values * scale).round().clip(0, 255).astype(np.uint8))
        return image.convert("RGB")


def visible_image(root, path):
    """An image file with no part of its path below root starting with "." (._x.jpg, .ipynb_checkpoints/)."""
    hidden = any(part.startswith(".") for part in os.path.relpath(path, root).split(os.sep))
    return not hidden and has_file_allowed_extension(path, IMG_EXTENSIONS)


def class_folders(path):
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def walk_once(top):
    """os.walk(top, followlinks=True) as [(folder, file names)], entering each real folder once and no hidden one
    (visible_image refuses their files anyway). A folder that a symbolic link leads to is not entered when it was
    entered already, when the walk reaches it without the link (inside top, on a visible path), or when it holds
    top: such a link would loop (40 levels deep, or forever with two of them) and give top's class its siblings'
    images. Also returns the folders not entered for these reasons."""
    top_real = os.path.realpath(top)
    seen, folders, skipped = {top_real}, [], []
    for root, dirs, files in os.walk(top, followlinks=True):
        keep = []
        for name in sorted(dirs):  # sorted: which of two routes to one folder is kept must not depend on the disk
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            real = os.path.realpath(path)
            below = os.path.relpath(real, top_real).split(os.sep)
            reached_anyway = real.startswith(top_real + os.sep) and not any(part.startswith(".") for part in below)
            holds_top = top_real.startswith(real + os.sep)
            if real in seen or (os.path.islink(path) and (reached_anyway or holds_top)):
                skipped.append(path)
            else:
                seen.add(real)
                keep.append(name)
        dirs[:] = keep
        folders.append((root, files))
    return folders, skipped


class SkippingImageFolder(torchvision.datasets.ImageFolder):
    """An ImageFolder that serves the next readable image in place of one that fails to decode, and lists each
    real folder once per class however many symbolic links lead to it (walk_once)."""

    def __init__(self, root, transform):
        visible = functools.partial(visible_image, os.path.expanduser(root))
        super().__init__(root, transform=transform, loader=load_rgb, is_valid_file=visible)
        # which files were found unreadable, in shared memory: DataLoader workers (new ones each epoch) see each
        # other's finds, so each file is decoded in vain and reported once per run, not once per worker and epoch
        self.bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def find_classes(self, directory):
        classes = class_folders(directory)
        if not classes:
            raise FileNotFoundError(f"no class folder in {directory}")
        return classes, {name: i for i, name in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """torchvision's make_dataset (the same list for a folder without repeated links) over walk_once."""
        samples, skipped = [], []
        for name in sorted(class_to_idx):
            folders, skips = walk_once(os.path.join(directory, name))
            skipped += skips
            found = [os.path.join(root, f) for root, files in sorted(folders) for f in sorted(files)]
            mine = [(path, class_to_idx[name]) for path in found if is_valid_file(path)]
            if not mine and not allow_empty:
                raise FileNotFoundError(f"no image file in the class folder {name!r}")
            samples += mine
        if skipped:
            print(f"warning: {len(skipped)} folder(s) under {directory} reached through symbolic links were listed "
                  f"already, lie inside their class folder or hold it; not entered, e.g. {skipped[0]}", file=sys.stderr)
        return samples

    def __getitem__(self, index):
        return self.first_readable((index + offset) % len(self) for offset in range(len(self)))

    def first_readable(self, indices, sample=""):
        """The item of the first of indices whose file decodes; the ones that fail are marked and counted."""
        found_bad = []
        for i in indices:
            if self.bad[i]:
                continue
            try:
                item = super().__getitem__(i)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # PIL's: broken, huge
                found_bad.append((i, error))
                continue
            for unreadable, error in found_bad:  # counted once a readable one is found: a folder of none gets the error
                self.bad[unreadable] = True
                if (n_bad := int(self.bad.sum())) == 10 ** (len(str(n_bad)) - 1):  # report at 1, 10, 100, ... files
                    print(f"warning: skipped {n_bad} unreadable image(s), latest {self.samples[unreadable][0]}: "
                          f"{error}", file=sys.stderr)
            return item
        raise DataError(f"no image {sample}under {self.root!r} can be decoded: replace the files in the data folder")


class Sample(torch.utils.data.Dataset):
    """The items `indices` of a dataset (a Subset). Of a folder, an unreadable file is replaced by the next readable
    one of the sample, not of the whole folder, which could be in another sample (the probe's train next to its val)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        if not isinstance(self.dataset, SkippingImageFolder):
            return self.dataset[self.indices[k]]
        n = len(self.indices)
        if not -n <= k < n:  # as a list does: the IndexError ends a for loop over the sample
            raise IndexError(k)
        return self.dataset.first_readable((self.indices[(k + j) % n] for j in range(n)), f"of a sample of {n} ")


MAX_ASPECT = 16


def cap_aspect(image):
    """An image cut to MAX_ASPECT : 1 about its centre (one pixel more where that makes the cut even, so that the
    centre stays) when it is longer. Evaluation resizes the short side to 256 and keeps the middle 224 x 224: from
    a 40,000 x 1 banner Resize alone makes 10,240,000 x 256 pixels (43 s and 11 GB in one loader worker); cut to
    16 x 1 first, the middle comes out of 4,096 x 256, the same up to how the two resizes round (results/README)."""
    height, width = v2.functional.get_size(image)
    short, long = min(height, width), max(height, width)
    if long <= MAX_ASPECT * short:
        return image
    kept = MAX_ASPECT * short + (long - MAX_ASPECT * short) % 2  # an even cut keeps the centre where it was
    return v2.functional.center_crop(image, [min(height, kept), min(width, kept)])


def _transform(stats, img_size, train_aug, native_size=None):
    """native_size None means variable-size PIL images from a folder (ImageNet-style evaluation)."""
    bicubic = v2.InterpolationMode.BICUBIC
    if train_aug:
        crop = v2.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=bicubic)
        geometry = [crop, v2.RandomHorizontalFlip()]
    elif native_size is None:
        geometry = [cap_aspect, v2.Resize(int(img_size * 256 / 224), interpolation=bicubic), v2.CenterCrop(img_size)]
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


@contextlib.contextmanager
def one_download_at_a_time(root):
    """torchrun starts every process with --download: the first to take the lock downloads and extracts, the others
    wait and then find the files complete (torchvision checks them), instead of writing the same files at once."""
    try:
        os.makedirs(root, exist_ok=True)
        lock = open(os.path.join(root, ".download.lock"), "a")
    except OSError:  # a root this user cannot write: complete already, or torchvision says what is wrong
        yield
        return
    with lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield


def missing_folder(name):
    """A --data value naming an image folder that is not there (a named set is never missing)."""
    return name not in DATASETS and not os.path.isdir(name)


def _checked_folder(data):
    """The ImageFolder root `data` after checking it has non-empty train/ and val/."""
    if os.sep not in data and not os.path.exists(data):
        raise DataError(f"unknown dataset {data!r}: use one of {', '.join(DATASETS)}, "
                        "or a path to an ImageFolder root with train/ and val/")
    try:
        for part in (os.path.join(data, "train"), os.path.join(data, "val")):
            if not os.path.isdir(part) or not os.listdir(part):
                raise DataError(f"missing or empty data folder {part!r}: an ImageFolder root needs "
                                "train/ and val/, each with one folder of images per class")
        train, val = (class_folders(os.path.join(data, p)) for p in ("train", "val"))
    except OSError as error:  # e.g. a folder this user may not read
        raise DataError(f"cannot read the data folder {error.filename!r}: {error.strerror}") from None
    if train != val:  # else labels would silently mean other classes in val/
        raise DataError(f"{data}: train/ and val/ need the same class folders; in one only: {sorted(set(train) ^ set(val))}")
    return data


def own_stats(data):
    """The MEAN_STD key a data set is normalised with: its own; "imagenet" for an image folder, and for None (public
    weights, whose data is not recorded)."""
    return data if data in MEAN_STD else "imagenet"


def get_dataset(data, split, img_size, train_aug, download=False, root="./data", stats=None):
    """Items are (float [3, img_size, img_size] normalised with MEAN_STD[stats], int label). stats: the data set's
    own by default, "imagenet" for an image folder; a probe of pretrained weights passes what they trained with."""
    if split not in ("pretrain", "train", "test"):
        raise DataError(f"unknown split {split!r}: use pretrain, train or test")
    if data == EMBEDDED:
        images, labels = make_glyphs("test" if split == "test" else "train")
        images, classes = torch.from_numpy(images)[:, None], list(GLYPHS)
    elif data in DATASETS:
        try:
            with one_download_at_a_time(root) if download else contextlib.nullcontext():
                images, labels, classes = _torchvision_arrays(data, split, download, root)
        except RuntimeError:  # torchvision's "Dataset not found or corrupted"
            raise DataError(f"{data} is missing or incomplete under {root!r}: "
                            f"rerun with --download, or put it under {root}") from None
        except OSError as e:  # --download without a network (URLError), a root that cannot be written or read
            why = getattr(e, "reason", None) or e.strerror or e
            raise DataError(f"could not {'download' if download else 'read'} {data} {'to' if download else 'from'} "
                            f"{root!r}: {why}") from None
    else:
        folder = os.path.join(_checked_folder(data), "val" if split == "test" else "train")
        try:
            return SkippingImageFolder(folder, transform=_transform(stats or own_stats(data), img_size, train_aug))
        except (FileNotFoundError, RuntimeError) as error:
            raise DataError(f"missing or empty data folder {folder!r} ({error})") from None
    return TensorImages(images, labels, _transform(stats or own_stats(data), img_size, train_aug, NATIVE_SIZE[data]),
                        classes)

