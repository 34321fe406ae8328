"""The small-image fast path (pretrain.py --device-data): the whole uint8 train set on the device, and each batch
cropped, flipped, resampled and normalised there at once, as torchvision's RandomResizedCrop + flip would do it
item by item in a DataLoader worker. For in-memory sets (data.DATASETS); ImageFolder roots keep the DataLoader.
"""
import math

import torch


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


def cubic(d, a=-0.5):
    """The bicubic kernel of PIL and of torch's antialiased resize (Keys, a = -0.5; torch's plain one has -0.75)."""
    d = d.abs()
    near, far = ((a + 2) * d - (a + 3)) * d * d + 1, (((d - 5) * d + 8) * d - 4) * a
    return torch.where(d < 1, near, torch.where(d < 2, far, 0.0))


def resize_weights(start, length, out_size, in_size):
    """[n, out_size, in_size]: row i holds the weights that output pixel i of resizing the span start..start+length
    (whole pixels, one span per image) to out_size gives the pixels of the axis, as torch's antialiased bicubic
    resize (PIL's) computes them: the kernel widened by the shrink factor, when shrinking, so that it low-passes,
    cut at the span's ends (ATen's rounding of them included) and renormalised."""
    scale = (length / out_size)[:, None, None]  # span pixels per output pixel
    stretch = scale.clamp(min=1)
    centre = scale * (torch.arange(out_size, device=start.device) + 0.5)[:, None]  # in span pixels
    j = torch.arange(in_size, device=start.device) - start[:, None, None]  # each axis pixel's index in the span
    first = (centre - 2 * stretch + 0.5).floor().clamp(min=0)  # ATen: xmin, xmin + xsize (truncation of values > 0)
    stop = torch.minimum((centre + 2 * stretch + 0.5).floor(), length[:, None, None])
    w = torch.where((j >= first) & (j < stop), cubic((j - centre + 0.5) / stretch), 0.0)
    return w / w.sum(-1, keepdim=True)


def crop_and_flip(images, top, left, h, w, flip, size):
    """uint8 images [n, C, H, W] -> float [n, 3, size, size] in 0..255: each one's box resized to size x size and
    mirrored where flip is -1, as v2.functional.resized_crop with its defaults (bicubic, antialias=True; what the
    DataLoader path runs) would, short of its rounding to uint8. A resize is linear and separable: two batched
    matrix products with the weights of resize_weights, across (the width) and then down, rounded to 8 bits in
    between as PIL and torch's uint8 kernel do."""
    # float64 (but on MPS, which lacks it): a last-bit difference, as another batch count (a DDP rank's share) may
    # give, would almost never cross the rounding between the passes
    exact = torch.float32 if images.device.type == "mps" else torch.float64
    rows = resize_weights(top.to(exact), h.to(exact), size, images.shape[-2])
    cols = resize_weights(left.to(exact), w.to(exact), size, images.shape[-1])
    cols = torch.where(flip[:, None, None] < 0, cols.flip(1), cols)
    across = (images.to(exact) @ cols[:, None].transpose(-1, -2)).round().clamp(0, 255)  # 8 bits between passes
    return (rows[:, None] @ across).clamp(0, 255).float().expand(-1, 3, -1, -1)  # per channel: grey expanded last


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
