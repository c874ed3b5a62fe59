"""The target angle's derivative where cos rounds to +-1. In float32 any angle
below ~2.4e-4 has cos = +-1 exactly, so 1 - c^2 carries no information; the
gradient must come from the vectors. Every path, in float32, against the
reference in float64 on the same inputs."""
import math

import pytest
import torch

import margin_kernels as mk
from margin_kernels import backends

from conftest import backend_device, rel_err, requires_cpp

pytestmark = requires_cpp

PATHS = [("cpp", True), ("cpp", False)] + ([("triton", True)] if backends.is_available("triton") else [])
ANGLES = [1e-3, 1e-4, 1e-5, 1e-6, 1e-7]


def problem(angle: float, flip: bool):
    """x at ``angle`` from its class's weight row (or pi minus it), plus a second
    class near both (as in W = [[1,0,0,0],[1,0,.1,0]], x = [[1,1e-4,0,0]])."""
    w = torch.tensor([[-1.0 if flip else 1.0, 0, 0, 0], [1.0, 0, 0.1, 0]], dtype=torch.float64)
    x = torch.tensor([[1.0, math.tan(angle), 0, 0], [0.3, -0.2, 0.9, 0.1]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    return x.float(), w.float(), y


def grads(x, w, y, margin, backend, weight_grad=True, dtype=None):
    xg = x.to(dtype or x.dtype).clone().requires_grad_(True)
    wg = w.to(dtype or w.dtype).clone().requires_grad_(weight_grad)
    loss = mk.margin_cross_entropy(xg, wg, y, margin, backend=backend)
    loss.backward()
    return loss.detach(), xg.grad, wg.grad


@pytest.mark.parametrize("backend, weight_grad", PATHS)
@pytest.mark.parametrize("flip", [False, True], ids=["theta", "pi-theta"])
@pytest.mark.parametrize("angle", ANGLES)
def test_gradient_at_tiny_angles_matches_float64(backend, weight_grad, flip, angle):
    """cpp with weight_grad=True takes the single-pass path, without it the
    class-blocked one. ArcFace without the overflow rule: at pi - theta the
    slope m sin(theta + m) / sin(theta) is steep too."""
    margin = mk.ArcFace(overflow="none")
    x, w, y = problem(angle, flip)
    ref_loss, ref_dx, ref_dw = grads(x, w, y, margin, "reference", dtype=torch.float64)
    dev = backend_device(backend)
    loss, dx, dw = grads(x.to(dev), w.to(dev), y.to(dev), margin, backend, weight_grad)
    assert rel_err(loss.cpu(), ref_loss) < 1e-5
    assert rel_err(dx.cpu(), ref_dx) < 1e-4, (dx, ref_dx)
    if weight_grad:
        assert rel_err(dw.cpu(), ref_dw) < 1e-4, (dw, ref_dw)


def test_the_reported_case():
    """dx[1] was 3067 against 30.67 in float64 (a 1e-6 floor on sin(theta) where
    float32 has cos = 1 for an angle of 1e-4)."""
    w = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0.1, 0]])
    x = torch.tensor([[1.0, 1e-4, 0, 0]])
    y = torch.tensor([0])
    _, ref_dx, _ = grads(x, w, y, mk.ArcFace(), "reference", dtype=torch.float64)
    assert abs(float(ref_dx[0, 1]) - 30.67) < 0.01
    for backend in ("reference", "cpp"):
        _, dx, _ = grads(x, w, y, mk.ArcFace(), backend)
        assert abs(float(dx[0, 1]) - float(ref_dx[0, 1])) < 1e-3 * abs(float(ref_dx[0, 1])), backend


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_partial_fc_at_tiny_angles(sample_rate):
    x, w, y = problem(1e-6, False)
    pfc = mk.PartialFC(4, 2, mk.ArcFace(overflow="none"), sample_rate=sample_rate,
                       generator=torch.Generator().manual_seed(0))
    pfc.load_state_dict({"weight": w})
    xg = x.clone().requires_grad_(True)
    pfc(xg, y).backward()
    _, ref_dx, ref_dw = grads(x, w, y, mk.ArcFace(overflow="none"), "reference", dtype=torch.float64)
    assert rel_err(xg.grad, ref_dx) < 1e-4
    assert rel_err(pfc.weight.grad, ref_dw) < 1e-4
