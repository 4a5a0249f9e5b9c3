"""A small CNN on imbalanced image-like data: BatchNorm2d against class-balanced
normalization (convert_to_iwn), same initialization, data and steps.

    python examples/cnn_imbalanced.py [--steps 300] [--seeds 0 1 2]

The data are generated here (nothing is downloaded): 3x16x16 images of five
classes, each class a faint pattern of its own (stripes at its own frequency
and angle) under noise, with training frequencies 60/20/10/6/4 %, and a
balanced test set. Prints macro-F1 on the test set and milliseconds per
training step for both models, per seed.
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn

from surgellm_kernels import convert_to_iwn, iwn_labels

CLASSES = 5
TRAIN_SHARE = (0.60, 0.20, 0.10, 0.06, 0.04)


def patterns(generator):
    """One 3x16x16 stripe pattern per class."""
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    out = []
    for c in range(CLASSES):
        angle = math.pi * c / CLASSES
        freq = 0.35 + 0.12 * c
        wave = torch.sin(freq * (xs * math.cos(angle) + ys * math.sin(angle)))
        colour = torch.rand(3, 1, 1, generator=generator) + 0.5
        out.append(colour * wave)
    return torch.stack(out)


def images(labels, templates, generator, signal=0.25):
    noise = torch.randn(len(labels), 3, 16, 16, generator=generator)
    return signal * templates[labels] + noise


def data(seed):
    g = torch.Generator().manual_seed(seed)
    templates = patterns(g)
    counts = [round(2000 * share) for share in TRAIN_SHARE]
    train_labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    train_labels = train_labels[torch.randperm(len(train_labels), generator=g)]
    test_labels = torch.arange(CLASSES).repeat_interleave(200)
    return (
        images(train_labels, templates, g),
        train_labels,
        images(test_labels, templates, g),
        test_labels,
    )


def cnn():
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, CLASSES),
    )


def train(model, x, y, steps, batch, seed, labelled):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    model.train()
    times = []
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        images_, labels = x[idx], y[idx]
        start = time.perf_counter()
        optimizer.zero_grad()
        if labelled:  # the class-balanced layers need each sample's label
            with iwn_labels(model, labels):
                loss = F.cross_entropy(model(images_), labels)
        else:
            loss = F.cross_entropy(model(images_), labels)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3


@torch.no_grad()
def macro_f1(model, x, y):
    model.eval()
    predicted = model(x).argmax(1)
    return f1_score(y.numpy(), predicted.numpy(), average="macro")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch must be >= 1")
    print(f"{'seed':>4}  {'model':<28} {'macro-F1':>8} {'ms/step':>8}")
    for seed in args.seeds:
        x, y, x_test, y_test = data(seed)
        torch.manual_seed(seed)
        batchnorm = cnn()
        balanced = cnn()
        balanced.load_state_dict(batchnorm.state_dict())
        convert_to_iwn(balanced, num_classes=CLASSES)
        for name, model, labelled in (
            ("BatchNorm2d", batchnorm, False),
            ("FusedInstanceWeightedNorm2d", balanced, True),
        ):
            ms = train(model, x, y, args.steps, args.batch, seed, labelled)
            print(f"{seed:>4}  {name:<28} {macro_f1(model, x_test, y_test):>8.3f} {ms:>8.2f}")


if __name__ == "__main__":
    main()
