"""The Triton backend against the reference. Without a GPU the kernels run under
TRITON_INTERPRET=1 on CPU tensors (set in conftest.py); on a CUDA machine the same
tests run on the GPU."""
import pytest
import torch

import margin_kernels as mk
from margin_kernels import backends

from conftest import ALL_MARGINS, assert_low_precision, loss_and_grads, make_problem, rel_err, row_err

pytestmark = pytest.mark.skipif(not backends.is_available("triton"), reason="triton backend unavailable")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
FP32_TOL = 1e-5
SHAPE = (37, 72, 1000)  # odd: no dimension a multiple of any block


@pytest.fixture(autouse=True, params=["atomic", pytest.param("split", marks=pytest.mark.slow)])
def backward_strategy(request, monkeypatch):
    """Every test runs with both backward strategies, through their documented
    default (read at call time)."""
    monkeypatch.setenv("MARGIN_KERNELS_TRITON_BACKWARD", request.param)
    return request.param


def test_unknown_backward_strategy_is_a_clear_error(monkeypatch):
    x, w, y = make_problem(4, 8, 10)
    with pytest.raises(ValueError, match="triton_backward must be one of"):
        mk.KernelOptions(triton_backward="atomics")
    monkeypatch.setenv("MARGIN_KERNELS_TRITON_BACKWARD", "atomics")
    with pytest.raises(ValueError, match="MARGIN_KERNELS_TRITON_BACKWARD must be one of"):
        loss_and_grads(*(t.to(DEVICE) for t in (x, w, y)), mk.ArcFace(), backend="triton")


def test_the_options_argument_picks_the_backward(backward_strategy, monkeypatch):
    """options= wins over the environment's default (the split backward's dW
    grid is laid out only when it runs), and both strategies agree."""
    x, w, y = (t.to(DEVICE) for t in make_problem(9, 16, 70, seed=4))
    other = "split" if backward_strategy == "atomic" else "atomic"
    from margin_kernels.backends import triton_kernels as K

    split_launches = []
    real_grid = K.dw_grid
    monkeypatch.setattr(K, "dw_grid", lambda *args: split_launches.append(args) or real_grid(*args))
    a = loss_and_grads(x, w, y, mk.ArcFace(), backend="triton")
    assert bool(split_launches) == (backward_strategy == "split")
    split_launches.clear()
    b = loss_and_grads(x, w, y, mk.ArcFace(), backend="triton", options=mk.KernelOptions(triton_backward=other))
    assert bool(split_launches) == (other == "split")
    for u, v in zip(a, b):
        assert rel_err(u.cpu(), v.cpu()) < 1e-6


def compare(x, w, y, margin, tol=FP32_TOL, **kwargs):
    ref = loss_and_grads(x.float(), w.float(), y, margin, backend="reference", **kwargs)
    dev = [t.to(DEVICE) for t in (x, w, y)]
    got = [t.cpu() for t in loss_and_grads(*dev, margin, backend="triton", **kwargs)]
    assert got[1].dtype == x.dtype and got[2].dtype == w.dtype
    for name, a, b in zip(("loss", "dx", "dW"), got, ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) <= tol, f"{name}: rel err {rel_err(a, b):.2e} > {tol}"
        # entrywise too: an error in one row (an ignored one, the last class tile) shows
        assert row_err(a, b) <= 10 * tol, f"{name}: row err {row_err(a, b):.2e} > {10 * tol}"


# The margins differ only in the target logit, formed outside the kernels: the
# split backward (the same kernels' second form) runs on one of each kind.
SPLIT_MARGINS = ("NormSoftmax", "ArcFace", "Combined")


@pytest.mark.parametrize("name", list(ALL_MARGINS))
def test_every_margin(name, backward_strategy):
    if backward_strategy == "split" and name not in SPLIT_MARGINS:
        pytest.skip("split backward: one margin of each kind (the atomic run covers every margin)")
    x, w, y = make_problem(*SHAPE, ignore=(4, 20))
    compare(x, w, y, ALL_MARGINS[name], reduction="mean")


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(reduction):
    x, w, y = make_problem(*SHAPE, ignore=(0,), seed=1)
    compare(x, w, y, mk.CombinedMargin(m1=1.2, m2=0.3, m3=0.1), reduction=reduction)


@pytest.mark.parametrize("b, d, c", [(1, 3, 1), (5, 17, 130), (70, 130, 257)])
def test_odd_shapes(b, d, c):
    x, w, y = make_problem(b, d, c, seed=b + c)
    compare(x, w, y, mk.ArcFace())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    x, w, y = make_problem(*SHAPE, dtype=dtype, ignore=(1,), seed=2)
    truth = loss_and_grads(x.double(), w.double(), y, mk.ArcFace(), backend="reference")
    ref = loss_and_grads(x, w, y, mk.ArcFace(), backend="reference")
    got = loss_and_grads(*(t.to(DEVICE) for t in (x, w, y)), mk.ArcFace(), backend="triton")
    assert_low_precision(got, ref, truth, "triton")


def test_all_ignored_rows_give_zero():
    x, w, y = make_problem(6, 8, 50, ignore=range(6))
    loss, dx, dw = loss_and_grads(*(t.to(DEVICE) for t in (x, w, y)), mk.ArcFace(), backend="triton")
    assert loss.item() == 0 and torch.all(dx == 0) and torch.all(dw == 0)


def targets_on(targets, device):
    return type(targets)(*(v.to(device) for v in targets))


def test_index_gather_reads_and_writes_only_the_sampled_rows():
    """class_index: the kernels read W[index] in place and write dW for those rows."""
    from margin_kernels.backends import triton_backend as tb
    from margin_kernels.margins import target_logit

    torch.manual_seed(3)
    b, d, c, k = 29, 40, 600, 211
    x, w, y = make_problem(b, d, c, seed=3)
    others = torch.randperm(c)
    others = others[~torch.isin(others, y)][: k - y.unique().numel()]
    index = torch.cat([y.unique(), others]).sort().values  # every label, plus negatives
    labels_local = torch.searchsorted(index, y)
    x_hat = torch.nn.functional.normalize(x)
    w_sub = w[index]
    cos_y = (x_hat * torch.nn.functional.normalize(w_sub)[labels_local]).sum(1)
    t, _ = target_logit(cos_y, mk.ArcFace().row_margins(b))
    target = 64.0 * t
    dev = lambda v: v.to(DEVICE)  # noqa: E731
    opts = mk.KernelOptions(workspace_bytes=2**26).resolved()
    w_inv = tb.row_inv_norms(dev(w), class_index=dev(index))
    lse = tb.lse_forward(dev(x_hat), dev(w), w_inv, dev(labels_local), dev(target), scale=64.0, options=opts,
                         class_index=dev(index))
    g = torch.rand(b)
    dx, dw = tb.lse_backward(dev(x_hat), dev(w), w_inv, dev(labels_local), lse, dev(g), scale=64.0, options=opts,
                             class_index=dev(index))
    assert dw.shape == (k, d)
    # The same on a copy of the sampled rows, without an index.
    w_inv2 = tb.row_inv_norms(dev(w_sub))
    lse2 = tb.lse_forward(dev(x_hat), dev(w_sub), w_inv2, dev(labels_local), dev(target), scale=64.0, options=opts)
    dx2, dw2 = tb.lse_backward(dev(x_hat), dev(w_sub), w_inv2, dev(labels_local), lse2, dev(g), scale=64.0,
                               options=opts)
    for a, b_ in ((lse, lse2), (dx, dx2), (dw, dw2)):
        assert rel_err(a.cpu(), b_.cpu()) < 1e-6
    # ... and, with the target columns' share added as the pipeline adds it,
    # against the reference on the sampled classes.
    from margin_kernels import reference
    from margin_kernels._targets import add_target_gradients, geometry, prepare_targets, target_share

    targets = targets_on(prepare_targets(geometry(x, w_sub[labels_local]), mk.ArcFace().row_margins(b),
                                         mk.ArcFace()), DEVICE)
    add_target_gradients(dx, dw, targets, target_share(targets, dev(labels_local), lse, dev(g), w_inv))

    xr = x.clone().requires_grad_(True)
    wr = w_sub.clone().requires_grad_(True)
    rows, lse_ref = reference.margin_cross_entropy(xr, wr, labels_local, mk.ArcFace(), reduction="none")
    (rows * g).sum().backward()
    assert rel_err(lse.cpu(), lse_ref) < FP32_TOL
    assert rel_err(dw.cpu(), wr.grad) < FP32_TOL
    # dx too: d/dx from d/dx_hat, the projection off x_hat over ||x||
    dx = dx.cpu()
    dx = (dx - x_hat * (x_hat * dx).sum(1, keepdim=True)) / x.norm(dim=1, keepdim=True)
    assert rel_err(dx, xr.grad) < FP32_TOL and row_err(dx, xr.grad) < 10 * FP32_TOL
