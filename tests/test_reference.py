"""The oracle itself: float64 gradcheck and agreement with textbook formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

import margin_kernels as mk
from margin_kernels import reference

from conftest import ALL_MARGINS, make_problem


@pytest.mark.parametrize("name", [n for n in ALL_MARGINS if n != "ArcFace-detach"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(name, reduction):
    margin = ALL_MARGINS[name]
    x, w, y = make_problem(5, 7, 11, dtype=torch.float64, ignore=(2,))
    x.requires_grad_(True)
    w.requires_grad_(True)
    margins = mk.draw_margins(x, w, y, margin, generator=torch.Generator().manual_seed(0))

    def f(x, w):
        return mk.margin_cross_entropy(x, w, y, margin, backend="reference", reduction=reduction, margins=margins)

    assert torch.autograd.gradcheck(f, (x, w), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_normsoftmax_is_scaled_cosine_cross_entropy():
    x, w, y = make_problem(9, 16, 30)
    cos = F.normalize(x) @ F.normalize(w).t()
    expected = F.cross_entropy(30.0 * cos, y)
    got = mk.margin_cross_entropy(x, w, y, mk.NormSoftmax(s=30.0), backend="reference")
    assert torch.allclose(got, expected, rtol=1e-6)


def test_arcface_matches_the_published_formula():
    """insightface / ArcFace paper: phi = cos(theta + m) with the th/mm fallback."""
    x, w, y = make_problem(16, 8, 5, seed=3)
    s, m = 64.0, 0.5
    cos = F.normalize(x) @ F.normalize(w).t()
    sine = torch.sqrt((1.0 - cos**2).clamp(0, 1))
    phi = cos * math.cos(m) - sine * math.sin(m)
    phi = torch.where(cos > math.cos(math.pi - m), phi, cos - math.sin(math.pi - m) * m)
    onehot = F.one_hot(y, 5).bool()
    expected = F.cross_entropy(s * torch.where(onehot, phi, cos), y)
    got = mk.margin_cross_entropy(x, w, y, mk.ArcFace(s, m), backend="reference")
    assert torch.allclose(got, expected, rtol=1e-5)


def test_no_probability_ceiling():
    """Loss is lse - z_y, not -log(clamp(p, 1e-30)): it can exceed 69.08."""
    w = torch.eye(4)
    x = torch.tensor([[-1.0, 1.0, 0.0, 0.0]])  # target class 0 is anti-aligned
    loss = mk.margin_cross_entropy(x, w, torch.tensor([0]), mk.CosFace(s=64.0, m=0.35), backend="reference")
    assert loss.item() > 69.08


def test_all_rows_ignored_gives_zero_not_nan():
    x, w, y = make_problem(4, 6, 9, ignore=(0, 1, 2, 3))
    x.requires_grad_(True)
    loss = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="reference")
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)


def test_detach_margin_is_a_constant_offset():
    """detach_margin's gradient is that of z_y = s (c + delta) with delta = t - c frozen,
    i.e. a per-row additive cosine margin m3 = c - t (gradcheck cannot be its oracle)."""
    x, w, y = make_problem(6, 5, 7, dtype=torch.float64, seed=4)
    spec = mk.ArcFace(detach_margin=True)
    cos_y = (F.normalize(x) * F.normalize(w)[y]).sum(1)
    t = reference._margin_target(cos_y, F.normalize(x), F.normalize(w)[y], spec.row_margins(6, cos_target=None),
                                 "classic", False, False)
    offset = mk.RowMargins(torch.ones(6), torch.zeros(6), (cos_y - t).detach())
    grads = []
    for margin, margins in [(spec, None), (mk.CosFace(), offset)]:
        xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        mk.margin_cross_entropy(xl, wl, y, margin, backend="reference", margins=margins).backward()
        grads.append((xl.grad, wl.grad))
    assert torch.allclose(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1])
