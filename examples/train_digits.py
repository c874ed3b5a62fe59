"""Train a small CNN with 2-D embeddings on scikit-learn's bundled 8x8 digits
(no download) with softmax, ArcFace and ElasticArcFace+, and draw the embeddings
on the unit circle per class, as the ArcFace paper does for 8 identities.

    bash scripts/install.sh demo   # or: pip install scikit-learn matplotlib
    python3 examples/train_digits.py --out docs/digits_embeddings.png

Prints the test accuracy of nearest-class-centre classification (cosine to the
mean direction of each class's training embeddings) for each loss.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

import margin_kernels as mk


def load_digits(seed: int):
    try:
        from sklearn.datasets import load_digits as sk_load
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise SystemExit("this demo needs scikit-learn: bash scripts/install.sh demo (or pip install scikit-learn)") from exc
    data = sk_load()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=0.25, random_state=seed, stratify=y)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


class Backbone(nn.Module):
    """8x8 image -> 2-D embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 16, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 2),
        )

    def forward(self, x):
        return self.features(x)


def make_head(name: str, gen: torch.Generator) -> nn.Module:
    if name == "softmax":
        return nn.Linear(2, 10, bias=False)
    if name == "ArcFace":
        return mk.nn.ArcFace(2, 10, s=16.0, m=0.25)
    if name == "ElasticArcFace+":
        return mk.nn.ElasticArcFace(2, 10, s=16.0, m=0.25, plus=True, generator=gen)
    raise ValueError(name)


def head_loss(head: nn.Module, emb, y):
    if isinstance(head, nn.Linear):
        return F.cross_entropy(head(emb), y)
    return head(emb, y)


def train(name: str, data, epochs: int, seed: int):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train, x_test, y_test = data
    net, head = Backbone(), make_head(name, gen)
    opt = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(perm), 64):
            b = perm[i : i + 64]
            loss = head_loss(head, net(x_train[b]), y_train[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        e_train, e_test = F.normalize(net(x_train)), F.normalize(net(x_test))
    centres = F.normalize(torch.stack([e_train[y_train == c].mean(0) for c in range(10)]))
    accuracy = ((e_test @ centres.t()).argmax(1) == y_test).float().mean().item()
    return e_test, y_test, accuracy


def draw(results, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("this demo needs matplotlib: bash scripts/install.sh demo (or pip install matplotlib)") from exc
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.4))
    colors = plt.get_cmap("tab10").colors
    circle = torch.linspace(0, 2 * math.pi, 200)
    for ax, (name, (emb, y, acc)) in zip(axes, results.items()):
        ax.plot(torch.cos(circle), torch.sin(circle), color="0.85", lw=1)
        for c in range(10):
            pts = emb[y == c]
            r = 1.0 + 0.035 * c  # a ring per class so that overlaps stay visible
            ax.scatter(r * pts[:, 0], r * pts[:, 1], s=9, color=colors[c], label=str(c), alpha=0.8)
        ax.set_title(f"{name}\nnearest-centre test accuracy {100 * acc:.1f}%", fontsize=10)
        ax.set_aspect("equal")
        ax.set_xlim(-1.45, 1.45)
        ax.set_ylim(-1.45, 1.45)
        ax.axis("off")
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), title="digit", fontsize=8)
    fig.suptitle("2-D embeddings of the 8x8 digits test set, normalized to the unit circle", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="digits_embeddings.png")
    args = p.parse_args(argv)
    data = load_digits(args.seed)
    results = {}
    for name in ("softmax", "ArcFace", "ElasticArcFace+"):
        results[name] = train(name, data, args.epochs, args.seed)
        print(f"{name:<16} nearest-class-centre test accuracy: {100 * results[name][2]:.1f}%", flush=True)
    draw(results, args.out)
    print(f"figure written to {args.out}")


if __name__ == "__main__":
    main()
