"""No input from Python crashes the process or gives a silently wrong answer:
per-row margins and the C++ entry points are checked, a double backward through
a fused path raises, a frozen weight gets no gradient (and costs no dW), and
every option outside its meaning is a named error."""
import math

import pytest
import torch

import margin_kernels as mk
from margin_kernels import backends

from conftest import backend_device, loss_and_grads, make_problem, rel_err, requires_cpp

FUSED = ["cpp"] + (["triton"] if backends.is_available("triton") else [])
ALL = ["reference"] + FUSED


def margins_of(b, m1=1.0, m2=0.5, m3=0.0):
    full = lambda v: torch.full((b,), v)  # noqa: E731
    return mk.RowMargins(full(m1), full(m2), full(m3))


# ---------------------------------------------------------------- margins=

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("bad, exc, match", [
    (lambda b: mk.RowMargins(torch.empty(0), torch.empty(0), torch.empty(0)), ValueError,
     r"margins.m1 must have shape \[B\] = \[1\]"),
    (lambda b: mk.RowMargins(*(torch.zeros(b, 1),) * 3), ValueError, r"margins.m1 must have shape \[B\]"),
    (lambda b: margins_of(b + 1), ValueError, r"margins.m1 must have shape \[B\]"),
    (lambda b: mk.RowMargins(torch.ones(b), torch.full((b,), float("nan")), torch.zeros(b)), ValueError,
     "margins.m2 contains NaN"),
    (lambda b: mk.RowMargins(torch.ones(b, dtype=torch.long), torch.zeros(b), torch.zeros(b)), TypeError,
     "margins.m1 must be a floating"),
    (lambda b: (torch.ones(b), torch.zeros(b)), TypeError, "margins must be a RowMargins"),
    (lambda b: mk.RowMargins(torch.ones(b), [0.5] * b, torch.zeros(b)), TypeError, "margins.m2 must be a torch.Tensor"),
])
def test_bad_margins_are_named_errors(backend, bad, exc, match):
    """B=1 with empty margins used to kill the process on cpp (SIGSEGV); [B, 1]
    margins made cpp return a number where the reference raised."""
    x, w, y = make_problem(1, 8, 10)
    with pytest.raises(exc, match=match):
        mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend=backend, margins=bad(1))


@requires_cpp
def test_cpp_entry_points_check_every_tensor():
    """The extension raises on any tensor of the wrong shape, dtype or layout
    instead of reading out of bounds."""
    from margin_kernels import _C

    b, d, c = 4, 8, 10
    x = torch.nn.functional.normalize(torch.randn(b, d))
    w = torch.randn(c, d)
    inv = _C.row_inv_norms(w, 1e-12)
    lab = torch.zeros(b, dtype=torch.long)
    vec = torch.zeros(b)
    good = dict(x_hat=x, weight=w, w_inv=inv, labels_local=lab, target_logit=vec, scale=1.0, block_classes=4)
    assert _C.lse_forward(**good).shape == (b,)
    for key, value, match in [
        ("target_logit", torch.zeros(b - 1), "target_logit must be a vector of 4"),
        ("target_logit", torch.zeros(b, 1), "target_logit must be a vector of 4"),
        ("target_logit", torch.zeros(b, dtype=torch.float64), "target_logit must be Float"),
        ("w_inv", inv[:-1], "w_inv must be a vector of 10"),
        ("labels_local", lab.int(), "labels_local must be a contiguous int64"),
        ("x_hat", x.t().contiguous().t(), "x_hat must be a contiguous float32"),
        ("block_classes", 0, "block_classes must be >= 1"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            _C.lse_forward(**dict(good, **{key: value}))
    with pytest.raises(RuntimeError, match="class_index entries must be rows of weight"):
        _C.lse_forward(**dict(good, w_inv=inv[:2]), class_index=torch.tensor([0, c]))
    args = (x, w, inv, lab, vec, vec, 1.0, 4)
    assert _C.lse_backward(*args)[1].shape == (c, d)
    with pytest.raises(RuntimeError, match="grad_rows must be a vector of 4"):
        _C.lse_backward(*args[:5], torch.zeros(2), 1.0, 4)
    with pytest.raises(RuntimeError, match="lse must be a vector of 4"):
        _C.lse_backward(x, w, inv, lab, torch.zeros(3), vec, 1.0, 4)
    with pytest.raises(RuntimeError, match="grad_rows must be a vector"):
        _C.single_pass(x, w, inv, lab, vec, torch.zeros(3), 1.0, 2)


# ---------------------------------------------------------------- double backward

@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_double_backward_through_a_fused_path_raises(backend, reduction):
    """A gradient penalty (create_graph=True) used to give cpp's single-pass
    path a second derivative off by up to 50 with no error."""
    device = backend_device(backend)
    x, w, y = (t.to(device) for t in make_problem(16, 8, 30))
    x.requires_grad_(True)
    w.requires_grad_(True)
    loss = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend=backend, reduction=reduction).sum()
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\) through a fused backend"):
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        gx.pow(2).sum().backward()


def test_double_backward_through_partial_fc_raises():
    """PartialFC's backward returned its gradients as constants under
    create_graph=True: a second derivative silently missing their terms."""
    pfc = mk.PartialFC(8, 30, mk.ArcFace())
    x, _, y = make_problem(16, 8, 30)
    x.requires_grad_(True)
    loss = pfc(x, y)
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\) through a fused backend"):
        torch.autograd.grad(loss, x, create_graph=True)


# ---------------------------------------------------------------- frozen weight

class Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Sizes of every new tensor an op returns: views and in-place writes of
    existing tensors aside (the kernels slice the weight into class blocks,
    Triton's interpreter rebinds its arguments' storage: no new memory)."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._schema.is_mutable:
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numels.append(t.numel())
        return out


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_weight_costs_no_weight_gradient(backend, reduction):
    """A weight that needs no gradient: dx is exact, and no [C, D] tensor is
    made (the dW products are skipped)."""
    device = backend_device(backend)
    b, d, c = 12, 16, 400
    x, w, y = (t.to(device) for t in make_problem(b, d, c, seed=2))
    ref = loss_and_grads(x.cpu(), w.cpu(), y.cpu(), mk.ArcFace(), backend="reference", reduction=reduction)
    xr = x.clone().requires_grad_(True)
    with Allocations() as mode:
        loss = mk.margin_cross_entropy(xr, w, y, mk.ArcFace(), backend=backend, reduction=reduction)
        torch.manual_seed(7)
        upstream = torch.rand_like(loss) if loss.dim() else torch.ones_like(loss)
        (loss * upstream).sum().backward()
    assert w.grad is None
    assert max(mode.numels) < c * d, max(mode.numels)
    assert rel_err(xr.grad.cpu(), ref[1]) < 1e-5


@requires_cpp
@pytest.mark.parametrize("sample_rate", [1.0, 0.3])
def test_partial_fc_leaves_a_frozen_weight_alone(sample_rate):
    """With sampling, backward used to create a dense weight.grad for a weight
    with requires_grad=False, and opt.step() moved it."""
    pfc = mk.PartialFC(8, 50, mk.ArcFace(), sample_rate=sample_rate, generator=torch.Generator().manual_seed(0))
    pfc.weight.requires_grad_(False)
    before = pfc.weight.clone()
    x = torch.randn(6, 8, requires_grad=True)
    opt = torch.optim.SGD([pfc.weight, x], lr=0.1, momentum=0.9)
    pfc(x, torch.randint(0, 50, (6,))).backward()
    opt.step()
    assert pfc.weight.grad is None and torch.equal(pfc.weight, before)
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- options

@pytest.mark.parametrize("value, exc", [(0, ValueError), (-5, ValueError), (1.5, TypeError), ("64", TypeError),
                                        (True, TypeError)])
def test_workspace_bytes_must_be_a_positive_int(value, exc):
    x, w, y = make_problem(4, 8, 10)
    with pytest.raises(exc, match="workspace_bytes"):
        mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="cpp", workspace_bytes=value)
    with pytest.raises(exc, match="workspace_bytes"):
        mk.PartialFC(8, 10, mk.ArcFace(), workspace_bytes=value)


def test_workspace_variable_is_read_at_call_time_and_named(monkeypatch):
    x, w, y = make_problem(4, 8, 10)
    monkeypatch.setenv("MARGIN_KERNELS_WORKSPACE_MB", "lots")
    with pytest.raises(ValueError, match="MARGIN_KERNELS_WORKSPACE_MB must be a number of MiB, got 'lots'"):
        mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="cpp")
    monkeypatch.setenv("MARGIN_KERNELS_WORKSPACE_MB", "-1")
    with pytest.raises(ValueError, match="MARGIN_KERNELS_WORKSPACE_MB must be a positive"):
        mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="cpp")
    monkeypatch.setenv("MARGIN_KERNELS_WORKSPACE_MB", "0.001")  # ~1 KiB: tiny blocks, same answer
    small = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="cpp")
    monkeypatch.delenv("MARGIN_KERNELS_WORKSPACE_MB")
    assert torch.allclose(small, mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="cpp"))


@pytest.mark.parametrize("make, match", [
    (lambda: mk.ArcFace(m=4.0), r"m must be in \[0, 1.571\)"),
    (lambda: mk.ArcFace(m=-0.1), r"m must be in \[0, 1.571\)"),
    (lambda: mk.CosFace(m=1.5), r"m must be in \[0, 1\)"),
    (lambda: mk.CombinedMargin(m2=math.pi / 2), r"m2 must be in"),
    (lambda: mk.CombinedMargin(m3=-0.2), r"m3 must be in"),
    (lambda: mk.ElasticArcFace(m=2.0), r"m must be in"),
    (lambda: mk.ElasticCosFace(m=1.0), r"m must be in"),
    (lambda: mk.ArcFace(s=3e38), r"s must be > 0 and <= 10000"),
    (lambda: mk.ArcFace(m=True), r"m must be a finite number"),
])
def test_margins_outside_their_meaning_are_rejected(make, match):
    """ArcFace m=4 turned the margin into a bonus; s=3e38 gave NaN on cpp and
    inf on the reference."""
    with pytest.raises(ValueError, match=match):
        make()


def test_allow_any_margin_lifts_the_range_checks():
    spec = mk.ArcFace(m=2.0, allow_any_margin=True)
    x, w, y = make_problem(4, 8, 10)
    a = mk.margin_cross_entropy(x, w, y, spec, backend="cpp")
    b = mk.margin_cross_entropy(x, w, y, spec, backend="reference")
    assert torch.allclose(a, b, rtol=1e-5)


def test_zero_features_is_a_named_error():
    with pytest.raises(ValueError, match="embeddings must have D >= 1"):
        mk.margin_cross_entropy(torch.zeros(4, 0), torch.zeros(10, 0), torch.zeros(4, dtype=torch.long), mk.ArcFace())


@pytest.mark.parametrize("margin", [mk.ArcFace(), mk.CosFace(), mk.ElasticArcFace()])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_meta_tensors_plan_shapes(margin, reduction):
    """The public function works on meta tensors (it used to call .item())."""
    x = torch.empty(6, 8, device="meta", requires_grad=True)
    w = torch.empty(20, 8, device="meta", requires_grad=True)
    y = torch.empty(6, dtype=torch.long, device="meta")
    loss = mk.margin_cross_entropy(x, w, y, margin, reduction=reduction)
    assert loss.device.type == "meta" and loss.shape == (() if reduction == "mean" else (6,))
    loss.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_is_available_answers_for_every_backend():
    assert backends.is_available("reference") is True
    assert backends.is_available("cpp") in (True, False)
    assert backends.is_available("nonsense") is False


@pytest.mark.skipif(not backends.is_available("triton"), reason="triton backend unavailable")
@pytest.mark.parametrize("tf32", [False, True])
def test_tf32_reaches_the_kernels(tf32, monkeypatch):
    """KernelOptions(tf32=True) turns the float32 kernels' IEEE dots off (its
    effect on the numbers is for a GPU: the interpreter computes in fp32)."""
    from margin_kernels.backends import triton_backend as tb

    seen = []
    real = tb.Launch.flags

    def flags(self, kind, **more):
        out = real(self, kind, **more)
        seen.append(out["IEEE"])
        return out

    monkeypatch.setattr(tb.Launch, "flags", flags)
    x, w, y = make_problem(5, 8, 20)
    mk.margin_cross_entropy(x, w.requires_grad_(True), y, mk.ArcFace(), backend="triton",
                            options=mk.KernelOptions(tf32=tf32)).backward()
    assert seen and all(ieee == (not tf32) for ieee in seen)
