"""The plain-PyTorch oracle: normalize, build the full B x C logits, apply the
margin at the target column, cross-entropy. Autograd through everything.

It is the correctness reference for every fused backend and the "naive" baseline
of the benchmarks. It computes the B x C cosines in float32 (float64 for
float64 inputs) whatever the input dtype, and each row's target column in
float64 from the raw rows, taking the target angle from the vectors (atan2 of
the perpendicular part and the cosine), so its value and derivative are exact
where cos rounds to +-1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .margins import (CLIP_EPS, NORM_EPS, AdaFace, ArcFace, CombinedMargin, CosFace, CurricularFace, ElasticArcFace,
                      ElasticCosFace, MagFace, Margin, MVSoftmax, NormSoftmax, RowMargins, SphereFace)


def _margin_target(c: Tensor, x_hat: Tensor, w_hat_y: Tensor, margins: RowMargins, overflow: str,
                   easy_margin: bool, detach_margin: bool) -> Tensor:
    """t = cos(m1 theta + m2) - m3 with the overflow / easy-margin rules, by autograd.

    theta = atan2(||w_hat_y - c x_hat||, c): the angle from the vectors, whose
    derivative stays exact where cos rounds to +-1 (arccos's -1/sqrt(1 - c^2)
    does not: 1 - c^2 cancels)."""
    # Clamp the value to [-1, 1] but let the gradient through unchanged.
    c = c + (c.clamp(-1.0, 1.0) - c).detach()
    m1, m2, m3 = (v.to(c.dtype) for v in margins)
    sin = torch.linalg.vector_norm(w_hat_y - c[:, None] * x_hat, dim=1)
    angle = m1 * torch.atan2(sin, c) + m2
    if overflow == "clip":
        angle = angle.clamp(CLIP_EPS, math.pi - CLIP_EPS)  # zero gradient where the clip acts
    plain = (m1 == 1.0) & (m2 == 0.0) & (overflow != "clip")
    t = torch.where(plain, c - m3, torch.cos(angle) - m3)
    if overflow == "classic":
        t = torch.where(angle >= math.pi, c - m2 * torch.sin(m2) - m3, t)
    if easy_margin:
        t = torch.where(c > 0, t, c)
    if detach_margin:
        t = c + (t - c).detach()
    return t


def margin_cross_entropy(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: Margin,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    margins: RowMargins | None = None,
    generator: torch.Generator | None = None,
    state: dict[str, Tensor] | None = None,
    subcenters: int = 1,
) -> tuple[Tensor, Tensor]:
    """Loss (reduced as asked) and per-row logsumexp, the naive way, from the
    raw inputs and the spec's numbers alone: nothing here is computed by the
    code it judges.

    ``margins``: per-row (m1, m2, m3) given by the caller (a replayed step);
    otherwise the spec's fixed triple, elastic draws from ``generator``
    (sorted here for ``plus``), AdaFace's from the norms and ``state``
    (``batch_mean``, ``batch_std``), or MagFace's from the magnitudes (with its
    regularizer added, as only then). ``state["t"]``: CurricularFace's t; a
    non-target cosine above its row's cos(theta_y + m) counts as c (t + c), t a
    constant. MV-Softmax: one above the margined target cosine counts as
    t c + t - 1, and the target falls back to c_y where c_y <= m (AM) or
    c_y <= 0 (Arc). ``subcenters`` (K):
    ``weight`` is [C*K, D], class c's sub-centers at rows c*K ... c*K + K - 1,
    and a class's cosine is the max over them (its gradient to the arg-max, the
    first of ties)."""
    compute = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    # One cast of each input, shared by both branches below: their gradients
    # meet in `compute` and reach a bf16/fp16 input rounded once.
    x, w = embeddings.to(compute), weight.to(compute)
    x_hat = F.normalize(x, dim=1, eps=NORM_EPS)
    w_hat = F.normalize(w, dim=1, eps=NORM_EPS)
    cos = x_hat @ w_hat.t()
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    target_rows = safe_labels
    if subcenters > 1:  # B x C x K: the naive way
        cos, nearest = cos.view(cos.shape[0], weight.shape[0] // subcenters, subcenters).max(dim=2)
        target_rows = safe_labels * subcenters + nearest.gather(1, safe_labels[:, None]).squeeze(1)

    # The target column from float64 rows (B x D, cheap): in float32 the
    # tangent part w_hat - c x_hat of a (near-)parallel or antiparallel target
    # is a difference of nearly equal vectors, and its norm (sin theta) and
    # gradient come out wrong by up to ~1%.
    x_64 = F.normalize(x.double(), dim=1, eps=NORM_EPS)
    w_64 = F.normalize(w.index_select(0, target_rows).double(), dim=1, eps=NORM_EPS)
    c_64 = (x_64 * w_64).sum(1)
    penalty = None
    if margins is None:
        margins, penalty = _spec_margins(margin, c_64.detach(), valid, generator, x, state)
    target = _margin_target(c_64, x_64, w_64, margins, margin.overflow, margin.easy_margin, margin.detach_margin)
    if isinstance(margin, MVSoftmax):  # the margin only where c_y > m (AM) or c_y > 0 (Arc)
        c = c_64.clamp(-1.0, 1.0)
        target = torch.where(c > (margin.m if margin.form == "am" else 0.0), target, c)
    target = target.to(compute)
    if isinstance(margin, (CurricularFace, MVSoftmax)):
        with torch.no_grad():  # cos(theta_y + m) = c cos m - sin(theta_y) sin m, or c - m (AM)
            c = c_64.clamp(-1.0, 1.0)
            sin = torch.linalg.vector_norm(w_64 - c[:, None] * x_64, dim=1)
            if isinstance(margin, MVSoftmax) and margin.form == "am":
                threshold = c - margin.m
            else:
                threshold = c * math.cos(margin.m) - sin * math.sin(margin.m)
            threshold = torch.where(valid, threshold, math.inf).to(compute)[:, None]
        if isinstance(margin, CurricularFace):
            if state is None or "t" not in state:
                raise ValueError("the reference needs CurricularFace's t (state={'t': ...})")
            t = torch.as_tensor(state["t"], dtype=torch.float64).detach().to(compute)
            cos = torch.where(cos > threshold, cos * (t + cos), cos)
        else:
            cos = torch.where(cos > threshold, margin.t * cos + margin.t - 1.0, cos)
    onehot = F.one_hot(safe_labels, cos.shape[1]).bool() & valid[:, None]
    logits = torch.where(onehot, (margin.s * target)[:, None], margin.s * cos)

    lse = torch.logsumexp(logits, dim=1)
    rows = torch.where(valid, lse - margin.s * target, torch.zeros_like(lse))
    if penalty is not None:
        rows = rows + torch.where(valid, penalty.to(compute), torch.zeros_like(rows))
    return reduce_rows(rows, valid, reduction), lse.detach()


def _spec_margins(margin: Margin, cos_target: Tensor, valid: Tensor, generator: torch.Generator | None, x: Tensor,
                  state: dict[str, Tensor] | None) -> tuple[RowMargins, Tensor | None]:
    """Per-row (m1, m2, m3) from the spec's numbers, float64, and a per-row
    penalty (MagFace's regularizer) or None: the fixed triple, elastic draws
    (float32 values: N(m, std) from ``generator``), sorted for ``plus`` so that
    the valid row with the lowest target cosine gets the largest margin (ties
    in row order), AdaFace's from the detached norms of ``x`` and the
    statistics in ``state``, MagFace's from the magnitudes of ``x`` (with
    their gradient)."""
    b, device = cos_target.shape[0], cos_target.device
    full = lambda v: torch.full((b,), float(v), dtype=torch.float64, device=device)  # noqa: E731
    if isinstance(margin, (ElasticArcFace, ElasticCosFace)):
        if margin.std == 0:
            m = full(margin.m)
        else:
            mean = torch.full((b,), float(margin.m), dtype=torch.float32, device=device)
            m = torch.normal(mean, float(margin.std), generator=generator).double()
        if margin.plus:
            rows = valid.nonzero().squeeze(1)
            order = torch.sort(cos_target[rows], descending=True, stable=True).indices
            m = m.clone()
            m[rows[order]] = torch.sort(m[rows]).values
        zero, one = torch.zeros_like(m), torch.ones_like(m)
        return (RowMargins(one, m, zero) if isinstance(margin, ElasticArcFace) else RowMargins(one, zero, m)), None
    if isinstance(margin, AdaFace):
        if state is None:
            raise ValueError("the reference needs AdaFace's statistics (state={'batch_mean': ..., 'batch_std': ...})")
        norms = torch.linalg.vector_norm(x.detach().double(), dim=1).clamp(0.001, 100.0)
        mean, std = (torch.as_tensor(state[k], dtype=torch.float64).to(device) for k in ("batch_mean", "batch_std"))
        r = ((norms - mean) / (std + 1e-3) * margin.h).clamp(-1.0, 1.0)
        return RowMargins(torch.ones_like(r), -margin.m * r, margin.m + margin.m * r), None
    if isinstance(margin, MagFace):
        a = torch.linalg.vector_norm(x.double(), dim=1).clamp(margin.l_a, margin.u_a)
        m = margin.l_m + (margin.u_m - margin.l_m) * (a - margin.l_a) / (margin.u_a - margin.l_a)
        return RowMargins(torch.ones_like(m), m, torch.zeros_like(m)), margin.lambda_g * (a / margin.u_a**2 + 1.0 / a)
    if isinstance(margin, CombinedMargin):
        m1, m2, m3 = margin.m1, margin.m2, margin.m3
    elif isinstance(margin, SphereFace):
        m1, m2, m3 = margin.m, 0.0, 0.0
    elif isinstance(margin, CosFace) or (isinstance(margin, MVSoftmax) and margin.form == "am"):
        m1, m2, m3 = 1.0, 0.0, margin.m
    elif isinstance(margin, (ArcFace, CurricularFace, MVSoftmax)):
        m1, m2, m3 = 1.0, margin.m, 0.0
    elif isinstance(margin, NormSoftmax):
        m1, m2, m3 = 1.0, 0.0, 0.0
    else:
        raise TypeError(f"the reference does not know the margin {type(margin).__name__}")
    return RowMargins(full(m1), full(m2), full(m3)), None


def _class_cosines(cos: Tensor, subcenters: int) -> Tensor:
    """B x (C*K) cosines to B x C: each class's max over its K sub-centers."""
    return cos if subcenters == 1 else cos.view(cos.shape[0], cos.shape[1] // subcenters, subcenters).amax(dim=2)


def reduce_rows(rows: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """mean over valid rows (0 when there are none), sum, or the rows as they are."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(total.dtype)


def adaface_statistics(mean: Tensor, std: Tensor, norms: Tensor, momentum: float) -> tuple[Tensor, Tensor]:
    """AdaFace's running statistics after a batch of clipped norms, as its
    official head updates them (unbiased std), except that a batch of fewer
    than two rows leaves the std alone (theirs becomes NaN for good)."""
    with torch.no_grad():
        if norms.numel() == 0:
            return mean, std
        new_mean = momentum * norms.mean() + (1 - momentum) * mean
        new_std = momentum * norms.std() + (1 - momentum) * std if norms.numel() >= 2 else std
        return new_mean, new_std


def adaface_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, mean: Tensor, std: Tensor, *, s: float = 64.0,
                 m: float = 0.4, h: float = 0.333, reduction: str = "mean", ignore_index: int = -100,
                 norms: Tensor | None = None, subcenters: int = 1) -> Tensor:
    """AdaFace written from the paper and its official head, the naive way: the
    full B x C cosines (the max over K sub-centers with ``subcenters``), the
    target angle by arccos, feature-quality margins from the detached, clipped
    norms (``norms``, by default those of ``embeddings``) and the given statistics."""
    compute = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    x = embeddings.to(compute)
    w_hat = F.normalize(weight.to(compute), dim=1, eps=NORM_EPS)
    cos = _class_cosines(F.normalize(x, dim=1, eps=NORM_EPS) @ w_hat.t(), subcenters)
    if norms is None:
        norms = torch.linalg.vector_norm(x.detach(), dim=1).clamp(0.001, 100.0)
    r = ((norms - mean) / (std + 1e-3) * h).clamp(-1.0, 1.0)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    c_y = cos.gather(1, safe[:, None]).squeeze(1).clamp(-1.0, 1.0)
    theta = torch.clip(torch.acos(c_y) - m * r, CLIP_EPS, math.pi - CLIP_EPS)
    target = torch.cos(theta) - (m + m * r)
    onehot = F.one_hot(safe, cos.shape[1]).bool() & valid[:, None]
    logits = torch.where(onehot, (s * target)[:, None], s * cos)
    rows = torch.where(valid, torch.logsumexp(logits, dim=1) - s * target, torch.zeros_like(target))
    return reduce_rows(rows, valid, reduction)


def magface_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, s: float = 64.0, l_a: float = 10.0,
                 u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8, lambda_g: float = 35.0,
                 easy_margin: bool = True, reduction: str = "mean", ignore_index: int = -100,
                 subcenters: int = 1) -> Tensor:
    """MagFace written from the paper, the naive way: the full B x C cosines (the
    max over K sub-centers with ``subcenters``), the target angle by arccos,
    m(a) linear in the clamped magnitude a (with its gradient), the easy margin
    or the classic rule, plus lambda_g (a / u_a^2 + 1 / a)."""
    compute = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    x = embeddings.to(compute)
    cos = F.normalize(x, dim=1, eps=NORM_EPS) @ F.normalize(weight.to(compute), dim=1, eps=NORM_EPS).t()
    cos = _class_cosines(cos, subcenters)
    a = torch.linalg.vector_norm(x, dim=1).clamp(l_a, u_a)
    m = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    c = cos.gather(1, safe[:, None]).squeeze(1).clamp(-1.0, 1.0)
    margined = torch.cos(torch.acos(c) + m)
    if easy_margin:
        target = torch.where(c > 0, margined, c)
    else:
        target = torch.where(torch.acos(c) + m < math.pi, margined, c - m * torch.sin(m))
    onehot = F.one_hot(safe, cos.shape[1]).bool() & valid[:, None]
    logits = torch.where(onehot, (s * target)[:, None], s * cos)
    ce = torch.logsumexp(logits, dim=1) - s * target
    rows = torch.where(valid, ce + lambda_g * (a / u_a**2 + 1.0 / a), torch.zeros_like(ce))
    return reduce_rows(rows, valid, reduction)


def curricularface_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, t: Tensor, *, s: float = 64.0,
                        m: float = 0.5, momentum: float = 0.01, reduction: str = "mean",
                        ignore_index: int = -100, subcenters: int = 1) -> tuple[Tensor, Tensor]:
    """CurricularFace written from the paper and its official head, the naive
    way; returns (loss, the updated t). The full B x C cosines (clamped to
    [-1, 1]); the target's cos(theta + m) by the plain formula c cos m - sin
    sin m, with the classic rule (c - m sin m where theta + m > pi); hard
    negatives, cos > cos(theta_y + m), become cos (t + cos) with t detached and
    updated first: t <- momentum mean(valid target cosines) + (1 - momentum) t.
    ``subcenters``: each class's cosine the max over its K sub-centers."""
    compute = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    x_hat = F.normalize(embeddings.to(compute), dim=1, eps=NORM_EPS)
    cos = _class_cosines(x_hat @ F.normalize(weight.to(compute), dim=1, eps=NORM_EPS).t(), subcenters).clamp(-1.0, 1.0)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    c_y = cos.gather(1, safe[:, None])
    sin_y = torch.sqrt(1.0 - c_y**2)
    cos_m = c_y * math.cos(m) - sin_y * math.sin(m)
    hard = (cos > cos_m) & valid[:, None]
    final = torch.where(c_y > math.cos(math.pi - m), cos_m, c_y - math.sin(math.pi - m) * m)
    with torch.no_grad():
        if valid.any():
            t = c_y[valid].mean() * momentum + (1 - momentum) * t.to(compute)
    logits = torch.where(hard, cos * (t.to(compute) + cos), cos)
    onehot = F.one_hot(safe, cos.shape[1]).bool() & valid[:, None]
    logits = s * torch.where(onehot, final, logits)
    rows = torch.where(valid, torch.logsumexp(logits, dim=1) - s * final.squeeze(1), torch.zeros_like(c_y.squeeze(1)))
    return reduce_rows(rows, valid, reduction), t


def subcenter_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, subcenters: int = 3, s: float = 64.0,
                   m: float = 0.5, reduction: str = "mean", ignore_index: int = -100) -> Tensor:
    """Sub-center ArcFace written from the paper, the naive way: the full
    B x C x K cosines against ``weight`` [C*K, D] (class c's sub-centers at rows
    c*K ... c*K + K - 1), each class's cosine the max over its sub-centers (the
    gradient reaching the arg-max only), ArcFace's margin at the target by arccos
    with the classic rule (c - m sin m where theta + m > pi)."""
    compute = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    x_hat = F.normalize(embeddings.to(compute), dim=1, eps=NORM_EPS)
    cos = _class_cosines(x_hat @ F.normalize(weight.to(compute), dim=1, eps=NORM_EPS).t(), subcenters)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    c_y = cos.gather(1, safe[:, None]).squeeze(1).clamp(-1.0, 1.0)
    theta = torch.acos(c_y)
    target = torch.where(theta + m < math.pi, torch.cos(theta + m), c_y - m * math.sin(m))
    onehot = F.one_hot(safe, cos.shape[1]).bool() & valid[:, None]
    logits = torch.where(onehot, (s * target)[:, None], s * cos)
    rows = torch.where(valid, torch.logsumexp(logits, dim=1) - s * target, torch.zeros_like(target))
    return reduce_rows(rows, valid, reduction)


def mv_softmax_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, s: float = 32.0, m: float = 0.35,
                    t: float = 1.12, form: str = "am", reduction: str = "mean", ignore_index: int = -100,
                    subcenters: int = 1) -> Tensor:
    """MV-Softmax written from the paper (Wang et al., AAAI 2020) with the
    conventions of FaceX-Zoo's head, the naive way: the full B x C cosines (the
    max over K sub-centers with ``subcenters``); the target cosine c_y margined
    as c_y - m where c_y > m (AM) or cos(theta_y + m) by c_y cos m - sin_y sin m
    where c_y > 0 (Arc), else c_y; every other cosine above the margined one
    (without the fallback) becomes t cos + t - 1."""
    compute = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    x_hat = F.normalize(embeddings.to(compute), dim=1, eps=NORM_EPS)
    cos = _class_cosines(x_hat @ F.normalize(weight.to(compute), dim=1, eps=NORM_EPS).t(), subcenters)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    gt = cos.gather(1, safe[:, None])
    if form == "am":
        margined = gt - m
        final = torch.where(gt > m, margined, gt)
    else:
        sin = torch.sqrt((1.0 - gt**2).clamp_min(0.0))
        margined = gt * math.cos(m) - sin * math.sin(m)
        final = torch.where(gt > 0.0, margined, gt)
    hard = (cos > margined) & valid[:, None]
    logits = torch.where(hard, t * cos + t - 1.0, cos)
    onehot = F.one_hot(safe, cos.shape[1]).bool() & valid[:, None]
    logits = s * torch.where(onehot, final, logits)
    rows = torch.where(valid, torch.logsumexp(logits, dim=1) - s * final.squeeze(1), torch.zeros_like(gt.squeeze(1)))
    return reduce_rows(rows, valid, reduction)
