"""The backbone: a small residual CNN whose norms are per sample."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Block(nn.Module):
    """Two 3x3 convolutions with a shortcut, halving the side. GroupNorm
    normalizes each sample on its own: a row's embedding never depends on the
    other rows of its rank, so the loss is the same at every world size."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(8, cout)
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.GroupNorm(8, cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.skip(x))


class Backbone(nn.Module):
    """[N, 1, S, S] images -> [N, D] embeddings: a stem, three residual
    blocks (S -> S/8), then a linear layer to D, as face backbones end."""

    def __init__(self, embedding_size: int, image_size: int, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.GroupNorm(8, width), nn.ReLU())
        self.blocks = nn.Sequential(Block(width, 2 * width), Block(2 * width, 4 * width), Block(4 * width, 4 * width))
        side = -(-image_size // 8)
        self.features = nn.Linear(4 * width * side * side, embedding_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(self.blocks(self.stem(x)).flatten(1))
