"""The epilogues' per-element math lives once, in csrc/epilogue_math.h, which
the CPU epilogue and the CUDA kernels both include: called here on the host
(through _C.epilogue_math), it is what the CUDA kernels compute."""
import pathlib
import re

import pytest
import torch

from margin_kernels import CurricularFace, MVSoftmax
from margin_kernels.margins import StepBatch

from conftest import requires_cpp

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"


def test_both_epilogues_include_the_one_header_and_restate_none_of_it():
    cuda, cpu = (CSRC / "cuda" / "epilogue.cu").read_text(), (CSRC / "cpu" / "row_epilogue.h").read_text()
    assert '#include "../epilogue_math.h"' in cuda and '#include "../epilogue_math.h"' in cpu
    for source in (cuda, cpu, (CSRC / "cpu" / "row_epilogue.cpp").read_text()):
        assert not re.search(r"struct\s+Hard", source)  # no rule of their own
        assert not re.search(r"\(\s*a\s*\*\s*c\s*\+\s*b\s*\)|t\s*\+\s*2(\.0f)?\s*\*\s*c", source)
    assert "class_cosine(" in cuda and "softmax_grad(" in cuda


def rules(b, generator):
    """Per-row rules of two families, from their specs' own step."""
    cos = torch.rand(b, generator=generator, dtype=torch.float64) * 1.6 - 0.8
    batch = StepBatch(torch.zeros(b, 4), torch.ones(b, dtype=torch.bool), cos, (1 - cos**2).sqrt())
    valid = torch.ones(b, dtype=torch.bool)
    valid[1] = False
    batch = batch._replace(valid=valid)
    return {"curricular": CurricularFace().step(batch, {"t": torch.tensor(0.4)}).hard,
            "mv": MVSoftmax(form="arc").step(batch).hard}


@requires_cpp
@pytest.mark.parametrize("family", ["curricular", "mv", None])
@pytest.mark.parametrize("k", [1, 3])
def test_the_header_computes_the_documented_math(family, k):
    from margin_kernels import _C

    g = torch.Generator().manual_seed(0)
    b, c, s = 6, 11, 30.0
    inv = torch.rand(c * k, generator=g) + 0.5
    logits = (torch.rand(b, c * k, generator=g) * 2 - 1) / inv  # cosines in [-1, 1]
    if k > 1:  # a tie: the first sub-center wins
        inv[4] = inv[3]
        logits[0, 4] = logits[0, 3]
    lse, coef = torch.randn(b, generator=g) + s, torch.randn(b, generator=g)
    hard = None if family is None else rules(b, g)[family]
    cos, arg, z, grad = _C.epilogue_math(logits, inv, None if hard is None else hard.packed(), k, s, lse, coef)

    want = (logits.double() * inv.double()).view(b, c, k)
    assert torch.equal(arg, want.argmax(dim=2))  # (torch's argmax takes the first of ties too)
    cw = want.max(dim=2).values
    assert torch.allclose(cos.double(), cw, rtol=1e-6, atol=1e-7)
    if hard is None:
        m, dm = cw, torch.ones_like(cw)
    else:
        h = hard.packed().double()
        on = cw > h[0][:, None]
        m = torch.where(on, (h[1][:, None] * cw + h[2][:, None]) * cw + h[3][:, None], cw)
        dm = torch.where(on, 2 * h[1][:, None] * cw + h[2][:, None], torch.ones_like(cw))
        assert on.any() and (~on).any() and not on[1].any()  # both sides of the rule; an ignored row never hard
    assert torch.allclose(z.double(), s * m, rtol=1e-6, atol=1e-5)
    want_grad = coef.double()[:, None] * torch.exp(s * m - lse.double()[:, None]) * dm
    assert torch.allclose(grad.double(), want_grad, rtol=2e-5, atol=1e-30)  # (exp of a float32 exponent)


@requires_cpp
def test_the_header_entry_checks_its_arguments():
    from margin_kernels import _C

    with pytest.raises(RuntimeError, match="logits must be"):
        _C.epilogue_math(torch.zeros(2, 5), torch.ones(5), None, 2, 1.0, torch.zeros(2), torch.zeros(2))
    with pytest.raises(RuntimeError, match="hard must be a \\[4, B\\]"):
        _C.epilogue_math(torch.zeros(2, 4), torch.ones(4), torch.zeros(2, 2), 1, 1.0, torch.zeros(2), torch.zeros(2))
