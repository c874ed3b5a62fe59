"""The README's "Coming from ..." table, row by row: each official
implementation's loss, transcribed here from its published code (their class
matrix [D, C] where theirs is, their clamps, their in-place no_grad edits),
against the exact call the table gives, on the same numbers: the loss and the
gradients of the embeddings and of the class matrix."""
import math

import pytest
import torch
import torch.nn.functional as F

import margin_kernels as mk

from conftest import rel_err
from test_mv_softmax import facex_zoo_loss
from test_partial_fc import CombinedMarginLoss, classic_arcface

B, D, C = 16, 8, 20


def problem(seed: int = 0, norm: float = 1.0):
    """Embeddings (norms around ``norm``), a class matrix [D, C] as the
    official heads store it, labels; no cosine near +-1, where the official
    clamps would differ from the plain formulas."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g) * norm * (0.5 + torch.rand(B, 1, generator=g))
    w = torch.randn(D, C, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    # row 0 at cos theta_y = -0.97: theta + m passes pi, where the rules for it differ
    u = F.normalize(w[:, y[0]], dim=0)
    v = F.normalize(torch.randn(D, generator=g) - u * (u @ torch.randn(D, generator=g)), dim=0)
    v = F.normalize(v - u * (u @ v), dim=0)
    x[0] = x[0].norm() * (-0.97 * u + math.sqrt(1 - 0.97**2) * v)
    return x, w, y


def cosines(x, w):
    return F.normalize(x, dim=1) @ F.normalize(w, dim=0)


def compare(ours_head, theirs_loss, x, w, y, tol=1e-4):
    """Our head (its weight = their matrix transposed) against their loss."""
    with torch.no_grad():
        ours_head.weight.copy_(w.t())
    xa = x.clone().requires_grad_(True)
    ours = ours_head(xa, y)
    ours.backward()
    xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = theirs_loss(xb, wb, y)
    ref.backward()
    assert rel_err(ours.detach(), ref.detach()) < tol, (float(ours), float(ref))
    assert rel_err(xa.grad, xb.grad) < tol
    assert rel_err(ours_head.weight.grad, wb.grad.t()) < tol


# ---------------------------------------------------------------- insightface

def test_insightface_arcface_since_december_2022():
    theirs = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    compare(mk.nn.ArcFace(D, C, overflow="none", detach_margin=True),
            lambda x, w, y: F.cross_entropy(theirs(cosines(x, w).clamp(-1, 1), y), y), *problem())


def test_insightface_arcface_before_december_2022():
    compare(mk.nn.ArcFace(D, C),
            lambda x, w, y: F.cross_entropy(classic_arcface(cosines(x, w).clamp(-1, 1), y, 64.0, 0.5), y),
            *problem(1))


def test_insightface_cosface():
    theirs = CombinedMarginLoss(64.0, 1.0, 0.0, 0.4)
    compare(mk.nn.CosFace(D, C, m=0.4),
            lambda x, w, y: F.cross_entropy(theirs(cosines(x, w).clamp(-1, 1), y), y), *problem(2))


def test_insightface_subcenter_arcface():
    """fc7 [B, C K] viewed as [B, C, K], max over K, then ArcFace (classic)."""
    k = 3

    def theirs(x, w, y):
        cos = cosines(x, w).view(B, C, k).max(dim=2).values
        return F.cross_entropy(classic_arcface(cos.clamp(-1, 1), y, 64.0, 0.5), y)

    g = torch.Generator().manual_seed(3)
    x, w, y = torch.randn(B, D, generator=g), torch.randn(D, C * k, generator=g), torch.randint(0, C, (B,), generator=g)
    compare(mk.nn.ArcFace(D, C, subcenters=3), theirs, x, w, y)


# ---------------------------------------------------------------- AdaFace

def adaface_loss(x, w, y, *, straight_through: bool, clip_angle: bool, clamp_all: bool, batch_mean=20.0,
                 batch_std=100.0, m=0.4, h=0.333, s=64.0, t_alpha=0.01):
    """AdaFace's margin as head.py computes it (clip_angle, clamp_all: every
    cosine clamped to +-(1 - 1e-3), the margin with its true gradient) and as
    CVLface's AdaFaceLoss does (the target replaced under no_grad: a
    straight-through gradient; no angle clip)."""
    eps = 1e-3
    norms = x.norm(dim=1, keepdim=True)
    cos = cosines(x, w)
    cos = cos.clamp(-1 + eps, 1 - eps) if clamp_all else cos.clamp(-1, 1)
    safe = norms.clip(0.001, 100).detach()
    mean = safe.mean() * t_alpha + (1 - t_alpha) * batch_mean
    std = safe.std() * t_alpha + (1 - t_alpha) * batch_std
    scaler = ((safe - mean) / (std + eps) * h).clip(-1, 1).view(-1)
    rows = torch.arange(B)
    if straight_through:
        with torch.no_grad():
            theta = cos[rows, y].acos() - m * scaler
            cos[rows, y] = theta.cos() - (m + m * scaler)
        return F.cross_entropy(cos * s, y)
    theta = cos.acos()
    theta_m = theta + F.one_hot(y, C) * (-m * scaler)[:, None]
    if clip_angle:
        theta_m = theta_m.clip(eps, math.pi - eps)
    logits = theta_m.cos() - F.one_hot(y, C) * (m + m * scaler)[:, None]
    return F.cross_entropy(logits * s, y)


def test_adaface_head_py():
    compare(mk.nn.AdaFace(D, C), lambda x, w, y: adaface_loss(x, w, y, straight_through=False, clip_angle=True,
                                                              clamp_all=True), *problem(4, norm=20.0))


def test_cvlface_adaface():
    compare(mk.nn.AdaFace(D, C, overflow="none", detach_margin=True),
            lambda x, w, y: adaface_loss(x, w, y, straight_through=True, clip_angle=False, clamp_all=False),
            *problem(5, norm=20.0))


# ---------------------------------------------------------------- MagFace, CurricularFace, ElasticFace

def test_magface():
    """MagLinear (easy margin) and MagLoss: CE of s cos(theta + m(a)) plus
    lambda_g (a / u_a^2 + 1 / a), a = clamp(||x||, l_a, u_a)."""
    s, l_a, u_a, l_m, u_m, lambda_g = 64.0, 10.0, 110.0, 0.45, 0.8, 35.0

    def theirs(x, w, y):
        a = x.norm(dim=1, keepdim=True).clamp(l_a, u_a)
        margin = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
        cos = cosines(x, w).clamp(-1, 1)
        sin = (1.0 - cos.pow(2)).sqrt()
        cos_m = cos * torch.cos(margin) - sin * torch.sin(margin)
        cos_m = torch.where(cos > 0, cos_m, cos)  # the easy margin
        logits = torch.where(F.one_hot(y, C).bool(), cos_m, cos) * s
        g = (a / u_a**2 + 1 / a).mean()
        return F.cross_entropy(logits, y) + lambda_g * g

    compare(mk.nn.MagFace(D, C), theirs, *problem(6, norm=40.0))


def test_curricularface():
    m, s = 0.5, 64.0
    cos_m, sin_m, th, mm = math.cos(m), math.sin(m), math.cos(math.pi - m), math.sin(math.pi - m) * m

    def theirs(x, w, y):
        cos = cosines(x, w).clamp(-1, 1)
        target = cos[torch.arange(B), y].view(-1, 1)
        sin = torch.sqrt(1.0 - target.pow(2))
        cos_theta_m = target * cos_m - sin * sin_m
        mask = cos > cos_theta_m
        final_target = torch.where(target > th, cos_theta_m, target - mm)
        t = target.mean().detach() * 0.01 + (1 - 0.01) * 0.0  # the buffer starts at 0
        hard = cos[mask]
        cos = cos.clone()
        cos[mask] = hard * (t + hard)
        cos = cos.scatter(1, y.view(-1, 1), final_target)
        return F.cross_entropy(cos * s, y)

    compare(mk.nn.CurricularFace(D, C), theirs, *problem(7))


def test_elasticface_arc():
    """ElasticFace-Arc: per row m ~ N(0.5, 0.05) added to the target angle,
    no rule past pi. The draws are the head's (its generator), replayed in
    theirs."""
    head = mk.nn.ElasticArcFace(D, C, overflow="none", generator=torch.Generator().manual_seed(0))
    x, w, y = problem(8)
    drawn = {}

    def theirs(xb, wb, yb):
        margins = head.last_margins.m2
        cos = cosines(xb, wb).clamp(-1, 1)
        theta = cos.acos() + F.one_hot(yb, C) * margins[:, None]
        drawn["m"] = margins
        return F.cross_entropy(theta.cos() * 64.0, yb)

    compare(head, theirs, x, w, y)
    assert 0.3 < float(drawn["m"].mean()) < 0.7 and float(drawn["m"].std()) > 0


# ---------------------------------------------------------------- pytorch-metric-learning, FaceX-Zoo

def test_pytorch_metric_learning_arcface():
    """ArcFaceLoss(num_classes, embedding_size, margin=28.6 degrees, scale=64):
    W [D, C], cos(acos(clamp(c, -1 + 1e-7, 1 - 1e-7)) + m), the mean over rows."""
    m = math.radians(28.6)

    def theirs(x, w, y):
        cos = (x @ F.normalize(w, dim=0)) / x.norm(dim=1, keepdim=True)
        target = cos[torch.arange(B), y]
        modified = torch.cos(torch.acos(target.clamp(-1 + 1e-7, 1 - 1e-7)) + m)
        cos = cos + F.one_hot(y, C) * (modified - target)[:, None]
        return F.cross_entropy(cos * 64.0, y)

    compare(mk.nn.ArcFace(D, C, m=math.radians(28.6), overflow="none"), theirs, *problem(9))


def test_pytorch_metric_learning_cosface():
    def theirs(x, w, y):
        cos = (x @ F.normalize(w, dim=0)) / x.norm(dim=1, keepdim=True)
        return F.cross_entropy((cos - 0.35 * F.one_hot(y, C)) * 64.0, y)

    compare(mk.nn.CosFace(D, C), theirs, *problem(10))


@pytest.mark.parametrize("form", ["am", "arc"])
def test_facex_zoo_mv_softmax(form):
    # (the transcription takes the matrix as [C, D])
    compare(mk.nn.MVSoftmax(D, C, form=form),
            lambda x, w, y: facex_zoo_loss(x, w.t(), y, is_am=form == "am"), *problem(11))
