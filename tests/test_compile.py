"""torch.compile traces the fused op without graph breaks; the meta device plans it."""
import pytest
import torch

import margin_kernels as mk

from conftest import make_problem, rel_err, requires_cpp

pytestmark = requires_cpp


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_matches_eager(reduction):
    torch._dynamo.reset()
    x, w, y = make_problem(13, 24, 97, ignore=(2,))

    def step(x, w, y):
        loss = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="cpp", reduction=reduction)
        return loss.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
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
    rows, lse, w_inv = torch.ops.margin_kernels.margin_ce_rows(
        x, w, y, torch.empty(4096, device="meta"), torch.empty(4096, device="meta"), 64.0, -100, "cpp", 2**26, False
    )
    assert rows.shape == (4096,) and lse.shape == (4096,) and w_inv.shape == (1_000_000,)


@pytest.mark.slow
def test_inductor_fullgraph_matches_eager():
    """The default backend too: inductor generates code around the custom op."""
    torch._dynamo.reset()
    x, w, y = make_problem(13, 24, 97, ignore=(5,))

    def loss_fn(x, w, y):
        return mk.margin_cross_entropy(x, w, y, mk.CombinedMargin(m1=1.1, m2=0.3, m3=0.1), backend="cpp")

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = fn(xl, wl, y)
        loss.backward()
        results.append((loss.detach(), xl.grad, wl.grad))
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-5
