"""Is the class in the features at all? A check of probe.py's verdict with a different learner.

    python results/separability.py out/ckpt.pt        # about 2 minutes on 2 CPU cores

An L2-regularised logistic regression fitted to convergence by L-BFGS (not probe.py's SGD recipe), on the same
seeded 3,000 / 1,500 sample of the checkpoint's data: on mean-pooled tokens of a few blocks (train and test
accuracy: a low train accuracy means the classes are not linearly separable in those features, whatever the
probe), on all patch tokens of a block concatenated (position kept), and on raw pixels.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import probe  # noqa: E402


def logistic_regression(train_x, train_y, test_x, test_y, n_classes, weight_decay=1e-3):
    """(train accuracy, test accuracy) in % of a standardised, L2-regularised softmax regression."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    w = torch.zeros(train_x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(train_x @ w + b, train_y) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return [((x @ w + b).argmax(1) == y).float().mean().item() * 100
                for x, y in ((train_x, train_y), (test_x, test_y))]


@torch.no_grad()
def tokens_and_pixels(model, dataset):
    blocks, labels, pixels = [], [], []
    for imgs, y in torch.utils.data.DataLoader(dataset, 500):
        blocks.append(torch.stack([t[:, 1:] for t in model.features(imgs)]))
        labels.append(y)
        pixels.append(imgs.flatten(1))
    return torch.cat(blocks, 1), torch.cat(labels), torch.cat(pixels)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a pretrain.py checkpoint; its own data are used")
    path = p.parse_args().checkpoint
    model, ckpt = probe.load_model(path)
    model.eval()
    name, root = probe.data_source(ckpt, argparse.Namespace(data=None, data_root=None), path)
    cfg = model.config
    stats = probe.input_stats(ckpt)
    train, test = (tokens_and_pixels(model, probe.get_split(name, split, cfg.img_size, root, n, stats=stats))
                   for split, n in (("train", 3000), ("test", 1500)))
    print(f"{path} on {name}: L-BFGS logistic regression, train / test accuracy %")
    n_classes = int(max(train[1].max(), test[1].max())) + 1  # cifar100 or a folder: not always 10
    fit = lambda x_train, x_test: " / ".join(
        f"{a:.1f}" for a in logistic_regression(x_train, train[1], x_test, test[1], n_classes))
    for block in sorted({1, cfg.depth // 3, 2 * cfg.depth // 3, cfg.depth}):
        print(f"  block {block:2d}, mean of tokens   {fit(train[0][block - 1].mean(1), test[0][block - 1].mean(1))}")
    block = max(1, cfg.depth // 3)
    print(f"  block {block:2d}, tokens concatenated {fit(train[0][block - 1].flatten(1), test[0][block - 1].flatten(1))}")
    print(f"  raw pixels                {fit(train[2], test[2])}")


if __name__ == "__main__":
    main()
