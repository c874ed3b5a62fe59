"""Bad input raises a ValueError / TypeError that names the argument."""
import pytest
import torch

import margin_kernels as mk

from conftest import backend_device, make_problem

BACKENDS = ["reference", "cpp"]
DATA_CASE_BACKENDS = BACKENDS + (["triton"] if mk.backends.is_available("triton") else [])


def call(x, w, y, backend, margin=None, **kwargs):
    return mk.margin_cross_entropy(x, w, y, margin or mk.ArcFace(), backend=backend, **kwargs)


def _set(t, where, value):
    t = t.clone()
    t[where] = value
    return t


def case(mutate):
    x, w, y = make_problem(6, 5, 7)
    return mutate(x, w, y)


CASES = [
    ("embeddings must be 2-D", ValueError, lambda x, w, y: (x[0], w, y)),
    ("weight must be 2-D", ValueError, lambda x, w, y: (x, w[None], y)),
    ("labels must be 1-D", ValueError, lambda x, w, y: (x, w, y[:, None])),
    ("weight has D = 4", ValueError, lambda x, w, y: (x, w[:, :4].contiguous(), y)),
    ("labels has 5 rows", ValueError, lambda x, w, y: (x, w, y[:5])),
    ("labels must be an integer", TypeError, lambda x, w, y: (x, w, y.float())),
    ("labels must be an integer", TypeError, lambda x, w, y: (x, w, y > 2)),
    ("at least one class", ValueError, lambda x, w, y: (x, w[:0], y)),
    ("labels must be in \\[0, 7\\)", ValueError, lambda x, w, y: (x, w, y.index_fill(0, torch.tensor([2]), 7))),
    ("row 3 has label -1", ValueError, lambda x, w, y: (x, w, y.index_fill(0, torch.tensor([3]), -1))),
    ("embeddings row 1 contains NaN or Inf", ValueError,
     lambda x, w, y: (x.index_fill(0, torch.tensor([1]), float("nan")), w, y)),
    ("embeddings row 1 contains NaN or Inf", ValueError,
     lambda x, w, y: (x.index_fill(0, torch.tensor([1]), float("inf")), w, y)),
    ("embeddings row 2 has a norm beyond the float32 range", ValueError,
     lambda x, w, y: (x.index_fill(0, torch.tensor([2]), 1e30), w, y)),
    ("weight row 0 contains NaN or Inf", ValueError,
     lambda x, w, y: (x, w.index_fill(0, torch.tensor([0]), float("nan")), y)),
    ("weight row 5 contains NaN or Inf", ValueError, lambda x, w, y: (x, _set(w, (5, 1), float("-inf")), y)),
    ("weight row 3 contains NaN or Inf", ValueError, lambda x, w, y: (x, _set(w, (3, 0), float("nan")), y)),
    ("weight row 6 has a norm beyond the float32 range", ValueError,
     lambda x, w, y: (x, w.index_fill(0, torch.tensor([6]), 1e30), y)),
    ("weight dtype torch.float64 does not match", TypeError, lambda x, w, y: (x, w.double(), y)),
    ("embeddings must be float32", TypeError, lambda x, w, y: (x.int(), w.int(), y)),
    ("embeddings must be a torch.Tensor", TypeError, lambda x, w, y: (x.tolist(), w, y)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("match, exc, mutate", CASES, ids=[c[0][:30] for c in CASES])
def test_bad_input(backend, match, exc, mutate):
    with pytest.raises(exc, match=match):
        call(*case(mutate), backend)


BAD_VALUES = [c for c in CASES if "NaN" in c[0] or "norm beyond" in c[0] or "label" in c[0] and "integer" not in c[0]]


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the 1e30 rows, in the interpreter
@pytest.mark.parametrize("backend", DATA_CASE_BACKENDS)
@pytest.mark.parametrize("grad", [False, True], ids=["contract", "grad"])
@pytest.mark.parametrize("match, exc, mutate", BAD_VALUES, ids=[c[0][:30] for c in BAD_VALUES])
def test_bad_values_on_every_path(backend, grad, match, exc, mutate):
    """Bad data raises on every path: fused backends check weight from the row
    norms they compute (the contract op and, with gradients, the cpp backend's
    single-pass shortcut), not by a pass of their own."""
    x, w, y = (t.to(backend_device(backend)) for t in case(mutate))
    if grad:
        x, w = x.requires_grad_(True), w.requires_grad_(True)
    with pytest.raises(exc, match=match):
        call(x, w, y, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_options(backend):
    x, w, y = make_problem(6, 5, 7)
    with pytest.raises(ValueError, match="reduction must be one of"):
        call(x, w, y, backend, reduction="avg")
    with pytest.raises(TypeError, match="margin must be a margin_kernels margin spec"):
        mk.margin_cross_entropy(x, w, y, 0.5, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        call(x, w, y, "cuda")


def test_float64_needs_the_reference_backend():
    x, w, y = make_problem(6, 5, 7, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='cpp' takes float32"):
        call(x, w, y, "cpp")
    assert torch.isfinite(call(x, w, y, "reference"))


def test_mixed_devices():
    x, w, y = make_problem(6, 5, 7)
    with pytest.raises(ValueError, match="one device"):
        call(x, w.to("meta"), y, "reference")


def test_ignore_index_rows_are_not_range_checked():
    x, w, y = make_problem(6, 5, 7, ignore=(0,), ignore_index=-1)
    assert torch.isfinite(call(x, w, y, "cpp", ignore_index=-1))
