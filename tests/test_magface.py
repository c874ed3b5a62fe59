"""MagFace: the reference written from the paper (gradcheck), every backend
against it, with the gradient flowing through the magnitude into the margin
and the regularizer."""
import pytest
import torch

import margin_kernels as mk
from margin_kernels import backends, reference

from _dist import run_ranks
from conftest import backend_device, rel_err, requires_cpp

BACKENDS = ["cpp"] + (["triton"] if backends.is_available("triton") else [])


def problem(b=19, d=10, c=37, seed=0, ignore=(2,)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g)
    x = x / x.norm(dim=1, keepdim=True) * torch.linspace(5, 130, b)[:, None]  # magnitudes below, inside, above [10, 110]
    w = torch.randn(c, d, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    for i in ignore:
        y[i] = -100
    return x, w, y


@pytest.mark.parametrize("easy_margin", [True, False])
def test_reference_gradcheck(easy_margin):
    x, w, y = problem(b=6, d=4, c=5)
    x, w = x.double().requires_grad_(True), w.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: reference.magface_loss(a, b, y, easy_margin=easy_margin), (x, w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("easy_margin", [True, False])
@pytest.mark.parametrize("single_pass", [True, False])
def test_head_equals_the_reference(backend, reduction, easy_margin, single_pass):
    if backend == "triton" and single_pass:
        pytest.skip("the single-pass shortcut is cpp's")
    x, w, y = problem()
    xr, wr = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = reference.magface_loss(xr, wr, y, easy_margin=easy_margin, reduction=reduction)
    torch.manual_seed(3)
    upstream = torch.rand_like(ref) if ref.dim() else torch.ones_like(ref)
    (ref * upstream).sum().backward()

    dev = backend_device(backend)
    head = mk.nn.MagFace(10, 37, easy_margin=easy_margin, reduction=reduction, backend=backend, device=dev,
                         options=mk.KernelOptions(single_pass=single_pass))
    with torch.no_grad():
        head.weight.copy_(w)
    xf = x.to(dev).requires_grad_(True)
    loss = head(xf, y.to(dev))
    (loss * upstream.float().to(dev)).sum().backward()
    assert rel_err(loss.detach().cpu(), ref.detach()) < 1e-5
    assert rel_err(xf.grad.cpu(), xr.grad) < 1e-5
    assert rel_err(head.weight.grad.cpu(), wr.grad) < 1e-5


def test_margins_that_need_a_gradient_receive_it():
    """dL/dm per row through margin_cross_entropy(margins=...): against autograd
    through the reference, no kernel involved in it."""
    x, w, y = problem()
    spec = mk.MagFace()
    for backend in ["reference"] + BACKENDS:
        dev = backend_device(backend)
        m2 = torch.linspace(0.45, 0.8, x.shape[0], device=dev).requires_grad_(True)
        margins = mk.RowMargins(torch.ones_like(m2), m2, torch.zeros_like(m2))
        loss = mk.margin_cross_entropy(x.to(dev), w.to(dev), y.to(dev), spec, backend=backend, margins=margins)
        loss.backward()
        if backend == "reference":
            expected = m2.grad.cpu().clone()
        else:
            assert rel_err(m2.grad.cpu(), expected) < 1e-5, backend


def test_magnitude_outside_the_range_has_no_gradient_through_it():
    spec = mk.MagFace()
    x = torch.tensor([[1.0, 0.0], [200.0, 0.0], [50.0, 0.0]], requires_grad=True)
    spec.magnitudes(x).sum().backward()
    assert x.grad[0].abs().sum() == 0 and x.grad[1].abs().sum() == 0 and x.grad[2, 0] == 1


@pytest.mark.parametrize("bad, match", [(dict(l_a=120.0), "need 0 < l_a < u_a"), (dict(u_m=2.0), "u_m must be in"),
                                        (dict(l_m=0.9), "need l_m <= u_m"), (dict(lambda_g=-1.0), "lambda_g")])
def test_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        mk.MagFace(**bad)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=requires_cpp)])
def test_the_functional_form_is_the_heads_loss(backend):
    """The functional form runs the spec's step: margins m(a) and the
    regularizer, as the head (it used to raise, asking for margins=)."""
    x, w, y = problem()
    head = mk.nn.MagFace(x.shape[1], w.shape[0], backend=backend)
    with torch.no_grad():
        head.weight.copy_(w)
    assert torch.allclose(mk.margin_cross_entropy(x, w, y, mk.MagFace(), backend=backend), head(x, y), rtol=1e-6)


def _magface_ranks(rank, world, sizes, sample_rate):
    x, w, y = problem(b=sum(sizes), seed=5)
    start = sum(sizes[:rank])
    pfc = mk.PartialFC(10, 37, mk.MagFace(), sample_rate=sample_rate, generator=torch.Generator().manual_seed(rank))
    pfc.load_state_dict({"weight": w})
    xr = x[start : start + sizes[rank]].clone().requires_grad_(True)
    loss = pfc(xr, torch.where(y == -100, -1, y)[start : start + sizes[rank]])
    loss.backward()
    return dict(loss=loss.detach(), dx=xr.grad, dw=pfc.weight.grad, start=pfc.class_start, count=pfc.num_local,
                index=pfc.last_sampled_index)


def magface_reference(sizes, classes=None):
    x, w, y = problem(b=sum(sizes), seed=5)
    if classes is not None:  # the softmax over the sampled classes only
        remap = torch.full((w.shape[0],), -1, dtype=torch.long)
        remap[classes] = torch.arange(classes.numel())
        y = torch.where(y >= 0, remap[y.clamp_min(0)], y)
        w = w[classes]
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = reference.magface_loss(xr, wr, y)
    ref.backward()
    return ref.detach(), xr.grad, wr.grad


@requires_cpp
@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_partial_fc_one_process(sample_rate):
    r = _magface_ranks(0, 1, [19], sample_rate)
    classes = None if sample_rate == 1.0 else r["index"]
    loss, dx, dw = magface_reference([19], classes)
    assert rel_err(r["loss"], loss) < 1e-5 and rel_err(r["dx"], dx) < 1e-5
    got_dw = r["dw"] if classes is None else r["dw"][classes]
    assert rel_err(got_dw, dw) < 1e-5


@requires_cpp
@pytest.mark.slow
def test_partial_fc_two_ranks(tmp_path):
    """Margins and regularizer over the global batch, each gradient counted once."""
    sizes = [8, 11]
    results = run_ranks(_magface_ranks, 2, sizes, 1.0, outdir=str(tmp_path))
    loss, dx, dw = magface_reference(sizes)
    for rank, r in enumerate(results):
        start = sum(sizes[:rank])
        assert rel_err(r["loss"], loss) < 1e-5
        assert rel_err(r["dx"], dx[start : start + sizes[rank]]) < 1e-5
        assert rel_err(r["dw"], dw[r["start"] : r["start"] + r["count"]]) < 1e-5


def test_compiles_fullgraph_with_margins_that_need_a_gradient():
    spec = mk.MagFace()

    def loss_fn(x, w, y):
        a = spec.magnitudes(x)
        return (mk.margin_cross_entropy(x, w, y, spec, backend="cpp", margins=spec.margins_from_magnitudes(a))
                + spec.regularizer(a).mean())

    x, w, y = problem()
    x.requires_grad_(True)
    w.requires_grad_(True)
    eager = torch.autograd.grad(loss_fn(x, w, y), (x, w))
    compiled = torch.autograd.grad(torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(x, w, y), (x, w))
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) < 1e-5
