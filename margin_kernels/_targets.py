"""The step that turns labels into what the kernels take: each row's target
logit s * t, and the exact gradient of that logit, for every fused path (the
single-shard loss and PartialFC's shards).

The target angle comes from the vectors, theta = atan2(||w_hat - c x_hat||, c),
in float64 from the raw rows: 1 - c^2 cancels where cos rounds to +-1 (any angle
below ~2.4e-4 in float32), but the perpendicular part of w_hat does not. For the
same reason the target column's gradient is not left to the kernels (a slope
near 1/sin(theta) times a direction that the float32 products get only to
~1e-7): the kernels see a zero slope there, and ``add_target_gradients`` adds
s dt/dc times the tangent directions

    d c / d x_hat = w_hat - c x_hat,      d c / d w_hat = x_hat - c w_hat,

whose product with the slope is O(1) and computed in float64.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .margins import NORM_EPS, Margin, RowMargins


class Geometry(NamedTuple):
    """Each row against its target class, float64: cosine, sine and the two
    tangent directions (zero rows where the caller has no target)."""

    cos: Tensor
    sin: Tensor
    perp_x: Tensor  # w_hat - c x_hat: d c / d x_hat on the sphere
    perp_w: Tensor  # x_hat - c w_hat: d c / d w_hat on the sphere


class Targets(NamedTuple):
    """What the fused loss needs of the margin, per row."""

    logit: Tensor  # s * t, float32 [B]
    grad_x: Tensor  # d(s t) / d x_hat, float32 [B, D]
    grad_w: Tensor  # d(s t) / d w_hat of the row's class, float32 [B, D]


@torch.no_grad()
def geometry(embeddings: Tensor, w_rows: Tensor, mask: Tensor | None = None) -> Geometry:
    """Geometry of ``embeddings`` [B, D] against their classes' weight rows
    ``w_rows`` [B, D], from the raw rows in float64; rows outside ``mask`` are zero."""
    x = F.normalize(embeddings.detach().double(), dim=1, eps=NORM_EPS)
    w = F.normalize(w_rows.detach().double(), dim=1, eps=NORM_EPS)
    c = (x * w).sum(1).clamp(-1.0, 1.0)
    perp_x = w - c[:, None] * x
    perp_w = x - c[:, None] * w
    sin = torch.linalg.vector_norm(perp_x, dim=1)
    if mask is not None:
        keep = mask.to(torch.float64)
        c, sin, perp_x, perp_w = c * keep, sin * keep, perp_x * keep[:, None], perp_w * keep[:, None]
    return Geometry(c, sin, perp_x, perp_w)


@torch.no_grad()
def subcenter_cosines(embeddings: Tensor, weight: Tensor, classes: Tensor, subcenters: int,
                      dtype: torch.dtype = torch.float64) -> Tensor:
    """For sub-center weights ([C*K, D], class c's sub-centers at rows c*K ...
    c*K + K - 1): the cosines of row i to the K sub-centers of class
    ``classes[i]``, [B, K] in ``dtype`` (a gather of B*K rows)."""
    rows = classes.long()[:, None] * subcenters + torch.arange(subcenters, device=classes.device)
    x = F.normalize(embeddings.detach().to(dtype), dim=1, eps=NORM_EPS)
    w = F.normalize(weight.detach()[rows.flatten()].to(dtype), dim=1, eps=NORM_EPS).view(*rows.shape, embeddings.shape[1])
    return torch.einsum("bd,bkd->bk", x, w)


def target_rows(embeddings: Tensor, weight: Tensor, classes: Tensor, subcenters: int) -> tuple[Tensor, Tensor | None]:
    """(the weight row of each row's target class ``classes[i]`` (in range),
    int64 [B]; with sub-centers, which sub-center that is, else None). With
    sub-centers the row is the class's nearest sub-center, from float64
    cosines (the first of ties)."""
    if subcenters == 1:
        return classes, None
    sub = subcenter_cosines(embeddings, weight, classes, subcenters).argmax(dim=1)
    return classes * subcenters + sub, sub


def prepare_targets(geo: Geometry, margins: RowMargins, margin: Margin) -> Targets:
    """Target logits and their gradients from the rows' geometry and margins.

    The geometry is detached (its gradient is grad_x / grad_w); the logit
    keeps the margins' autograd history, so that margins that need a gradient
    (functions of the embeddings) receive dL/dm through it."""
    t, slope = margin.target(geo.cos, margins, sin_target=geo.sin)
    with torch.no_grad():
        scaled = margin.s * slope
        grad_x = (scaled[:, None] * geo.perp_x).float()
        grad_w = (scaled[:, None] * geo.perp_w).float()
    return Targets((margin.s * t).float(), grad_x, grad_w)


def target_logit_grad(logit: Tensor, lse: Tensor, own: Tensor, grad_rows: Tensor) -> Tensor:
    """d loss / d (target logit) per row: g_i (p_i - 1) where the row's target is
    here (``own``), 0 elsewhere; p_i = exp(s t_i - lse_i)."""
    return torch.where(own, grad_rows.float() * (torch.exp(logit - lse) - 1.0), torch.zeros_like(lse))


class TargetShare(NamedTuple):
    """The target columns' share of the gradient in one shard."""

    d_logit: Tensor  # d loss / d (s t) per row, 0 where the target is in another shard
    rows: Tensor  # the target's weight row in this shard (its sub-center's with K > 1), -1 where none
    dw: Tensor | None  # the rows' share of dW, float32 [B, D] (None without a weight gradient)


def target_share(targets: Targets, labels_local: Tensor, lse: Tensor, grad_rows: Tensor, w_inv: Tensor,
                 subcenters: int = 1, target_subcenter: Tensor | None = None, weight_grad: bool = True) -> TargetShare:
    """Row i (with a target in this shard, ``labels_local[i] >= 0``) has
    dL/d(s t) = g_i (p_i - 1); d/dx_hat gets that times grad_x, and the
    target's row of dW (row labels_local[i], or labels_local[i] * K +
    target_subcenter[i] with sub-centers) gets it times grad_w / ||w||. The
    kernels take the dW share (``lse_backward(target_rows=, target_dw=)``) and
    add it before their float32 block is rounded to the weight's dtype."""
    own = labels_local >= 0
    d_logit = target_logit_grad(targets.logit, lse, own, grad_rows)
    rows = labels_local if subcenters == 1 else torch.where(own, labels_local * subcenters + target_subcenter,
                                                           labels_local)
    dw = None
    if weight_grad:
        scale = d_logit * w_inv[rows.clamp_min(0)] if w_inv.shape[0] > 0 else d_logit
        dw = (scale[:, None] * targets.grad_w).contiguous()
    return TargetShare(d_logit, rows.contiguous(), dw)


def add_target_gradients(dx_hat: Tensor, dw: Tensor | None, targets: Targets, share: TargetShare) -> None:
    """Add the target columns' share to dx_hat and, where given, to dW, in place."""
    dx_hat.add_(share.d_logit[:, None] * targets.grad_x)
    if dw is not None and dw.shape[0] > 0 and share.dw is not None:
        dw.index_add_(0, share.rows.clamp_min(0), share.dw.to(dw.dtype))
