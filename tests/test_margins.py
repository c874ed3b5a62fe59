"""Margin specs, per-row draws and the target transform t(c), dt/dc."""
import math

import pytest
import torch

import margin_kernels as mk
from margin_kernels.margins import RowMargins, target_logit
from margin_kernels.reference import _margin_target


def triple(b, m1, m2, m3, dtype=torch.float64):
    return RowMargins(*(torch.full((b,), float(v), dtype=dtype) for v in (m1, m2, m3)))


def reference_target(c, margins, overflow, easy, detach):
    """The reference's t as a function of the cosine c: x_hat = e1 and w_hat on
    the unit circle at cos = c, so that autograd gives dt/dc."""
    x_hat = torch.zeros(c.shape[0], 2, dtype=c.dtype)
    x_hat[:, 0] = 1
    w_hat = torch.stack([c, (1 - c * c).sqrt()], dim=1)
    return _margin_target((x_hat * w_hat).sum(1), x_hat, w_hat, margins, overflow, easy, detach)


def test_defaults_follow_the_design_table():
    assert (mk.NormSoftmax().s, mk.NormSoftmax().fixed_triple()) == (64.0, (1.0, 0.0, 0.0))
    assert mk.CosFace().fixed_triple() == (1.0, 0.0, 0.35)
    assert mk.ArcFace().fixed_triple() == (1.0, 0.5, 0.0)
    assert mk.SphereFace().fixed_triple() == (1.5, 0.0, 0.0)
    assert mk.CombinedMargin().fixed_triple() == (1.0, 0.5, 0.0)
    assert (mk.ElasticArcFace().m, mk.ElasticArcFace().std) == (0.5, 0.05)
    assert (mk.ElasticCosFace().m, mk.ElasticCosFace().std) == (0.35, 0.05)
    assert mk.ElasticArcFace(plus=True).std == 0.0175
    assert mk.ElasticCosFace(plus=True).std == 0.025
    assert mk.CosFace(30.0, 0.4) == mk.CosFace(s=30.0, m=0.4)  # positional (s, m)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: mk.ArcFace(s=0.0), "s must be > 0"),
        (lambda: mk.CosFace(s=-1.0), "s must be > 0"),
        (lambda: mk.ArcFace(m=float("nan")), "m must be a finite"),
        (lambda: mk.CombinedMargin(m1=0.5), "m1 must be >= 1"),
        (lambda: mk.CombinedMargin(m3=float("inf")), "m3 must be a finite"),
        (lambda: mk.SphereFace(m=0.9), "m must be >= 1"),
        (lambda: mk.ElasticArcFace(std=-0.1), "std must be >= 0"),
        (lambda: mk.ArcFace(overflow="wrap"), "overflow must be"),
    ],
)
def test_bad_parameters_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_arcface_and_cosface_values():
    c = torch.tensor([0.9, 0.3, -0.2], dtype=torch.float64)
    t, slope = target_logit(c, triple(3, 1, 0.5, 0), overflow="none")
    assert torch.allclose(t, torch.cos(torch.acos(c) + 0.5))
    t, slope = target_logit(c, triple(3, 1, 0, 0.35))
    assert torch.allclose(t, c - 0.35) and torch.all(slope == 1)


def test_all_three_terms_apply_at_once():
    c = torch.tensor([0.7], dtype=torch.float64)
    t, _ = target_logit(c, triple(1, 1.2, 0.3, 0.1))
    assert torch.allclose(t, torch.cos(1.2 * torch.acos(c) + 0.3) - 0.1)


def test_classic_overflow_is_arcface_rule():
    """For m1 = 1 the fallback is the original ArcFace th / mm rule."""
    m = 0.5
    c = torch.linspace(-1, 1, 401, dtype=torch.float64)
    t, slope = target_logit(c, triple(c.numel(), 1, m, 0))
    th, mm = math.cos(math.pi - m), math.sin(math.pi - m) * m
    phi = c * math.cos(m) - torch.sqrt(1 - c**2) * math.sin(m)
    expected = torch.where(c > th, phi, c - mm)
    assert torch.allclose(t, expected, atol=1e-12)
    assert torch.all(slope[c < th] == 1)


def test_easy_margin_only_where_cos_positive():
    c = torch.tensor([-0.5, 0.0, 0.5], dtype=torch.float64)
    t, slope = target_logit(c, triple(3, 1, 0.5, 0), easy_margin=True)
    assert t[0] == c[0] and t[1] == c[1] and torch.isclose(t[2], torch.cos(torch.acos(c[2]) + 0.5))
    assert slope[0] == 1 and slope[1] == 1


@pytest.mark.parametrize("overflow", ["classic", "none"])
@pytest.mark.parametrize("easy", [False, True])
@pytest.mark.parametrize("m", [(1, 0.5, 0), (1.35, 0.2, 0.1), (1.5, 0, 0), (1, 0, 0.35)])
def test_slope_is_the_derivative_of_t(overflow, easy, m):
    """The analytic dt/dc the kernels use equals autograd through the reference."""
    c = torch.linspace(-0.995, 0.995, 157, dtype=torch.float64).requires_grad_(True)
    margins = triple(c.numel(), *m)
    t_ref = reference_target(c, margins, overflow, easy, False)
    (grad,) = torch.autograd.grad(t_ref.sum(), c)
    t, slope = target_logit(c.detach(), margins, overflow=overflow, easy_margin=easy)
    assert torch.allclose(t, t_ref.detach(), atol=1e-12)
    assert torch.allclose(slope, grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("m", [(1, 0.5, 0), (1.5, 0, 0), (1, 0, 0.35), (1.2, 0.3, 0.1)])
@pytest.mark.parametrize("overflow", ["classic", "none"])
def test_slope_finite_at_the_poles(m, overflow):
    """At cos = +-1 exactly (and past it) t and the slope stay finite; the fused
    paths multiply the slope by a direction that is zero there."""
    c = torch.tensor([-1.0, -1.0 + 1e-7, 1.0 - 1e-7, 1.0, 1.0000001])
    t, slope = target_logit(c, triple(5, *m, dtype=torch.float32), overflow=overflow)
    assert torch.isfinite(t).all() and torch.isfinite(slope).all()
    sin = torch.tensor([0.0, 4.5e-4, 4.5e-4, 0.0, 0.0])  # from the vectors
    t2, slope2 = target_logit(c, triple(5, *m, dtype=torch.float32), overflow=overflow, sin_target=sin)
    assert torch.isfinite(t2).all() and torch.isfinite(slope2).all()


def test_detach_margin_slope_is_one():
    c = torch.tensor([0.1, 0.8], dtype=torch.float64)
    _, slope = target_logit(c, triple(2, 1, 0.5, 0), detach_margin=True)
    assert torch.all(slope == 1)


def test_elastic_draws_reproduce_with_a_seed():
    spec = mk.ElasticArcFace()
    a = spec.row_margins(64, generator=torch.Generator().manual_seed(5))
    b = spec.row_margins(64, generator=torch.Generator().manual_seed(5))
    c = spec.row_margins(64, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.m2, b.m2) and not torch.equal(a.m2, c.m2)
    assert abs(a.m2.mean().item() - 0.5) < 0.03 and torch.all(a.m1 == 1) and torch.all(a.m3 == 0)


@pytest.mark.parametrize("spec", [mk.ElasticArcFace(plus=True), mk.ElasticCosFace(plus=True, std=0.1)])
def test_plus_order_is_monotone(spec):
    """Lower target cosine -> larger margin, over the rows that are not ignored."""
    torch.manual_seed(0)
    cos = torch.rand(50) * 2 - 1
    valid = torch.ones(50, dtype=torch.bool)
    valid[[3, 17]] = False
    rm = spec.row_margins(50, cos_target=cos, valid=valid, generator=torch.Generator().manual_seed(1))
    m = rm.m2 if isinstance(spec, mk.ElasticArcFace) else rm.m3
    order = torch.argsort(cos[valid])
    assert torch.all(torch.diff(m[valid][order]) <= 0)


def test_plus_needs_cosines():
    with pytest.raises(ValueError, match="cos_target"):
        mk.ElasticArcFace(plus=True).row_margins(4)
