"""The fused C++ backend against the reference: loss, dx and dW."""
import pytest
import torch

import margin_kernels as mk
from margin_kernels.backends import cpp as cpp_backend

from conftest import ALL_MARGINS, assert_low_precision, loss_and_grads, make_problem, rel_err, requires_cpp, row_err

pytestmark = requires_cpp

FP32_TOL = 1e-5

SHAPES = [(37, 72, 1000), (1, 3, 1), (5, 17, 1), (64, 33, 513), (3, 8, 2)]
SMALL_WORKSPACE = 4096  # bytes: forces many class blocks / row chunks


@pytest.fixture(params=["single-pass", "class-blocked"])
def path(request, monkeypatch):
    """Run each check through the single-pass shortcut (wherever it applies,
    however small the row chunks) and through the class-blocked path, by the
    documented default of KernelOptions.single_pass."""
    monkeypatch.setenv("MARGIN_KERNELS_SINGLE_PASS", "1" if request.param == "single-pass" else "0")
    return request.param


@pytest.mark.parametrize("reduction, expect_single_pass", [("mean", True), ("sum", True), ("none", False)])
def test_path_fixture_reaches_the_kernel_it_names(reduction, expect_single_pass, path, monkeypatch):
    calls = []
    real = cpp_backend.single_pass
    monkeypatch.setattr(cpp_backend, "single_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w, y = make_problem(9, 8, 50)
    loss_and_grads(x, w, y, mk.ArcFace(), backend="cpp", reduction=reduction, workspace_bytes=SMALL_WORKSPACE)
    assert bool(calls) == (expect_single_pass and path == "single-pass")


def compare(x, w, y, margin, tol=FP32_TOL, **kwargs):
    ref = loss_and_grads(x.float(), w.float(), y, margin, backend="reference", **kwargs)
    got = loss_and_grads(x, w, y, margin, backend="cpp", **kwargs)
    assert got[1].dtype == x.dtype and got[2].dtype == w.dtype
    for name, a, b in zip(("loss", "dx", "dW"), got, ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) <= tol, f"{name}: rel err {rel_err(a, b):.2e} > {tol}"
        # entrywise too: an error in one row (an ignored one, the last class block) shows
        assert row_err(a, b) <= 10 * tol, f"{name}: row err {row_err(a, b):.2e} > {10 * tol}"


@pytest.mark.parametrize("name", list(ALL_MARGINS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_margin_and_reduction(name, reduction, path):
    x, w, y = make_problem(37, 72, 1000, ignore=(4, 20))
    compare(x, w, y, ALL_MARGINS[name], reduction=reduction, workspace_bytes=64 * 1024)


@pytest.mark.parametrize("b, d, c", SHAPES)
@pytest.mark.parametrize("workspace", [SMALL_WORKSPACE, None])
def test_odd_shapes_and_block_sizes(b, d, c, workspace, path):
    x, w, y = make_problem(b, d, c, seed=b + c)
    compare(x, w, y, mk.CombinedMargin(m1=1.2, m2=0.3, m3=0.1), workspace_bytes=workspace)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["ArcFace", "CosFace", "Combined", "ElasticArcFace+"])
def test_half_precision(dtype, name, path):
    x, w, y = make_problem(29, 40, 301, dtype=dtype, ignore=(1,))
    margin, kwargs = ALL_MARGINS[name], dict(workspace_bytes=16 * 1024)
    truth = loss_and_grads(x.double(), w.double(), y, margin, backend="reference")
    ref = loss_and_grads(x, w, y, margin, backend="reference")
    assert_low_precision(loss_and_grads(x, w, y, margin, backend="cpp", **kwargs), ref, truth, "cpp")


NEAR_POLE_MARGINS = ["ArcFace", "ArcFace-nooverflow", "ArcFace-easy", "SphereFace", "Combined", "CosFace"]


def pole_problem(noise):
    """Rows near theta = 0, near theta = pi and in the overflow region theta + m > pi."""
    torch.manual_seed(0)
    c, d = 50, 16
    w = torch.randn(c, d)
    y = torch.arange(6) % c
    x = torch.randn(6, d)
    x[0] = w[0] * 3.0 + noise * torch.randn(d)
    x[1] = w[1] + 10 * noise * torch.randn(d)
    x[2] = -w[2] + noise * torch.randn(d)
    x[3] = -w[3] + 10 * noise * torch.randn(d)
    x[4] = -w[4] + 0.3 * torch.randn(d)  # past the ArcFace overflow point
    return x, w, y


@pytest.mark.parametrize("name", NEAR_POLE_MARGINS)
def test_theta_near_zero_pi_and_past_overflow(name, path):
    # Near theta = pi (and near 0 when m2 > 0), dt/dc ~ 1/sin(theta) amplifies the
    # float32 rounding of the cosine itself (kernel and reference round it
    # differently, ~1e-7), so the bound here is the conditioning's, not the kernel's.
    compare(*pole_problem(1e-2), ALL_MARGINS[name], tol=1e-4)


@pytest.mark.parametrize("name", NEAR_POLE_MARGINS)
def test_exact_poles_give_finite_values(name, path):
    """theta = 0 and pi exactly: the true slope may be infinite; ours is finite."""
    x, w, y = pole_problem(0.0)
    loss, dx, dw = loss_and_grads(x, w, y, ALL_MARGINS[name], backend="cpp")
    assert torch.isfinite(loss).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all()


def test_elastic_with_zero_std_equals_fixed_twin_exactly():
    x, w, y = make_problem(23, 19, 77, ignore=(5,))
    for elastic, fixed in [(mk.ElasticArcFace(m=0.45, std=0.0), mk.ArcFace(m=0.45)),
                           (mk.ElasticCosFace(m=0.3, std=0.0, plus=True), mk.CosFace(m=0.3))]:
        for backend in ("reference", "cpp"):
            a = loss_and_grads(x, w, y, elastic, backend=backend)
            b = loss_and_grads(x, w, y, fixed, backend=backend)
            assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_seeded_elastic_steps_reproduce():
    x, w, y = make_problem(23, 19, 77)
    a = loss_and_grads(x, w, y, mk.ElasticArcFace(plus=True), seed=9, backend="cpp")
    b = loss_and_grads(x, w, y, mk.ElasticArcFace(plus=True), seed=9, backend="cpp")
    c = loss_and_grads(x, w, y, mk.ElasticArcFace(plus=True), seed=10, backend="cpp")
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_and_empty_batches(reduction, path):
    for b, ignore in [(4, (0, 1, 2, 3)), (0, ())]:
        x, w, y = make_problem(b, 6, 9, ignore=ignore)
        loss, dx, dw = loss_and_grads(x, w, y, mk.ArcFace(), backend="cpp", reduction=reduction)
        assert torch.all(loss == 0) and torch.all(dx == 0) and torch.all(dw == 0)


def test_zero_norm_rows_are_rejected(path):
    """A zero row has no direction: its cosine and gradient are undefined (a
    zero-initialised weight gave |dW| ~ 6.7e12, inf in fp16). Named, not NaN."""
    x, w, y = make_problem(6, 5, 7)
    x[2] = 0.0
    with pytest.raises(ValueError, match="embeddings row 2 is zero"):
        loss_and_grads(x, w, y, mk.ArcFace(), backend="cpp")
    x, w, y = make_problem(6, 5, 7)
    w[3] = 0.0
    with pytest.raises(ValueError, match="weight row 3 is zero .*initialise class weights randomly"):
        loss_and_grads(x, w, y, mk.ArcFace(), backend="cpp")


def test_return_lse_matches_reference():
    x, w, y = make_problem(12, 9, 40)
    _, lse = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="cpp", return_lse=True)
    _, lse_ref = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="reference", return_lse=True)
    assert rel_err(lse, lse_ref) < FP32_TOL


def test_inputs_are_not_mutated(path):
    x, w, y = make_problem(12, 9, 40, ignore=(3,))
    copies = [t.clone() for t in (x, w, y)]
    loss_and_grads(x, w, y, mk.ArcFace(), backend="cpp")
    assert all(torch.equal(a, b) for a, b in zip((x, w, y), copies))


def test_second_backward_through_the_fused_path_is_an_error():
    x, w, y = make_problem(8, 5, 11)
    w.requires_grad_(True)
    loss = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="cpp")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_upstream_gradient_scales_the_fused_gradients():
    x, w, y = make_problem(8, 5, 11)
    grads = []
    for scale in (1.0, 3.5):
        wl = w.clone().requires_grad_(True)
        (scale * mk.margin_cross_entropy(x, wl, y, mk.CosFace(), backend="cpp")).backward()
        grads.append(wl.grad)
    assert torch.allclose(grads[1], 3.5 * grads[0], rtol=1e-6)


def test_modules_train_and_keep_their_margins():
    torch.manual_seed(0)
    head = mk.nn.ElasticArcFace(16, 10, plus=True, generator=torch.Generator().manual_seed(0))
    x, y = torch.randn(32, 16), torch.randint(0, 10, (32,))
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = head(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert head.last_margins is not None and head.last_margins.m2.shape == (32,)
    with torch.no_grad():
        step = head(x, y)
        replay = mk.margin_cross_entropy(x, head.weight, y, head.margin, margins=head.last_margins)
        other = mk.margin_cross_entropy(x, head.weight, y, head.margin, generator=torch.Generator().manual_seed(9))
    assert torch.equal(replay, step)  # the step, replayed exactly
    assert not torch.equal(other, step)  # (another draw is another loss: the replay is not trivially equal)
    assert "num_classes=10" in repr(head)


def test_large_scale_when_the_target_held_the_row_max(path):
    """s (c - t) > 30: replacing the target column lowers the row max a long
    way; the kernel rescans for the exact max instead of underflowing."""
    torch.manual_seed(1)
    w = torch.randn(300, 24)
    y = torch.arange(10)
    x = w[:10] + 0.01 * torch.randn(10, 24)  # c_y ~ 1: the target column is the max
    compare(x, w, y, mk.CosFace(s=200.0, m=0.6))
