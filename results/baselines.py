"""The floor and the ceiling for a probe on the embedded data: raw pixels, and a small supervised CNN.

    python results/baselines.py            # writes results/baselines.json; about 3 minutes on 2 CPU cores

Floor: probe.py's own linear probe (same recipe, same seeded sample sizes) on standardised raw pixels.
Ceiling: a 4-layer CNN trained with labels on the full train split for 3 epochs, scored on the full test split.
"""
import json
import os
import sys
import time

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import data  # noqa: E402
import probe  # noqa: E402


def pixels(split, n):
    dataset = probe.get_split(data.EMBEDDED, split, 32, "./data", n)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1000)
    xs, ys = zip(*loader)
    return torch.cat(xs).flatten(1), torch.cat(ys)


def floor(n_train=3000, n_test=1500):
    train_x, train_y = pixels("train", n_train)
    test_x, test_y = pixels("test", n_test)
    lp = probe.train_linear_probes(train_x[None], train_y, test_x[None], test_y, 10)[0]
    knn = probe.knn_accuracy(train_x, train_y, test_x, test_y)
    return {"linear_probe": lp, "knn": knn, "n_train": n_train, "n_test": n_test}


def cnn():
    def conv(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))
    return nn.Sequential(conv(3, 32), conv(32, 64), conv(64, 128), conv(128, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def ceiling(epochs=3, batch=128):
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
            x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(-1), x)  # flips keep every class
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(test_x[i:i + 1000].view(-1, 3, 32, 32)).argmax(1) for i in range(0, len(test_x), 1000)])
    return {"accuracy": (pred == test_y).float().mean().item() * 100, "epochs": epochs, "n_test": len(test_y)}


if __name__ == "__main__":
    start = time.time()
    result = {"raw_pixels": floor(), "supervised_cnn": ceiling()}
    result["seconds"] = round(time.time() - start)
    print(json.dumps(result, indent=1))
    json.dump(result, open(os.path.join(HERE, "baselines.json"), "w"), indent=1)
