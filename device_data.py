"""The small-image fast path (pretrain.py --device-data): the whole uint8 train set on the device, and each batch
cropped, flipped, resampled and normalised there at once, as torchvision's RandomResizedCrop + flip would do it
item by item in a DataLoader worker. For in-memory sets (data.DATASETS); ImageFolder roots keep the DataLoader.
"""
import math

import torch
import torch.nn.functional as F


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
    (bicubic), mirrored where flip is -1. Away from the box's edges this is v2.functional.resized_crop with
    antialias=False: grid_sample's bicubic (a = -0.75) without low-pass filtering; at its edges the taps read the
    pixels just outside the box (resized_crop repeats the box's edge), as a crop of a larger picture would.
    torchvision's default, which the DataLoader path uses, is antialias=True (a = -0.5, filtered when shrinking):
    a few levels of 255 apart when a box is enlarged, as on the 32 px sets at 32 px, but aliased when a box is
    shrunk (e.g. STL-10's 96 px into a 32 px preset: use --no-device-data there)."""
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
        gen = torch.Generator(self.device).manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + micro) % 2**64)
        n, (height, width) = len(index), self.images.shape[-2:]
        boxes = random_resized_crops(gen, n, height, width)
        flip = torch.where(torch.rand(n, generator=gen, device=gen.device) < 0.5, -1.0, 1.0)
        noise = torch.rand(n, n_patches, generator=gen, device=gen.device)
        mine = slice(rank * n // world, (rank + 1) * n // world)
        imgs = crop_and_flip(self.images[index[mine].to(self.device)], *(t[mine] for t in (*boxes, flip)), self.img_size)
        return (imgs / 255 - self.mean) / self.std, noise[mine]
