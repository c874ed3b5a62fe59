"""torch.compile traces the fused op without graph breaks; the meta device plans it."""
import pytest
import torch

import margin_kernels as mk

from conftest import make_problem, rel_err, requires_cpp

pytestmark = requires_cpp


@pytest.mark.parametrize(
    "reduction, compiler",
    [("mean", "aot_eager"), ("none", "aot_eager"), pytest.param("mean", "inductor", marks=pytest.mark.slow)],
)
def test_compile_fullgraph_matches_eager(reduction, compiler):
    """aot_eager traces through dynamo and AOTAutograd; inductor also generates code around the op."""
    torch._dynamo.reset()
    x, w, y = make_problem(13, 24, 97, ignore=(2,))

    def step(x, w, y):
        margin = mk.CombinedMargin(m1=1.1, m2=0.3, m3=0.1)
        return mk.margin_cross_entropy(x, w, y, margin, backend="cpp", reduction=reduction).sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend=compiler)):
        xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = fn(xl, wl, y)
        loss.backward()
        results.append((loss.detach(), xl.grad, wl.grad))
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-5


def test_compiled_op_still_checks_labels():
    torch._dynamo.reset()
    x, w, y = make_problem(5, 8, 11)
    y[1] = 11
    f = torch.compile(lambda x, w, y: mk.margin_cross_entropy(x, w, y, mk.CosFace(), backend="cpp"),
                      fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="labels must be in"):
        f(x, w, y)


def test_meta_device_plans_shapes():
    x = torch.empty(4096, 512, device="meta")
    w = torch.empty(1_000_000, 512, device="meta")
    y = torch.empty(4096, dtype=torch.long, device="meta")
    from margin_kernels._loss_function import LossCall

    call = LossCall(64.0, "cpp", mk.KernelOptions().resolved(), reduce=False)
    rows, lse, w_inv = torch.ops.margin_kernels.margin_loss(
        x, w, y, torch.empty(4096, device="meta"), torch.empty(4096, 512, device="meta"),
        torch.empty(4096, 512, device="meta"), torch.empty(4096, device="meta"), None, None, None, call.encode()
    )
    assert rows.shape == (4096,) and lse.shape == (4096,) and w_inv.shape == (1_000_000,)



def _grads(fn, x, w):
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = fn(x, w)
    loss.backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("margin, kwargs", [
    (mk.CombinedMargin(m1=1.1, m2=0.3, m3=0.1), {}), (mk.CurricularFace(), dict(state={"t": 0.2})),
    (mk.ArcFace(), dict(subcenters=3)), (mk.CosFace(easy_margin=True), {}),
    (mk.MVSoftmax(), {}), (mk.MVSoftmax(form="arc"), {}), (mk.MagFace(), {}),
    (mk.AdaFace(), dict(state={"batch_mean": 3.0, "batch_std": 1.0})),
], ids=["combined", "curricular", "subcenters", "cosface-easy", "mv-am", "mv-arc", "magface", "adaface"])
def test_compiled_matches_the_reference(margin, kwargs):
    """Compiled against the reference (not only against eager on the same backend)."""
    torch._dynamo.reset()
    k = kwargs.get("subcenters", 1)
    x, w, y = make_problem(11, 16, 23 * k, ignore=(3,))
    y = y % 23

    def fn(backend):
        return lambda a, b: mk.margin_cross_entropy(a, b, y, margin, backend=backend, **kwargs)

    compiled = _grads(torch.compile(fn("cpp"), fullgraph=True, backend="aot_eager"), x, w)
    reference = _grads(fn("reference"), x, w)
    for a, b in zip(compiled, reference):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("head", ["ArcFace", "AdaFace", "MagFace", "CurricularFace", "ElasticArcFace", "MVSoftmax"])
def test_heads_compile_fullgraph_and_match_the_reference(head):
    """A training step of each head under torch.compile(fullgraph=True), against
    the same head on the reference backend (elastic heads draw from the global
    RNG here: dynamo cannot take a torch.Generator argument)."""
    torch._dynamo.reset()
    x, w, y = make_problem(10, 12, 19)
    x = x * 20
    results = []
    for backend, compile_it in (("cpp", True), ("reference", False)):
        module = getattr(mk.nn, head)(12, 19, backend=backend)
        with torch.no_grad():
            module.weight.copy_(w)
        xl = x.clone().requires_grad_(True)
        fn = torch.compile(module, fullgraph=True, backend="aot_eager") if compile_it else module
        torch.manual_seed(4)
        loss = fn(xl, y)
        loss.backward()
        state = [b.clone() for b in module.buffers()]
        results.append((loss.detach(), xl.grad, module.weight.grad, state))
    (loss, dx, dw, state), (loss_r, dx_r, dw_r, state_r) = results
    assert rel_err(loss, loss_r) < 1e-5 and rel_err(dx, dx_r) < 1e-5 and rel_err(dw, dw_r) < 1e-5
    assert all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(state, state_r))
