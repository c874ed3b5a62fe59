import os

# Triton's interpreter must be chosen before any module that defines a kernel is
# imported; on a machine without CUDA the Triton tests run on CPU tensors.
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest
import torch

import margin_kernels as mk
from margin_kernels import backends

requires_cpp = pytest.mark.skipif(not backends.is_available("cpp"), reason="margin_kernels._C is not built")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def backend_device(backend: str) -> str:
    """Where a backend's tests put their tensors: the Triton backend runs on CUDA
    tensors where a GPU exists (interpreted on CPU tensors only without one)."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"

# One instance of every margin the library defines, with non-default values
# where the defaults would hide a term (all three of m1, m2, m3 non-trivial).
ALL_MARGINS = {
    "NormSoftmax": mk.NormSoftmax(s=30.0),
    "CosFace": mk.CosFace(),
    "ArcFace": mk.ArcFace(),
    "ArcFace-easy": mk.ArcFace(m=0.4, easy_margin=True),
    "ArcFace-nooverflow": mk.ArcFace(overflow="none"),
    "ArcFace-detach": mk.ArcFace(detach_margin=True),
    "SphereFace": mk.SphereFace(s=32.0),
    "Combined": mk.CombinedMargin(s=48.0, m1=1.3, m2=0.25, m3=0.15),
    "ElasticArcFace": mk.ElasticArcFace(),
    "ElasticCosFace": mk.ElasticCosFace(),
    "ElasticArcFace+": mk.ElasticArcFace(plus=True),
    "ElasticCosFace+": mk.ElasticCosFace(plus=True),
}


def make_problem(b, d, c, *, dtype=torch.float32, seed=0, ignore=(), ignore_index=-100):
    """Random embeddings, weights and labels; rows in ``ignore`` get ignore_index."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g).to(dtype)
    w = torch.randn(c, d, generator=g).to(dtype)
    y = torch.randint(0, c, (b,), generator=g)
    for i in ignore:
        y[i] = ignore_index
    return x, w, y


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def loss_and_grads(x, w, y, margin, *, seed=123, **kwargs):
    """Loss and (dx, dW) with a fixed elastic seed, on fresh leaf copies."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    loss = mk.margin_cross_entropy(x, w, y, margin, generator=gen, **kwargs)
    torch.manual_seed(7)
    upstream = torch.rand_like(loss) if loss.dim() else torch.ones_like(loss)
    (loss * upstream).sum().backward()
    return loss.detach(), x.grad, w.grad
