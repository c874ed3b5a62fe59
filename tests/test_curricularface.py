"""CurricularFace: the reference written from the paper (gradcheck), every
backend against it, the running t, PartialFC's global t."""
import math

import pytest
import torch

import margin_kernels as mk
from margin_kernels import backends, reference
from margin_kernels.functional import target_cosines

from _dist import run_ranks
from conftest import assert_low_precision, backend_device, rel_err, requires_cpp

BACKENDS = ["cpp"] + (["triton"] if backends.is_available("triton") else [])
SPEC = mk.CurricularFace()
T = torch.tensor(0.35)  # a running t mid-training: c (t + c) differs from c


def threshold_gap(x, w, y, m=0.5):
    """min |cos - cos(theta_y + m)| over the valid rows' non-target columns, and
    the fraction of them that are hard: the data must keep every backend on
    the same side of the (discontinuous) rule."""
    cos = torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(w.double(), dim=1).t()
    valid = y != -100
    c_y = cos[valid].gather(1, y[valid, None]).clamp(-1, 1)
    c_m = torch.cos(torch.acos(c_y) + m)
    other = torch.ones_like(cos[valid], dtype=torch.bool).scatter_(1, y[valid, None], False)
    diff = (cos[valid] - c_m)[other]
    return diff.abs().min().item(), (diff > 0).double().mean().item()


def problem(b=23, d=12, c=41, seed=0, ignore=(3,), w=None):
    """Odd shapes; targets pulled towards their class so that hard negatives are
    a minority, as in training (``w``: these class weights)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, d, generator=torch.Generator().manual_seed(100)) if w is None else w
    y = torch.randint(0, c, (b,), generator=g)
    x = torch.randn(b, d, generator=g) + 2.0 * torch.nn.functional.normalize(w[y], dim=1) * d**0.5
    for i in ignore:
        y[i] = -100
    return x, w, y


# Seeds whose cosines all stay more than 5e-3 from their row's threshold (the
# rule is discontinuous: bf16 rounding must not flip an entry), with 1-3% hard.
SEEDS = (95, 2, 59, 80, 85)
PROBLEMS = [problem(seed=seed) for seed in SEEDS]


def test_the_problems_exercise_the_rule_away_from_its_edge():
    for x, w, y in PROBLEMS:
        gap, hard = threshold_gap(x, w, y)
        assert gap > 5e-3 and 0.01 < hard < 0.1


def test_reference_gradcheck():
    """t is detached (as in the official head): with momentum 0 the step's t
    does not move with the batch, and the loss is a plain function of x and W."""
    x, w, y = problem(b=6, d=5, c=7, seed=1)
    assert threshold_gap(x, w, y, m=0.5)[1] > 0  # hard negatives present
    x, w = x.double().requires_grad_(True), w.double().requires_grad_(True)
    loss = lambda a, b: reference.curricularface_loss(a, b, y, T.double(), momentum=0.0)[0]  # noqa: E731
    assert torch.autograd.gradcheck(loss, (x, w))


def test_the_generic_reference_agrees_with_the_paper():
    """margin_cross_entropy(backend='reference') (the generic oracle with the
    hard-negative rule) against curricularface_loss, written from the paper."""
    x, w, y = PROBLEMS[0]
    valid = y != -100
    t = SPEC.updated_t(T, target_cosines(x, w, y), valid)
    xr, wr = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref, t_ref = reference.curricularface_loss(xr, wr, y, T.double())
    ref.backward()
    assert abs(t.item() - t_ref.item()) < 1e-7
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = mk.margin_cross_entropy(xg, wg, y, SPEC, backend="reference", state={"t": t})
    loss.backward()
    assert rel_err(loss.detach(), ref.detach()) < 1e-6
    assert rel_err(xg.grad, xr.grad) < 1e-5 and rel_err(wg.grad, wr.grad) < 1e-5


def test_the_modulation_is_not_a_no_op():
    """Without it the loss would be ArcFace's: the tests above can fail."""
    x, w, y = PROBLEMS[0]
    curricular = mk.margin_cross_entropy(x, w, y, SPEC, backend="cpp", state={"t": T})
    arcface = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="cpp")
    assert abs(curricular.item() - arcface.item()) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", [0, 2])
@pytest.mark.parametrize("single_pass", [True, False], ids=["single-pass", "class-blocked"])
def test_backends_equal_the_reference(backend, reduction, case, single_pass):
    x, w, y = PROBLEMS[case]
    xr, wr = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref, t = reference.curricularface_loss(xr, wr, y, T.double(), reduction=reduction)
    torch.manual_seed(7)
    upstream = torch.rand_like(ref) if ref.dim() else torch.ones_like(ref)
    (ref * upstream).sum().backward()

    dev = backend_device(backend)
    xf, wf = x.to(dev).clone().requires_grad_(True), w.to(dev).clone().requires_grad_(True)
    loss = mk.margin_cross_entropy(xf, wf, y.to(dev), SPEC, backend=backend, reduction=reduction,
                                   state={"t": t.float().to(dev)}, options=mk.KernelOptions(single_pass=single_pass))
    (loss * upstream.float().to(dev)).sum().backward()
    assert rel_err(loss.detach().cpu(), ref.detach()) < 1e-5
    assert rel_err(xf.grad.cpu(), xr.grad) < 1e-5
    assert rel_err(wf.grad.cpu(), wr.grad) < 1e-5


@requires_cpp
def test_the_single_pass_shortcut_takes_the_hard_rule(monkeypatch):
    """cpp's row-chunked shortcut runs with hard negatives (several row chunks)."""
    from margin_kernels.backends import cpp

    calls = []
    real = cpp.single_pass
    monkeypatch.setattr(cpp, "single_pass", lambda *a, **k: calls.append(k["hard"]) or real(*a, **k))
    x, w, y = PROBLEMS[0]
    xr, wr = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref, t = reference.curricularface_loss(xr, wr, y, T.double())
    ref.backward()
    xf, wf = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    options = mk.KernelOptions(single_pass=True, workspace_bytes=4 * 41 * 5)  # 5 rows per chunk
    loss = mk.margin_cross_entropy(xf, wf, y, SPEC, backend="cpp", state={"t": t.float()}, options=options)
    loss.backward()
    assert len(calls) == 1 and calls[0] is not None and calls[0].shape == (4, x.shape[0])
    assert rel_err(loss.detach(), ref.detach()) < 1e-5
    assert rel_err(xf.grad, xr.grad) < 1e-5 and rel_err(wf.grad, wr.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype):
    """Judged by the reference's own error in the same dtype (README's low-precision contract)."""
    x, w, y = PROBLEMS[1]
    dev = backend_device(backend)
    t = reference.curricularface_loss(x.to(dtype).double(), w.to(dtype).double(), y, T.double())[1]

    def run(a, b, name):
        a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        loss = mk.margin_cross_entropy(a, b, y.to(a.device), SPEC, backend=name, state={"t": t})
        loss.backward()
        return loss.detach().cpu(), a.grad.cpu(), b.grad.cpu()

    xl, wl = x.to(dtype), w.to(dtype)
    truth = run(xl.double(), wl.double(), "reference")
    assert_low_precision(run(xl.to(dev), wl.to(dev), backend), run(xl, wl, "reference"), truth, backend)


def test_the_head_evolves_t_as_the_reference():
    """Five training steps: t follows the official update (over the valid
    rows), each step's loss and gradients are the reference's; eval mode and a
    failing call leave t alone."""
    head = mk.nn.CurricularFace(12, 41)
    w = PROBLEMS[0][1]
    with torch.no_grad():
        head.weight.copy_(w)
    t = torch.tensor(0.0, dtype=torch.float64)
    for step in range(5):
        x, _, y = PROBLEMS[step]
        xr, wr = x.double().requires_grad_(True), head.weight.detach().double().requires_grad_(True)
        ref, t = reference.curricularface_loss(xr, wr, y, t)
        ref.backward()
        xg = x.clone().requires_grad_(True)
        head.weight.grad = None
        loss = head(xg, y)
        loss.backward()
        assert abs(head.t.item() - t.item()) < 1e-6
        assert rel_err(loss.detach(), ref.detach()) < 1e-5
        assert rel_err(xg.grad, xr.grad) < 1e-5 and rel_err(head.weight.grad, wr.grad) < 1e-5
    assert head.t.item() > 0.0
    head.eval()
    head(*PROBLEMS[0][::2])
    assert abs(head.t.item() - t.item()) < 1e-6
    head.train()
    bad_labels = PROBLEMS[0][2].clone()
    bad_labels[0] = 41
    with pytest.raises(ValueError, match="labels"):
        head(PROBLEMS[0][0], bad_labels)
    assert abs(head.t.item() - t.item()) < 1e-6
    assert set(head.state_dict()) == {"weight", "t", "_extra_state"}


def test_a_batch_without_valid_rows_leaves_t_alone():
    head = mk.nn.CurricularFace(12, 41)
    x, _, y = PROBLEMS[0]
    head(x, torch.full_like(y, -100))
    assert head.t.item() == 0.0


def test_the_functional_form_says_what_it_needs():
    x, w, y = PROBLEMS[0]
    with pytest.raises(ValueError, match=r"keeps a running state \(t\)"):
        mk.margin_cross_entropy(x, w, y, SPEC)
    with pytest.raises(ValueError, match=r"state must hold ArcFace's nothing, got \['t'\]"):
        mk.margin_cross_entropy(x, w, y, mk.ArcFace(), state={"t": 0.1})
    with pytest.raises(ValueError, match=r"state must hold CurricularFace's \['t'\]"):
        mk.margin_cross_entropy(x, w, y, SPEC, state={"T": 0.1})
    with pytest.raises(ValueError, match="must be a scalar"):
        mk.margin_cross_entropy(x, w, y, SPEC, state={"t": torch.zeros(2)})
    with pytest.raises(ValueError, match="must be finite"):
        mk.margin_cross_entropy(x, w, y, SPEC, state={"t": math.nan})
    with pytest.raises(TypeError, match=r"state\['t'\] must be a float"):
        mk.margin_cross_entropy(x, w, y, SPEC, state={"t": "0.1"})


@pytest.mark.parametrize("bad, match", [(dict(m=2.0), "m must be in"), (dict(momentum=0.0), "momentum must be in")])
def test_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        mk.CurricularFace(**bad)


@requires_cpp
def test_the_kernels_check_the_hard_rule():
    from margin_kernels import _C

    x = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    w = torch.randn(5, 8)
    inv = 1 / w.norm(dim=1)
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="hard must be a \\[4, B\\]"):
        _C.lse_forward(x, w, inv, labels, torch.zeros(4), 1.0, 2, None, torch.zeros(4, 3))
    with pytest.raises(RuntimeError, match="hard must be a \\[4, B\\]"):
        _C.lse_forward(x, w, inv, labels, torch.zeros(4), 1.0, 2, None, torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match="hard must be contiguous float32"):
        _C.lse_backward(x, w, inv, labels, torch.zeros(4), torch.ones(4), 1.0, 2, None, torch.zeros(4, 4).double())


def test_compiles_fullgraph():
    def loss_fn(x, w, y, t):
        return mk.margin_cross_entropy(x, w, y, SPEC, backend="cpp", state={"t": t})

    x, w, y = PROBLEMS[0]
    x = x.clone().requires_grad_(True)
    eager = torch.autograd.grad(loss_fn(x, w, y, T), x)[0]
    compiled = torch.autograd.grad(torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(x, w, y, T), x)[0]
    assert rel_err(compiled, eager) < 1e-5


def _curricular_ranks(rank, world, sizes, sample_rate, steps):
    """``steps`` training steps of PartialFC on this rank's rows; each step's
    loss, this rank's dx and dW, and t."""
    pfc = mk.PartialFC(12, 41, mk.CurricularFace(), sample_rate=sample_rate,
                       generator=torch.Generator().manual_seed(rank))
    pfc.load_state_dict({"weight": PROBLEMS[0][1], "t": torch.tensor(0.0)})
    out = []
    start = sum(sizes[:rank])
    for step in range(steps):
        x, _, y = PROBLEMS[step]
        xr = x[start : start + sizes[rank]].clone().requires_grad_(True)
        pfc.weight.grad = None
        loss = pfc(xr, torch.where(y == -100, -1, y)[start : start + sizes[rank]])
        loss.backward()
        index = pfc.last_sampled_index
        out.append(dict(loss=loss.detach(), dx=xr.grad, dw=pfc.weight.grad.clone(), t=pfc.t.clone(),
                        classes=None if index is None else index + pfc.class_start))
    return dict(steps=out, start=pfc.class_start, count=pfc.num_local)


@requires_cpp
@pytest.mark.slow
@pytest.mark.parametrize("world, sizes, sample_rate", [(2, [9, 14], 1.0), (3, [5, 0, 18], 0.5)])
def test_partial_fc_uses_the_global_t(tmp_path, world, sizes, sample_rate):
    """Uneven (and empty) batches over 2-3 ranks, sampled and not, equal one
    process with the whole batch over 3 steps: t is the global batch's, on
    every rank; unsampled rows' gradient is zero."""
    steps = 3
    results = run_ranks(_curricular_ranks, world, sizes, sample_rate, steps, outdir=str(tmp_path))
    t = torch.tensor(0.0, dtype=torch.float64)
    for step in range(steps):
        x, w, y = PROBLEMS[step]
        # the softmax over the classes the ranks read (all, or their samples)
        classes = torch.arange(w.shape[0])
        if sample_rate < 1.0:
            classes = torch.cat([r["steps"][step]["classes"] for r in results])
        remap = torch.full((w.shape[0],), -1, dtype=torch.long)
        remap[classes] = torch.arange(classes.numel())
        y_sub = torch.where(y >= 0, remap[y.clamp_min(0)], y)
        assert (y_sub[y >= 0] >= 0).all()
        xr, wr = x.double().requires_grad_(True), w[classes].double().requires_grad_(True)
        # t's update reads the target cosines, which do not depend on the sample
        _, t_next = reference.curricularface_loss(x.double(), w.double(), y, t)
        ref, t_sub = reference.curricularface_loss(xr, wr, y_sub, t)
        assert abs(t_sub.item() - t_next.item()) < 1e-12
        t = t_next
        ref.backward()
        dw_full = torch.zeros_like(w, dtype=torch.float64).index_copy_(0, classes, wr.grad)
        for rank, r in enumerate(results):
            got = r["steps"][step]
            assert abs(got["t"].item() - t.item()) < 1e-6
            assert rel_err(got["loss"], ref.detach()) < 1e-5
            start = sum(sizes[:rank])
            if sizes[rank]:
                assert rel_err(got["dx"], xr.grad[start : start + sizes[rank]]) < 1e-5
            assert rel_err(got["dw"], dw_full[r["start"] : r["start"] + r["count"]]) < 1e-5
