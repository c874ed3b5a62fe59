"""The oracle shares nothing with what it judges: the generic reference
computes margins, elastic orders, hard-negative masks, sub-center choices and
fallbacks from the raw inputs and the spec's numbers with its own code, and
agrees on its own with float64 formulas written here from the papers. The
paper-level references take sub-centers, so every family is judged with them."""
import ast
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import margin_kernels as mk
from margin_kernels import backends, reference

from conftest import rel_err, requires_cpp

# What computes margins, targets or masks for the fused paths.
FUSED_HELPERS = {"row_margins", "step", "packed", "check_state", "fixed_triple", "margins_from_norms", "margins_from_magnitudes",
                 "updated_t", "updated_statistics", "clipped_norms", "magnitudes", "regularizer",
                 "_sort_by_difficulty", "target_logit", "draw_margins", "target_cosines"}
ALLOWED_MODULES = {"__future__", "math", "torch", "torch.nn.functional", "margins"}


def test_the_generic_reference_imports_and_calls_nothing_of_the_fused_path():
    tree = ast.parse(inspect.getsource(reference))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "") in ALLOWED_MODULES, f"reference imports from {node.module}"
            if node.module == "margins":  # spec classes and constants only
                for alias in node.names:
                    assert alias.name not in FUSED_HELPERS, alias.name
        elif isinstance(node, ast.Import):
            assert all(a.name in ALLOWED_MODULES for a in node.names), [a.name for a in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            assert node.attr not in FUSED_HELPERS, f"reference uses .{node.attr}"
        elif isinstance(node, ast.Name):
            assert node.id not in FUSED_HELPERS, f"reference uses {node.id}"


# ---------------------------------------------------------------- float64 formulas, written here

def paper_loss(x, w, y, s, m1, m2, m3, *, easy=False, overflow="classic", hard_t=None, hard_m=None):
    """sum over rows of CE with z_y = s (cos(m1 theta + m2) - m3), theta = arccos
    (the rows are kept away from +-1), per-row margins as [B] float64 lists."""
    x_hat, w_hat = F.normalize(x, dim=1), F.normalize(w, dim=1)
    total = 0.0
    for i in range(x.shape[0]):
        if y[i] < 0:
            continue
        cos = (w_hat @ x_hat[i]).tolist()
        c = cos[y[i]]
        theta = math.acos(c)
        angle = m1[i] * theta + m2[i]
        if overflow == "classic" and angle >= math.pi:
            t = c - m2[i] * math.sin(m2[i]) - m3[i]
        else:
            t = math.cos(angle) - m3[i]
        if easy and c <= 0:
            t = c
        if hard_t is not None:
            threshold = math.cos(theta + hard_m)
            cos = [cj * (hard_t + cj) if cj > threshold else cj for cj in cos]
        z = [s * cj for cj in cos]
        z[y[i]] = s * t
        total += math.log(sum(math.exp(v - max(z)) for v in z)) + max(z) - s * t
    return total


def problem(b=9, d=6, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (b,), generator=g)
    x[0] = -F.normalize(w[y[0]], dim=0) + 0.05 * torch.randn(d, generator=g, dtype=torch.float64)  # theta + m > pi
    y[3] = -100
    return x, w, y


@pytest.mark.parametrize("spec, triple", [
    (mk.NormSoftmax(s=10.0), (1.0, 0.0, 0.0)), (mk.CosFace(s=10.0), (1.0, 0.0, 0.35)),
    (mk.ArcFace(s=10.0), (1.0, 0.5, 0.0)), (mk.SphereFace(s=10.0, m=1.7), (1.7, 0.0, 0.0)),
    (mk.CombinedMargin(10.0, 1.3, 0.4, 0.2), (1.3, 0.4, 0.2)),  # m1 != 1: the fallback c - m2 sin m2 - m3
    (mk.ArcFace(s=10.0, easy_margin=True), (1.0, 0.5, 0.0)), (mk.ArcFace(s=10.0, overflow="none"), (1.0, 0.5, 0.0)),
])
def test_the_reference_agrees_with_the_papers_formulas(spec, triple):
    x, w, y = problem()
    got = reference.margin_cross_entropy(x, w, y, spec, reduction="sum")[0].item()
    per_row = [[v] * x.shape[0] for v in triple]
    want = paper_loss(x, w, y.tolist(), spec.s, *per_row, easy=spec.easy_margin, overflow=spec.overflow)
    assert abs(got - want) <= 1e-12 * abs(want)


@pytest.mark.parametrize("spec", [mk.ElasticArcFace(s=10.0, plus=True), mk.ElasticCosFace(s=10.0, plus=True),
                                  mk.ElasticArcFace(s=10.0)])
def test_the_reference_draws_and_sorts_elastic_margins_on_its_own(spec):
    """Drawn as N(m, std) in float32 from the generator; plus: the valid row with
    the lowest target cosine gets the largest margin (sorted here with Python)."""
    x, w, y = problem(seed=2)
    draws = torch.normal(torch.full((x.shape[0],), spec.m), spec.std,
                         generator=torch.Generator().manual_seed(5)).double().tolist()
    m = list(draws)
    if spec.plus:
        cosines = {i: float(F.normalize(x[i], dim=0) @ F.normalize(w[y[i]], dim=0)) for i in range(len(y)) if y[i] >= 0}
        rows = sorted(cosines, key=lambda i: -cosines[i])  # easiest first
        for i, value in zip(rows, sorted(draws[i] for i in cosines)):
            m[i] = value
    zeros, ones = [0.0] * len(m), [1.0] * len(m)
    triple = (ones, m, zeros) if isinstance(spec, mk.ElasticArcFace) else (ones, zeros, m)
    want = paper_loss(x, w, y.tolist(), spec.s, *triple)
    got = reference.margin_cross_entropy(x, w, y, spec, reduction="sum",
                                         generator=torch.Generator().manual_seed(5))[0].item()
    assert abs(got - want) <= 1e-12 * abs(want)


def test_the_reference_masks_hard_negatives_on_its_own():
    x, w, y = problem(seed=3)
    spec = mk.CurricularFace(s=10.0, m=0.4)
    got = reference.margin_cross_entropy(x, w, y, spec, reduction="sum", state={"t": 0.3})[0].item()
    ones, m, zeros = [1.0] * 9, [0.4] * 9, [0.0] * 9
    want = paper_loss(x, w, y.tolist(), spec.s, ones, m, zeros, hard_t=0.3, hard_m=0.4)
    assert abs(got - want) <= 1e-12 * abs(want)


def test_the_reference_chooses_sub_centers_on_its_own():
    """A class's cosine is the max over its sub-centers: the same as the
    problem with each class's nearest sub-center picked here."""
    x, w, y = problem(seed=4)
    k = 3
    wk = torch.randn(w.shape[0] * k, w.shape[1], generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    cos = F.normalize(x, dim=1) @ F.normalize(wk, dim=1).t()
    got = reference.margin_cross_entropy(x, wk, y, mk.ArcFace(s=10.0), reduction="sum", subcenters=k)[0].item()
    total = 0.0
    for i in range(x.shape[0]):  # per row, the weight whose rows are the row's nearest sub-centers
        nearest = cos[i].view(-1, k).argmax(dim=1)
        w_i = wk.view(-1, k, wk.shape[1])[torch.arange(w.shape[0]), nearest]
        total += paper_loss(x[i:i + 1], w_i, [int(y[i])], 10.0, [1.0], [0.5], [0.0])
    assert abs(got - total) <= 1e-12 * abs(total)


# ---------------------------------------------------------------- every family with sub-centers

FUSED = ["cpp"] + (["triton"] if backends.is_available("triton") else [])
K = 3


def family_problem():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(10, 12, generator=g) * 25
    w = torch.randn(7 * K, 12, generator=g)
    y = torch.randint(0, 7, (10,), generator=g)
    y[2] = -100
    return x, w, y


def grads(fn, x, w):
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = fn(x, w)
    loss.backward()
    return loss.detach(), x.grad, w.grad


@requires_cpp
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("family", ["adaface", "magface", "curricular"])
def test_every_family_with_subcenters_against_its_paper_reference(family, backend):
    x, w, y = family_problem()
    if family == "adaface":
        head = mk.nn.AdaFace(12, 7, subcenters=K, backend=backend)
        want_fn = lambda a, b: reference.adaface_loss(  # noqa: E731
            a, b, y, torch.tensor(20.0 * 0.99 + 0.01 * float(a.detach().norm(dim=1)[y != -100].clamp(0.001, 100).mean())),
            torch.tensor(100.0 * 0.99 + 0.01 * float(a.detach().norm(dim=1)[y != -100].clamp(0.001, 100).std())),
            subcenters=K)
    elif family == "magface":
        head = mk.nn.MagFace(12, 7, subcenters=K, backend=backend)
        want_fn = lambda a, b: reference.magface_loss(a, b, y, subcenters=K)  # noqa: E731
    else:
        head = mk.nn.CurricularFace(12, 7, subcenters=K, backend=backend)
        want_fn = lambda a, b: reference.curricularface_loss(a, b, y, torch.tensor(0.0), subcenters=K)[0]  # noqa: E731
    with torch.no_grad():
        head.weight.copy_(w)

    def got_fn(a, b):
        with torch.no_grad():
            head.weight.copy_(b)
        head.weight.grad = None
        loss = head(a, y)
        return loss

    xg = x.clone().requires_grad_(True)
    got_loss = got_fn(xg, w)
    got_loss.backward()
    want = grads(want_fn, x, w)
    assert rel_err(got_loss.detach(), want[0]) < 1e-5
    assert rel_err(xg.grad, want[1]) < 1e-5
    assert rel_err(head.weight.grad, want[2]) < 1e-5


@pytest.mark.parametrize("spec, kwargs", [
    (mk.ElasticArcFace(plus=True), dict(generator=torch.Generator().manual_seed(1))),
    (mk.ElasticCosFace(), dict(generator=torch.Generator().manual_seed(1))),
    (mk.CurricularFace(), dict(state={"t": 0.2})),
    (mk.CombinedMargin(m1=1.2, m2=0.3, m3=0.1), dict(subcenters=1)),
    (mk.MVSoftmax(form="arc"), {}),
    (mk.AdaFace(), dict(state={"batch_mean": 3.0, "batch_std": 1.0})),
    (mk.MagFace(), {}),
], ids=["elastic-arc+", "elastic-cos", "curricular", "combined", "mv-arc", "adaface", "magface"])
def test_the_reference_backend_calls_none_of_the_fused_paths_helpers(monkeypatch, spec, kwargs):
    """margin_cross_entropy(backend="reference") used to hand the oracle margins
    drawn and sorted by the fused path's code and CurricularFace's mask from
    its hard-negative rule: a bug there was invisible."""
    from margin_kernels import _targets, functional, margins

    def forbidden(*args, **kw):
        raise AssertionError("the oracle called a helper of the fused path")

    for owner, name in [(margins.Margin, "row_margins"), (margins._Elastic, "row_margins"),
                        (margins.Margin, "step"), (margins._Elastic, "step"), (margins.CurricularFace, "step"),
                        (margins.MVSoftmax, "step"), (margins.Margin, "target"), (margins.MVSoftmax, "target"),
                        (margins, "target_logit"),
                        (margins, "_sort_by_difficulty"), (functional, "draw_margins"),
                        (functional, "geometry"), (_targets, "geometry"), (_targets, "target_rows")]:
        monkeypatch.setattr(owner, name, forbidden)
    x, w, y = problem(seed=6)
    loss = mk.margin_cross_entropy(x, w, y, spec, backend="reference", **kwargs)
    assert torch.isfinite(loss)
