"""Synthetic identities that a network must learn, generated, never
downloaded: identity i is a smooth random image fixed by (seed, i), and each
of its photos is that image jittered, re-contrasted, occluded and noised.
Every random number is a counter-based hash of (seed, stream, step, row), so a
batch is a function of the step alone: any world size sees the same global
batch, a resumed run the same data, with no loader state.

``cfg`` below is the run's configuration (``train_partial_fc.Config``): seed,
identities, batch, image_size, eval_identities, eval_samples.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from margin_kernels.partial_fc import class_split

_M32 = 0xFFFFFFFF

# streams of the hash: what a uniform is drawn for
PROTOTYPE, DETAIL, LABEL, AUGMENT, NOISE, EVAL, PAIRS = range(1, 8)


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer finalizer on int64 tensors (every product stays below 2^63)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def hash_uniform(*counters, device=None) -> Tensor:
    """Uniforms in [0, 1) from non-negative integer counters (ints or int64
    tensors, broadcast together): the same values on every device, at every
    world size, with no generator state."""
    x = torch.zeros((), dtype=torch.int64, device=device)
    for c in counters:
        c = torch.as_tensor(c, dtype=torch.int64, device=device)
        x = _mix(x + (c & _M32) + 0x9E3779B9)
    return (x.to(torch.float64) / 2.0**32).float()


def hash_normal(*counters, device=None) -> Tensor:
    """Standard normals by Box-Muller from two hashed uniforms."""
    u1 = hash_uniform(*counters, 0, device=device).clamp_min(1e-7)
    u2 = hash_uniform(*counters, 1, device=device)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def prototypes(ids: Tensor, seed: int, size: int) -> Tensor:
    """[n, 1, size, size]: the faces of identities ``ids``, a coarse 6 x 6 and a
    finer 12 x 12 random pattern upsampled and summed, standardized."""
    ids = ids[:, None]
    coarse = hash_normal(seed, PROTOTYPE, ids, torch.arange(36, device=ids.device)).view(-1, 1, 6, 6)
    detail = hash_normal(seed, DETAIL, ids, torch.arange(144, device=ids.device)).view(-1, 1, 12, 12)
    img = (F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
           + 0.5 * F.interpolate(detail, size=size, mode="bilinear", align_corners=False))
    return (img - img.mean((2, 3), keepdim=True)) / img.std((2, 3), keepdim=True).clamp_min(1e-6)


def augment(faces: Tensor, seed: int, stream: int, sample: Tensor) -> Tensor:
    """Each face as a photo of it: an affine jitter (shift up to 1/8 of the
    side, rotation up to 12 degrees, scale 0.85-1.15), contrast 0.6-1.4,
    brightness +-0.4, an occluding square (half of the samples) and noise."""
    n, _, size, _ = faces.shape
    dev = faces.device
    u = [hash_uniform(seed, AUGMENT, stream, sample, k, device=dev) for k in range(8)]
    angle = (u[0] - 0.5) * (2 * math.radians(12))
    scale = 0.85 + 0.3 * u[1]
    shift = (torch.stack([u[2], u[3]], 1) - 0.5) * 0.5  # in [-1, 1] units: 1/8 of the side either way
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(faces.shape), align_corners=False)
    img = F.grid_sample(faces, grid, mode="bilinear", padding_mode="border", align_corners=False)
    img = img * (0.6 + 0.8 * u[4])[:, None, None, None] + ((u[5] - 0.5) * 0.8)[:, None, None, None]
    side = size // 3
    pos = torch.arange(size, device=dev)
    top, left = (u[6] * (size - side)).long(), (hash_uniform(seed, AUGMENT, stream, sample, 8, device=dev)
                                                  * (size - side)).long()
    inside = (((pos[None, :] >= top[:, None]) & (pos[None, :] < top[:, None] + side))[:, :, None]
              & ((pos[None, :] >= left[:, None]) & (pos[None, :] < left[:, None] + side))[:, None, :])
    occluded = (u[7] < 0.5)[:, None, None] & inside
    img = torch.where(occluded[:, None], torch.zeros_like(img), img)
    pixels = torch.arange(size * size, device=dev)
    noise = hash_normal(seed, NOISE, stream, sample[:, None], pixels, device=dev).view(n, 1, size, size)
    return img + 0.3 * noise


def rank_rows(total: int, world: int, rank: int) -> range:
    """This rank's contiguous rows of a global batch of ``total`` (any world size)."""
    start, count = class_split(total, world, rank)
    return range(start, start + count)


def train_batch(step: int, rows: range, cfg, device) -> tuple[Tensor, Tensor]:
    """Rows ``rows`` of the global batch of ``step``: identities drawn uniformly
    from the training ones, their samples drawn from (seed, step, row)."""
    j = torch.arange(rows.start, rows.stop, device=device)
    labels = (hash_uniform(cfg.seed, LABEL, step, j, device=device) * cfg.identities).long()
    labels = labels.clamp_max(cfg.identities - 1)
    sample = step * cfg.batch + j  # a distinct sample for every (step, row)
    return augment(prototypes(labels, cfg.seed, cfg.image_size), cfg.seed, 0, sample), labels


def eval_images(cfg, device) -> tuple[Tensor, Tensor]:
    """The held-out identities [C, C + E), ``eval_samples`` photos each."""
    ids = torch.arange(cfg.identities, cfg.identities + cfg.eval_identities, device=device)
    ids = ids.repeat_interleave(cfg.eval_samples)
    sample = torch.arange(ids.numel(), device=device)
    return augment(prototypes(ids, cfg.seed, cfg.image_size), cfg.seed, EVAL, sample), ids
