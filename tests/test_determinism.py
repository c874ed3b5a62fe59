"""torch.use_deterministic_algorithms(True) is honoured or refused on every
path: the CPU paths are bitwise deterministic; Triton takes its split backward
with one class split for dx (no float sum whose order depends on scheduling),
and its sub-center backward, which only exists with atomics, raises (warns
with warn_only) as PyTorch's own non-deterministic operations do."""
import contextlib

import pytest
import torch

import margin_kernels as mk
from margin_kernels import backends

from conftest import backend_device, loss_and_grads, make_problem, rel_err, requires_cpp

TRITON = pytest.mark.skipif(not backends.is_available("triton"), reason="triton backend unavailable")


@contextlib.contextmanager
def deterministic(warn_only=False):
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)


@requires_cpp
@pytest.mark.parametrize("single_pass", [True, False])
@pytest.mark.parametrize("margin, k", [(mk.ArcFace(), 1), (mk.CurricularFace(), 1), (mk.ArcFace(), 3)])
def test_the_cpu_paths_are_bitwise_deterministic(single_pass, margin, k):
    x, w, y = make_problem(37, 24, 90 * k, seed=3)
    y = y % 90
    state = {"t": 0.3} if margin.state_names else None
    options = mk.KernelOptions(single_pass=single_pass, workspace_bytes=4096)
    plain = loss_and_grads(x, w, y, margin, backend="cpp", options=options, subcenters=k, state=state)
    with deterministic():
        runs = [loss_and_grads(x, w, y, margin, backend="cpp", options=options, subcenters=k, state=state)
                for _ in range(2)]
    for run in runs:
        assert all(torch.equal(a, b) for a, b in zip(run, plain))


@TRITON
@pytest.mark.parametrize("requested", ["atomic", "split"])
def test_triton_takes_its_deterministic_backward(monkeypatch, requested):
    from margin_kernels.backends import triton_kernels as K

    grids = []
    real_dx_grid = K.dx_grid
    monkeypatch.setattr(K, "dx_grid", lambda *a, **kw: grids.append(real_dx_grid(*a, **kw)) or grids[-1])

    def atomic_kernel(*args, **kwargs):
        raise AssertionError("the atomic backward ran under deterministic algorithms")

    monkeypatch.setattr(K.lse_backward_kernel, "run", atomic_kernel)
    dev = backend_device("triton")
    x, w, y = (t.to(dev) for t in make_problem(70, 16, 300, seed=4))
    ref = loss_and_grads(x.cpu(), w.cpu(), y.cpu(), mk.ArcFace(), backend="reference")
    with deterministic():
        got = loss_and_grads(x, w, y, mk.ArcFace(), backend="triton",
                             options=mk.KernelOptions(triton_backward=requested))
    assert grids and all(g[1] == 1 for g in grids)  # one class split: one add onto 0 per dx entry
    for g, r in zip(got, ref):
        assert rel_err(g.cpu(), r) < 1e-5


@TRITON
def test_triton_refuses_sub_centers_under_deterministic_algorithms():
    dev = backend_device("triton")
    x, w, y = (t.to(dev) for t in make_problem(8, 16, 30, seed=5))
    y = y % 10
    with deterministic():
        with pytest.raises(RuntimeError, match="no deterministic implementation"):
            loss_and_grads(x, w, y, mk.ArcFace(), backend="triton", subcenters=3)
    with deterministic(warn_only=True):
        with pytest.warns(UserWarning, match="no deterministic implementation"):
            loss_and_grads(x, w, y, mk.ArcFace(), backend="triton", subcenters=3)
