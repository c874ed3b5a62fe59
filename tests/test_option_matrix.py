"""Every option of every margin spec means the same thing on every backend and
in PartialFC: the loss, both gradients and the margin's state after a step
agree with the reference backend for each spec x (overflow, easy_margin,
detach_margin). MagFace(detach_margin=True) used to pass the margin's
gradient into ||x|| on the fused paths only (dx off by ~20%)."""
import itertools

import pytest
import torch

import margin_kernels as mk
from margin_kernels import backends

from conftest import rel_err, requires_cpp

pytestmark = requires_cpp

B, D, C = 9, 16, 23
IGNORED = 4

# (head class, spec keyword arguments): every family, non-default values where
# the defaults would hide a term.
SPECS = {
    "NormSoftmax": (mk.nn.NormSoftmax, dict(s=30.0)),
    "CosFace": (mk.nn.CosFace, dict(s=32.0)),
    "ArcFace": (mk.nn.ArcFace, dict(s=32.0)),
    "SphereFace": (mk.nn.SphereFace, dict(s=24.0)),
    "CombinedMargin": (mk.nn.CombinedMargin, dict(s=24.0, m1=1.3, m2=0.25, m3=0.15)),
    "ElasticArcFace": (mk.nn.ElasticArcFace, dict(s=32.0)),
    "ElasticCosFace+": (mk.nn.ElasticCosFace, dict(s=32.0, plus=True)),
    "ElasticArcFace+": (mk.nn.ElasticArcFace, dict(s=32.0, plus=True)),
    "AdaFace": (mk.nn.AdaFace, dict(s=32.0)),
    "MagFace": (mk.nn.MagFace, dict(s=16.0, lambda_g=0.0)),
    "MagFace-reg": (mk.nn.MagFace, dict(s=16.0)),
    "CurricularFace": (mk.nn.CurricularFace, dict(s=32.0)),
}
OPTIONS = [dict(overflow=o, easy_margin=e, detach_margin=d)
           for o, e, d in itertools.product(("classic", "none", "clip"), (False, True), (False, True))]
# (Triton under the interpreter is the slow column: the full suite runs it)
PATHS = ["cpp", "cpp-single-pass", "partial_fc"] + (
    [pytest.param("triton", marks=pytest.mark.slow)] if backends.is_available("triton") else [])


def problem():
    """Rows of every kind the options tell apart: near-parallel to the target
    (AdaFace's clip), near-antiparallel (theta + m > pi: the overflow rules),
    negative target cosines (easy margin), norms across MagFace's and
    AdaFace's ranges, one ignored row."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(C, D, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    x = torch.randn(B, D, generator=g)
    w_hat = torch.nn.functional.normalize(w, dim=1)
    x[0] = w_hat[y[0]] + 0.01 * torch.randn(D, generator=g)
    x[1] = -w_hat[y[1]] + 0.05 * torch.randn(D, generator=g)
    x[2] = -w_hat[y[2]] + 0.3 * torch.randn(D, generator=g)
    x = torch.nn.functional.normalize(x, dim=1) * torch.linspace(120.0, 5.0, B)[:, None]
    y[IGNORED] = -100
    return x, w, y


def step(path: str, head_cls, spec_kwargs: dict, x, w, y):
    """(loss, dx, dW, the margin's state) of one training step on ``path``."""
    x = x.clone().requires_grad_(True)
    generator = torch.Generator().manual_seed(3)
    if path == "partial_fc":
        spec = head_cls(D, C, **spec_kwargs).margin
        module = mk.PartialFC(D, C, spec, generator=generator)
        generator.manual_seed(3)  # (the weight's initialization drew from it)
        y = torch.where(y == -100, -1, y)  # PartialFC's ignored label
    else:
        backend = "reference" if path == "reference" else path.split("-")[0]
        single_pass = True if path.endswith("single-pass") else (False if backend == "cpp" else None)
        module = head_cls(D, C, **spec_kwargs, backend=backend, generator=generator,
                          options=mk.KernelOptions(single_pass=single_pass))
    with torch.no_grad():
        module.weight.copy_(w)
    loss = module(x, y)
    loss.backward()
    state = {k: v for k, v in module.state_dict().items() if k not in ("weight", "_extra_state")}
    return loss.detach(), x.grad, module.weight.grad, state


def reference_steps(name):
    head_cls, spec_kwargs = SPECS[name]
    x, w, y = problem()
    return {i: step("reference", head_cls, dict(spec_kwargs, **options), x, w, y)
            for i, options in enumerate(OPTIONS)}


_REFERENCE = {}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(SPECS))
def test_every_option_means_the_same_on_every_path(name, path):
    if name not in _REFERENCE:
        _REFERENCE[name] = reference_steps(name)
    head_cls, spec_kwargs = SPECS[name]
    x, w, y = problem()
    for i, options in enumerate(OPTIONS):
        got = step(path, head_cls, dict(spec_kwargs, **options), x, w, y)
        want = _REFERENCE[name][i]
        where = f"{name} {options} on {path}"
        assert rel_err(got[0], want[0]) < 1e-5, f"loss: {where}"
        for what, a, b in (("dx", got[1], want[1]), ("dW", got[2], want[2])):
            assert rel_err(a, b) < 2e-5, f"{what}: {where}"
            # entrywise too: an error confined to one row must not hide in the norm
            per_row = (a - b).abs().amax(dim=1) / b.abs().amax().clamp_min(1e-30)
            assert per_row.max() < 1e-4, f"{what} row {int(per_row.argmax())}: {where}"
        assert got[3].keys() == want[3].keys()
        for key in want[3]:
            assert torch.allclose(got[3][key].double(), want[3][key].double(), rtol=1e-6, atol=1e-7), f"{key}: {where}"


@pytest.mark.parametrize("name, option, value", [
    ("ArcFace", "overflow", "none"), ("ArcFace", "overflow", "clip"), ("ArcFace", "easy_margin", True),
    ("ArcFace", "detach_margin", True), ("MagFace", "detach_margin", True), ("CosFace", "easy_margin", True),
    ("AdaFace", "overflow", "classic"), ("CombinedMargin", "overflow", "none"),
])
def test_the_problem_tells_each_option_apart(name, option, value):
    """Each option changes the reference's result on this problem, so a path
    that ignored it would fail the matrix above."""
    head_cls, spec_kwargs = SPECS[name]
    x, w, y = problem()
    base = step("reference", head_cls, spec_kwargs, x, w, y)
    other = step("reference", head_cls, dict(spec_kwargs, **{option: value}), x, w, y)
    assert max(rel_err(a, b) for a, b in zip(other[:3], base[:3])) > 1e-3


def test_magface_detach_margin_in_the_reported_case():
    """The reported case: s=16, lambda_g=0, easy_margin=False, x = randn(8, 16) * 20,
    W = randn(30, 16): cpp's dx was ~20% off the reference's."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 16, generator=g) * 20, torch.randn(30, 16, generator=g)
    y = torch.randint(0, 30, (8,), generator=g)
    grads = []
    for backend in ("reference", "cpp"):
        xl = x.clone().requires_grad_(True)
        head = mk.nn.MagFace(16, 30, s=16.0, lambda_g=0.0, easy_margin=False, detach_margin=True, backend=backend)
        with torch.no_grad():
            head.weight.copy_(w)
        head(xl, y).backward()
        grads.append(xl.grad)
    assert rel_err(grads[1], grads[0]) < 1e-5
