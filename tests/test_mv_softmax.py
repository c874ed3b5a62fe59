"""MV-Softmax, the family added by following DESIGN.md's "adding a margin
family": the paper-level reference against a transcription of FaceX-Zoo's
head written here, the generic reference against it, every backend and
PartialFC against the reference, the head and the hard-negative rule."""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import margin_kernels as mk
from margin_kernels import backends, reference

from _dist import run_ranks
from conftest import assert_low_precision, backend_device, rel_err, requires_cpp, row_err

BACKENDS = ["cpp"] + (["triton"] if backends.is_available("triton") else [])
FORMS = ["am", "arc"]


def facex_zoo_loss(x, w, y, *, s=32.0, m=0.35, t=1.12, is_am=True):
    """FaceX-Zoo's MV_Softmax head as its forward reads (weight [D, C] there,
    [C, D] here), then cross-entropy: transcribed step by step, float64."""
    kernel_norm = F.normalize(w.t(), dim=0)
    cos_theta = torch.mm(F.normalize(x), kernel_norm)
    gt = cos_theta[torch.arange(0, y.shape[0]), y].view(-1, 1)
    if is_am:
        mask = cos_theta > gt - m
        final_gt = torch.where(gt > m, gt - m, gt)
    else:
        sin_theta = torch.sqrt(1.0 - torch.pow(gt, 2))
        cos_theta_m = gt * math.cos(m) - sin_theta * math.sin(m)
        mask = cos_theta > cos_theta_m
        final_gt = torch.where(gt > 0.0, cos_theta_m, gt)
    cos_theta = cos_theta.clone()
    hard_example = cos_theta[mask]
    cos_theta[mask] = t * hard_example + t - 1.0
    cos_theta.scatter_(1, y.view(-1, 1), final_gt)
    return F.cross_entropy(cos_theta * s, y)


def problem(b=21, d=12, c=37, seed=0, ignore=(4,)):
    """Targets pulled towards their class, so that some rows fall back
    (c_y <= m) and a minority of negatives are hard."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, d, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    pull = torch.rand(b, 1, generator=g) * 2.5
    x = torch.randn(b, d, generator=g) + pull * F.normalize(w[y], dim=1) * d**0.5
    for i in ignore:
        y[i] = -100
    return x, w, y


def threshold_gap(x, w, y, spec):
    """min |cos - threshold| over the valid rows' negatives, and the fraction
    that are hard: the rule is discontinuous, the backends must agree on it."""
    cos = F.normalize(x.double(), dim=1) @ F.normalize(w.double(), dim=1).t()
    valid = y != -100
    c_y = cos[valid].gather(1, y[valid, None])
    if spec.form == "am":
        threshold = c_y - spec.m
    else:
        threshold = c_y * math.cos(spec.m) - torch.sqrt(1 - c_y**2) * math.sin(spec.m)
    other = torch.ones_like(cos[valid], dtype=torch.bool).scatter_(1, y[valid, None], False)
    diff = (cos[valid] - threshold)[other]
    return diff.abs().min().item(), (diff > 0).double().mean().item()


SPECS = {form: mk.MVSoftmax(form=form) for form in FORMS}
SEEDS = (0, 1, 2)
PROBLEMS = [problem(seed=seed) for seed in SEEDS]


@pytest.mark.parametrize("form", FORMS)
def test_the_problems_exercise_the_rule_and_the_fallback(form):
    for x, w, y in PROBLEMS:
        gap, hard = threshold_gap(x, w, y, SPECS[form])
        assert gap > 1e-4 and 0.01 < hard < 0.5, (gap, hard)
    cos = F.normalize(PROBLEMS[0][0], dim=1) @ F.normalize(PROBLEMS[0][1], dim=1).t()
    y = PROBLEMS[0][2]
    c_y = cos[y >= 0].gather(1, y[y >= 0, None])
    assert (c_y <= SPECS["am"].m).any() and (c_y > SPECS["am"].m).any()  # both sides of AM's fallback


@pytest.mark.parametrize("form", FORMS)
def test_the_paper_reference_is_facex_zoos_head(form):
    x, w, y = problem(ignore=())
    x, w = x.double(), w.double()
    want = facex_zoo_loss(x, w, y, is_am=form == "am")
    assert abs(reference.mv_softmax_loss(x, w, y, form=form).item() - want.item()) < 1e-12


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_generic_reference_is_the_paper_reference(form, reduction):
    """Loss and gradients, with an ignored row and with sub-centers."""
    for k in (1, 2):
        x, w, y = PROBLEMS[1]
        wk = torch.randn(w.shape[0] * k, w.shape[1], generator=torch.Generator().manual_seed(3)) if k > 1 else w

        def grads(fn):
            a, b = x.double().requires_grad_(True), wk.double().requires_grad_(True)
            loss = fn(a, b)
            torch.manual_seed(7)
            upstream = torch.rand_like(loss) if loss.dim() else torch.ones_like(loss)
            (loss * upstream).sum().backward()
            return loss.detach(), a.grad, b.grad

        want = grads(lambda a, b: reference.mv_softmax_loss(a, b, y, form=form, reduction=reduction, subcenters=k))
        got = grads(lambda a, b: mk.margin_cross_entropy(a, b, y, SPECS[form], backend="reference",
                                                         reduction=reduction, subcenters=k))
        for g, r in zip(got, want):
            assert rel_err(g, r) < 1e-10


def test_reference_gradcheck():
    x, w, y = problem(b=5, d=4, c=6, seed=3, ignore=(1,))
    for form in FORMS:
        assert torch.autograd.gradcheck(
            lambda a, b: mk.margin_cross_entropy(a, b, y, SPECS[form], backend="reference"),
            (x.double().requires_grad_(True), w.double().requires_grad_(True)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("reduction", ["mean", "none"])  # ("sum": the mean's path times a count)
@pytest.mark.parametrize("single_pass", [True, False], ids=["single-pass", "class-blocked"])
def test_backends_equal_the_reference(backend, form, reduction, single_pass):
    if backend == "triton" and single_pass:
        pytest.skip("Triton has no single pass")
    x, w, y = PROBLEMS[0]
    xr, wr = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = reference.mv_softmax_loss(xr, wr, y, form=form, reduction=reduction)
    torch.manual_seed(7)
    upstream = torch.rand_like(ref) if ref.dim() else torch.ones_like(ref)
    (ref * upstream).sum().backward()
    dev = backend_device(backend)
    xf, wf = x.to(dev).clone().requires_grad_(True), w.to(dev).clone().requires_grad_(True)
    loss = mk.margin_cross_entropy(xf, wf, y.to(dev), SPECS[form], backend=backend, reduction=reduction,
                                   options=mk.KernelOptions(single_pass=single_pass))
    (loss * upstream.float().to(dev)).sum().backward()
    assert rel_err(loss.detach().cpu(), ref.detach()) < 1e-5
    for got, want in ((xf.grad, xr.grad), (wf.grad, wr.grad)):
        assert rel_err(got.cpu(), want) < 1e-5 and row_err(got.cpu(), want) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype):
    """Judged by the reference's own error in the same dtype (README's low-precision contract)."""
    x, w, y = problem(seed=13)  # its rounded cosines stay > 5e-3 from the rule's edge
    dev = backend_device(backend)

    def run(a, b, name):
        a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        loss = mk.margin_cross_entropy(a, b, y.to(a.device), SPECS["arc"], backend=name)
        loss.backward()
        return loss.detach().cpu(), a.grad.cpu(), b.grad.cpu()

    xl, wl = x.to(dtype), w.to(dtype)
    assert threshold_gap(xl.double(), wl.double(), y, SPECS["arc"])[0] > 5e-3
    truth = run(xl.double(), wl.double(), "reference")
    assert_low_precision(run(xl.to(dev), wl.to(dev), backend), run(xl, wl, "reference"), truth, backend)


def test_the_rule_is_data_the_kernels_take():
    """MV-Softmax's hard negatives: threshold, a = 0, b = t, d = t - 1, per
    row; ignored rows are never hard."""
    from margin_kernels.margins import StepBatch

    x, w, y = PROBLEMS[0]
    valid = y != -100
    cos = (F.normalize(x.double(), dim=1) * F.normalize(w.double()[y.clamp_min(0)], dim=1)).sum(1)
    sin = torch.sqrt(1 - cos**2)
    step = SPECS["am"].step(StepBatch(x, valid, cos, sin))
    hard = step.hard.packed()
    assert hard.shape == (4, x.shape[0]) and hard.dtype == torch.float32
    assert torch.isinf(hard[0, ~valid]).all()
    assert torch.allclose(hard[0, valid].double(), (cos - 0.35)[valid].float().double())
    assert (hard[1] == 0).all() and torch.allclose(hard[2], torch.tensor(1.12)) and torch.allclose(hard[3], torch.tensor(0.12))


def test_the_head():
    """Every parameter in the head's signature; the head's loss is the functional's."""
    params = inspect.signature(mk.nn.MVSoftmax).parameters
    assert list(params)[:5] == ["embedding_size", "num_classes", "s", "m", "t"]
    assert {"form", "backend", "subcenters", "device", "dtype"} <= set(params)
    assert params["form"].default == "am" and params["s"].default == 32.0
    x, w, y = PROBLEMS[1]
    head = mk.nn.MVSoftmax(x.shape[1], w.shape[0], form="arc", backend="reference")
    with torch.no_grad():
        head.weight.copy_(w)
    assert torch.allclose(head(x, y), mk.margin_cross_entropy(x, w, y, SPECS["arc"], backend="reference"))
    assert set(head.state_dict()) == {"weight", "_extra_state"}


@pytest.mark.parametrize("bad, match", [(dict(t=0.9), "t must be >= 1"), (dict(form="sphere"), "form must be"),
                                        (dict(m=1.2), "m must be in"), (dict(form="arc", m=2.0), "m must be in")])
def test_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        mk.MVSoftmax(**bad)


def _mv_ranks(rank, world, sizes, sample_rate):
    x, w, y = PROBLEMS[0]
    pfc = mk.PartialFC(x.shape[1], w.shape[0], SPECS["arc"], sample_rate=sample_rate,
                       generator=torch.Generator().manual_seed(rank))
    pfc.load_state_dict({"weight": w})
    start = sum(sizes[:rank])
    xr = x[start : start + sizes[rank]].clone().requires_grad_(True)
    loss = pfc(xr, torch.where(y == -100, -1, y)[start : start + sizes[rank]])
    loss.backward()
    index = pfc.last_sampled_index
    return dict(loss=loss.detach(), dx=xr.grad, dw=pfc.weight.grad.clone(), start=pfc.class_start,
                count=pfc.num_local, classes=None if index is None else index + pfc.class_start)


@requires_cpp
@pytest.mark.parametrize("world, sizes, sample_rate", [
    (1, [21], 1.0),
    pytest.param(2, [8, 13], 0.5, marks=pytest.mark.slow),
])
def test_partial_fc_equals_the_reference(tmp_path, world, sizes, sample_rate):
    results = run_ranks(_mv_ranks, world, sizes, sample_rate, outdir=str(tmp_path))
    x, w, y = PROBLEMS[0]
    classes = torch.arange(w.shape[0])
    if sample_rate < 1.0:
        classes = torch.cat([r["classes"] for r in results])
    remap = torch.full((w.shape[0],), -1, dtype=torch.long)
    remap[classes] = torch.arange(classes.numel())
    y_sub = torch.where(y >= 0, remap[y.clamp_min(0)], y)
    xr, wr = x.double().requires_grad_(True), w[classes].double().requires_grad_(True)
    ref = reference.mv_softmax_loss(xr, wr, y_sub, form="arc")
    ref.backward()
    dw_full = torch.zeros_like(w, dtype=torch.float64).index_copy_(0, classes, wr.grad)
    for rank, r in enumerate(results):
        assert rel_err(r["loss"], ref.detach()) < 1e-5
        start = sum(sizes[:rank])
        assert rel_err(r["dx"], xr.grad[start : start + sizes[rank]]) < 1e-5
        assert rel_err(r["dw"], dw_full[r["start"] : r["start"] + r["count"]]) < 1e-5
