"""The cpp backend's CUDA path (cuBLAS blocks + csrc/cuda epilogues) against the
reference. Runs only where torch sees a GPU and the extension was built with CUDA."""
import pytest
import torch

import margin_kernels as mk
from margin_kernels import backends

from conftest import ALL_MARGINS, loss_and_grads, make_problem, rel_err

cuda_built = torch.cuda.is_available() and backends.is_available("cpp") and backends.load("cpp").runs_on_cuda()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda_built, reason="needs a GPU and a CUDA build of _C")]

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 3e-2), torch.float16: (5e-3, 2e-2)}


def compare(x, w, y, margin, **kwargs):
    ref = loss_and_grads(x.float(), w.float(), y, margin, backend="reference", **kwargs)
    got = [t.cpu() for t in loss_and_grads(x.cuda(), w.cuda(), y.cuda(), margin, backend="cpp", **kwargs)]
    loss_tol, grad_tol = TOL[x.dtype]
    for name, a, b, tol in zip(("loss", "dx", "dW"), got, ref, (loss_tol, grad_tol, grad_tol)):
        assert torch.isfinite(a).all() and rel_err(a, b) <= tol, f"{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("name", list(ALL_MARGINS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_margin_and_dtype(name, dtype):
    x, w, y = make_problem(37, 72, 1000, dtype=dtype, ignore=(4, 20))
    compare(x, w, y, ALL_MARGINS[name], workspace_bytes=64 * 1024)


@pytest.mark.parametrize("b, d, c", [(1, 3, 1), (64, 33, 513), (300, 130, 5001)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_odd_shapes(b, d, c, reduction):
    x, w, y = make_problem(b, d, c, seed=b + c)
    compare(x, w, y, mk.CombinedMargin(m1=1.2, m2=0.3, m3=0.1), reduction=reduction, workspace_bytes=128 * 1024)
