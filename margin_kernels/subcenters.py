"""Sub-center ArcFace's clean-up step (Deng et al., ECCV 2020): with K
sub-centers per class (rows c·K + k of a [C·K, D] weight), find each class's
dominant sub-center and the samples far from it, to drop as label noise.

The loss itself is ``margin_cross_entropy(..., subcenters=K)`` (and the heads'
and PartialFC's ``subcenters=K``). Both functions here stream over the samples
in chunks and never hold more than chunk × K cosines.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._targets import subcenter_cosines

__all__ = ["dominant_subcenters", "far_from_dominant"]


def _check(embeddings: Tensor, labels: Tensor, weight: Tensor, subcenters: int) -> int:
    if isinstance(subcenters, bool) or not isinstance(subcenters, int) or subcenters < 1:
        raise ValueError(f"subcenters must be an int >= 1, got {subcenters!r}")
    if embeddings.dim() != 2 or weight.dim() != 2 or embeddings.shape[1] != weight.shape[1]:
        raise ValueError(f"embeddings [N, D] and weight [C*K, D] must share D, got {tuple(embeddings.shape)} and "
                         f"{tuple(weight.shape)}")
    if weight.shape[0] % subcenters:
        raise ValueError(f"weight has {weight.shape[0]} rows, not a multiple of subcenters={subcenters}")
    if labels.shape != embeddings.shape[:1] or labels.dtype in (torch.float16, torch.bfloat16, torch.float32,
                                                               torch.float64, torch.bool):
        raise ValueError(f"labels must be integers of shape [{embeddings.shape[0]}], got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    classes = weight.shape[0] // subcenters
    if labels.numel() and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must be in [0, {classes})")
    return classes


def _subcenter_cosines(embeddings: Tensor, labels: Tensor, weight: Tensor, subcenters: int,
                       chunk: int) -> Tensor:
    """[N, K] float32 cosines of each sample to its class's sub-centers."""
    out = [subcenter_cosines(embeddings[start : start + chunk], weight, labels[start : start + chunk], subcenters,
                             torch.float32)
           for start in range(0, embeddings.shape[0], chunk)]
    return torch.cat(out) if out else embeddings.new_zeros(0, subcenters, dtype=torch.float32)


@torch.no_grad()
def dominant_subcenters(embeddings: Tensor, labels: Tensor, weight: Tensor, subcenters: int, *,
                        chunk: int = 65536) -> Tensor:
    """Each class's dominant sub-center: the one nearest to most of its samples
    (ties to the lowest k), int64 [C]; -1 for a class without samples.

    Args:
        embeddings: [N, D] the dataset's embeddings (any float dtype).
        labels: [N] class indices in [0, C).
        weight: [C·K, D] the trained sub-center weight (class c's at rows c·K … c·K + K − 1).
        subcenters: K.
        chunk: samples per step.
    """
    classes = _check(embeddings, labels, weight, subcenters)
    nearest = _subcenter_cosines(embeddings, labels, weight, subcenters, chunk).argmax(dim=1)
    votes = torch.zeros(classes * subcenters, dtype=torch.long, device=labels.device)
    votes.index_add_(0, labels.long() * subcenters + nearest, torch.ones_like(nearest))
    votes = votes.view(classes, subcenters)
    return torch.where(votes.sum(1) > 0, votes.argmax(dim=1), torch.full((classes,), -1, device=votes.device))


@torch.no_grad()
def far_from_dominant(embeddings: Tensor, labels: Tensor, weight: Tensor, subcenters: int, *,
                      max_angle_degrees: float = 75.0, dominant: Tensor | None = None,
                      chunk: int = 65536) -> Tensor:
    """bool [N]: samples whose angle to their class's dominant sub-center exceeds
    ``max_angle_degrees`` (75 in insightface's drop script), the candidates to
    drop as noise. ``dominant``: from :func:`dominant_subcenters` (computed when None)."""
    if not (isinstance(max_angle_degrees, (int, float)) and 0 <= max_angle_degrees <= 180):
        raise ValueError(f"max_angle_degrees must be in [0, 180], got {max_angle_degrees!r}")
    classes = _check(embeddings, labels, weight, subcenters)
    if dominant is None:
        dominant = dominant_subcenters(embeddings, labels, weight, subcenters, chunk=chunk)
    if dominant.shape != (classes,):
        raise ValueError(f"dominant must be [{classes}], got {tuple(dominant.shape)}")
    cos = _subcenter_cosines(embeddings, labels, weight, subcenters, chunk)
    k = dominant[labels.long()].clamp_min(0)
    return cos.gather(1, k[:, None]).squeeze(1) < math.cos(math.radians(max_angle_degrees))
