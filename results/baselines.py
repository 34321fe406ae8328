"""The floor and the ceiling for a probe on the embedded data: raw pixels, global statistics, a supervised CNN.

    python results/baselines.py            # writes results/glyphs/baselines.json; about 5 minutes on 2 CPU cores

Floor: probe.py's own linear probe and k-NN (same recipe, same seeded sample sizes) on standardised raw pixels.
Shortcut check: the same linear probe on the 6 per-image channel means and standard deviations; the classes
must not be readable from global statistics (issue 12 asks for at most 25%).
Ceiling: a 4-layer CNN trained with labels on the full train split for 3 epochs, scored on the full test split.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import data  # noqa: E402
import glyphs  # noqa: E402
import probe  # noqa: E402
from common import json_file, save_json, writable  # noqa: E402

N_CLASSES = len(glyphs.GLYPHS)


def pixels(split, n):
    """Normalised images [n, 3, 32, 32] of probe.py's seeded sample, and their labels."""
    dataset = probe.get_split(data.EMBEDDED, split, 32, "./data", n)
    xs, ys = zip(*torch.utils.data.DataLoader(dataset, batch_size=1000))
    return torch.cat(xs), torch.cat(ys)


def channel_stats(images):
    """The 6 global statistics of each image: per-channel mean and standard deviation."""
    flat = images.flatten(2)  # [n, 3, pixels]
    return torch.cat([flat.mean(-1), flat.std(-1)], 1)


def floors(n_train=3000, n_test=1500):
    (train_x, train_y), (test_x, test_y) = pixels("train", n_train), pixels("test", n_test)
    result = {"n_train": n_train, "n_test": n_test}
    for name, features in (("raw_pixels", lambda x: x.flatten(1)), ("channel_mean_std", channel_stats)):
        train_f, test_f = features(train_x), features(test_x)
        heads = probe.fit_linear_probes(train_f[None], train_y, N_CLASSES)
        result[name] = {"linear_probe": probe.head_accuracy(heads, test_f[None], test_y)[0],
                        "knn": probe.knn_accuracy(train_f, train_y, test_f, test_y, n_classes=N_CLASSES)}
    return result


def cnn():
    def conv(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))
    return nn.Sequential(conv(3, 32), conv(32, 64), conv(64, 128), conv(128, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, N_CLASSES))


def ceiling(epochs=3, batch=128):
    """No augmentation: a mirrored glyph is not its class, and the data already varies in pose."""
    torch.manual_seed(0)
    train = data.get_dataset(data.EMBEDDED, "train", 32, train_aug=False)
    test_x, test_y = pixels("test", 0)
    model = cnn()
    loader = torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * len(loader))
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(1) for x in test_x.split(1000)])
    return {"accuracy": (pred == test_y).float().mean().item() * 100, "epochs": epochs, "n_test": len(test_y)}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=json_file, default=os.path.join(HERE, "glyphs", "baselines.json"),
                   help="JSON path (default: %(default)s)")
    out = writable(p.parse_args().out)
    start = time.time()
    print("floor: linear probe and k-NN on raw pixels and on channel statistics ...", flush=True)
    result = floors()
    print("ceiling: a supervised CNN, 3 epochs on the train split ...", flush=True)
    result |= {"supervised_cnn": ceiling(), "seconds": round(time.time() - start)}
    print(json.dumps(result, indent=1))
    save_json(out, result)
