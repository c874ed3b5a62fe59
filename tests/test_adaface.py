"""AdaFace: the reference written from the paper (gradcheck), every backend
against it, the running statistics, PartialFC's global statistics."""
import math

import pytest
import torch

import margin_kernels as mk
from margin_kernels import backends, reference

from _dist import run_ranks
from conftest import assert_low_precision, backend_device, rel_err, requires_cpp

BACKENDS = ["cpp"] + (["triton"] if backends.is_available("triton") else [])
SPEC = mk.AdaFace()


def problem(b=23, d=12, c=41, seed=0, ignore=(3,)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g) * torch.linspace(1, 60, b)[:, None] / d**0.5  # norms 1..60: r spans [-1, 1]
    w = torch.randn(c, d, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    # Row 0: 0.1 rad from its class with a large norm (r = 1): theta - m r < 1e-3, the clip acts.
    y[0] = 5
    u, v = torch.nn.functional.normalize(w[5], dim=0), torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    v = torch.nn.functional.normalize(v - (v @ u) * u, dim=0)
    x[0] = 80 * (math.cos(0.1) * u + math.sin(0.1) * v)
    for i in ignore:
        y[i] = -100
    return x, w, y


def test_reference_gradcheck():
    x, w, y = problem(b=6, d=5, c=7)
    x, w = x.double().requires_grad_(True), w.double().requires_grad_(True)
    mean, std = torch.tensor(12.0, dtype=torch.float64), torch.tensor(9.0, dtype=torch.float64)
    x.data[0] += 0.05  # off the exact clip boundary
    # The margins take the norms detached (as the official head does): fixed here.
    norms = torch.linalg.vector_norm(x.detach(), dim=1).clamp(0.001, 100)
    assert torch.autograd.gradcheck(lambda a, b: reference.adaface_loss(a, b, y, mean, std, norms=norms), (x, w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("single_pass", [True, False])
def test_backends_equal_the_reference(backend, reduction, single_pass):
    if backend == "triton" and single_pass:
        pytest.skip("the single-pass shortcut is cpp's")
    x, w, y = problem()
    mean, std = torch.tensor(25.0), torch.tensor(14.0)
    xr, wr = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = reference.adaface_loss(xr, wr, y, mean.double(), std.double(), reduction=reduction)
    torch.manual_seed(7)
    upstream = torch.rand_like(ref) if ref.dim() else torch.ones_like(ref)
    (ref * upstream).sum().backward()

    dev = backend_device(backend)
    xf, wf = x.to(dev).requires_grad_(True), w.to(dev).requires_grad_(True)
    margins = SPEC.margins_from_norms(SPEC.clipped_norms(xf), mean.to(dev), std.to(dev))
    loss = mk.margin_cross_entropy(xf, wf, y.to(dev), SPEC, backend=backend, reduction=reduction, margins=margins,
                                   options=mk.KernelOptions(single_pass=single_pass))
    (loss * upstream.float().to(dev)).sum().backward()
    assert rel_err(loss.detach().cpu(), ref.detach()) < 1e-5
    assert rel_err(xf.grad.cpu(), xr.grad) < 1e-5
    assert rel_err(wf.grad.cpu(), wr.grad) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    """Judged by the reference's own error in the same dtype (README's low-precision contract)."""
    x, w, y = problem()
    mean, std = torch.tensor(25.0), torch.tensor(14.0)

    def run(fn, a, b):
        a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        loss = fn(a, b)
        loss.backward()
        return loss.detach(), a.grad, b.grad

    def fused(a, b):
        margins = SPEC.margins_from_norms(SPEC.clipped_norms(a), mean, std)
        return mk.margin_cross_entropy(a, b, y, SPEC, backend="cpp", margins=margins)

    paper = lambda a, b: reference.adaface_loss(a, b, y, mean.to(a.dtype), std.to(a.dtype))  # noqa: E731
    xl, wl = x.to(dtype), w.to(dtype)
    truth = run(paper, xl.double(), wl.double())
    assert_low_precision(run(fused, xl, wl), run(paper, xl, wl), truth, "cpp")


def test_the_head_evolves_its_statistics_as_the_reference():
    """Five training steps: the buffers follow the official update (with the
    valid rows), each step's loss is the reference's with the updated
    statistics, and eval mode leaves them alone."""
    head = mk.nn.AdaFace(12, 41)
    mean, std = torch.tensor(20.0), torch.tensor(100.0)
    for step in range(5):
        x, _, y = problem(seed=step)
        norms = torch.linalg.vector_norm(x, dim=1).clamp(0.001, 100)
        mean, std = reference.adaface_statistics(mean, std, norms[y != -100], 0.01)
        loss = head(x, y)
        assert torch.allclose(head.batch_mean, mean) and torch.allclose(head.batch_std, std)
        ref = reference.adaface_loss(x, head.weight.detach(), y, mean, std)
        assert rel_err(loss.detach(), ref) < 1e-5
    head.eval()
    head(*problem(seed=9)[::2])
    assert torch.allclose(head.batch_mean, mean) and set(head.state_dict()) == {"weight", "batch_mean", "batch_std", "_extra_state"}


def test_a_one_row_batch_does_not_poison_the_statistics():
    """The official std of one row is NaN, and the EMA keeps it for good."""
    head = mk.nn.AdaFace(12, 41)
    x, _, y = problem(b=1, ignore=())
    head(x, y)
    assert torch.isfinite(head.batch_std) and head.batch_std == 100.0 and head.batch_mean != 20.0
    head(x, torch.tensor([-100]))  # no valid row: nothing moves
    assert torch.isfinite(head.batch_mean) and torch.isfinite(head(*problem(seed=1)[::2]))


def test_without_statistics_the_functional_form_says_what_it_needs():
    x, w, y = problem()
    with pytest.raises(ValueError, match="use margin_kernels.nn.AdaFace"):
        mk.margin_cross_entropy(x, w, y, SPEC)


@pytest.mark.parametrize("bad, match", [(dict(m=1.2), "m must be in"), (dict(h=-0.1), "h must be >= 0"),
                                        (dict(momentum=0.0), "momentum must be in")])
def test_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        mk.AdaFace(**bad)


def _adaface_ranks(rank, world, sizes, sample_rate):
    x, w, y = problem(b=sum(sizes), seed=4)
    start = sum(sizes[:rank])
    pfc = mk.PartialFC(12, 41, mk.AdaFace(), sample_rate=sample_rate, generator=torch.Generator().manual_seed(rank))
    pfc.load_state_dict({"weight": w, "batch_mean": torch.tensor(20.0), "batch_std": torch.tensor(100.0)})
    xr = x[start : start + sizes[rank]].clone().requires_grad_(True)
    loss = pfc(xr, torch.where(y == -100, -1, y)[start : start + sizes[rank]])
    loss.backward()
    return dict(loss=loss.detach(), dx=xr.grad, mean=pfc.batch_mean.clone(), std=pfc.batch_std.clone(),
                dw=pfc.weight.grad, start=pfc.class_start, count=pfc.num_local)


@requires_cpp
@pytest.mark.slow
def test_partial_fc_uses_global_statistics(tmp_path):
    """Two ranks with uneven batches equal one process with the whole batch:
    the statistics are the global batch's, on every rank."""
    sizes = [9, 14]
    results = run_ranks(_adaface_ranks, 2, sizes, 1.0, outdir=str(tmp_path))
    x, w, y = problem(b=23, seed=4)
    norms = torch.linalg.vector_norm(x, dim=1).clamp(0.001, 100)
    mean, std = reference.adaface_statistics(torch.tensor(20.0), torch.tensor(100.0), norms[y != -100], 0.01)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = reference.adaface_loss(xr, wr, y, mean, std)
    ref.backward()
    for rank, r in enumerate(results):
        assert torch.allclose(r["mean"], mean) and torch.allclose(r["std"], std)
        assert rel_err(r["loss"], ref.detach()) < 1e-5
        start = sum(sizes[:rank])
        assert rel_err(r["dx"], xr.grad[start : start + sizes[rank]]) < 1e-5
        assert rel_err(r["dw"], wr.grad[r["start"] : r["start"] + r["count"]]) < 1e-5


def test_compiles_fullgraph():
    def loss_fn(x, w, y):
        margins = SPEC.margins_from_norms(SPEC.clipped_norms(x), torch.tensor(25.0), torch.tensor(14.0))
        return mk.margin_cross_entropy(x, w, y, SPEC, backend="cpp", margins=margins)

    x, w, y = problem()
    x.requires_grad_(True)
    eager = torch.autograd.grad(loss_fn(x, w, y), x)[0]
    compiled = torch.autograd.grad(torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(x, w, y), x)[0]
    assert rel_err(compiled, eager) < 1e-5
