"""Sub-center ArcFace: the reference written from the paper (gradcheck), the
fused loss of every backend against it (with every margin, CurricularFace's
hard negatives, sampled PartialFC), and the clean-up step."""
import math

import pytest
import torch
import torch.nn.functional as F

import margin_kernels as mk
from margin_kernels import backends, reference
from margin_kernels.subcenters import dominant_subcenters, far_from_dominant

from _dist import run_ranks
from conftest import assert_low_precision, backend_device, rel_err, requires_cpp, row_err

BACKENDS = ["cpp"] + (["triton"] if backends.is_available("triton") else [])
K = 3


def subcenter_gap(x, w, k=K):
    """min over (row, class) of the gap between the two nearest sub-centers:
    the data must keep every backend on the same arg-max."""
    cos = F.normalize(x.double(), dim=1) @ F.normalize(w.double(), dim=1).t()
    top = cos.view(x.shape[0], -1, k).topk(2, dim=2).values
    return (top[..., 0] - top[..., 1]).min().item()


def problem(b=23, d=12, c=41, k=K, seed=0, ignore=(3,)):
    """Odd shapes; each row near one sub-center of its class."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c * k, d, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    sub = torch.randint(0, k, (b,), generator=g)
    x = torch.randn(b, d, generator=g) + 1.5 * F.normalize(w[y * k + sub], dim=1) * d**0.5
    for i in ignore:
        y[i] = -100
    return x, w, y


# Seeds whose two nearest sub-centers stay more than 1e-4 apart everywhere
# (in bf16 and fp16 too for the first).
PROBLEMS = [problem(seed=seed) for seed in (5, 2, 7)]
MARGINS = {"ArcFace": mk.ArcFace(), "CosFace": mk.CosFace(),
           "Combined": mk.CombinedMargin(s=48.0, m1=1.3, m2=0.25, m3=0.15), "SphereFace": mk.SphereFace(s=32.0)}


def test_the_problems_keep_away_from_ties():
    for x, w, _ in PROBLEMS:
        assert subcenter_gap(x, w) > 1e-4
    x, w, _ = PROBLEMS[0]
    for dtype in (torch.bfloat16, torch.float16):
        assert subcenter_gap(x.to(dtype).float(), w.to(dtype).float()) > 1e-4


def test_reference_gradcheck_reaches_the_argmax_only():
    g = torch.Generator().manual_seed(0)
    c, k, d = 5, 3, 6
    x = torch.randn(7, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c * k, d, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, 0, -100])
    assert torch.autograd.gradcheck(lambda a, b: reference.subcenter_loss(a, b, y, subcenters=k), (x, w))
    reference.subcenter_loss(x, w, y, subcenters=k).backward()
    # rows of W that are the arg-max of no (sample, class) pair get no gradient
    cos = F.normalize(x[:6].detach()) @ F.normalize(w.detach()).t()
    used = torch.zeros(c * k, dtype=torch.bool)
    used[(cos.view(6, c, k).argmax(2) + torch.arange(c) * k).flatten()] = True
    assert (w.grad[~used] == 0).all() and (w.grad[used].abs().sum(1) > 0).all()


def test_generic_reference_gradcheck():
    """The generic oracle with sub-centers and a margin of every term."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4 * 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 1, -100])
    margin = MARGINS["Combined"]
    loss = lambda a, b: reference.margin_cross_entropy(a, b, y, margin, subcenters=2)[0]  # noqa: E731
    assert torch.autograd.gradcheck(loss, (x, w))


def test_with_one_subcenter_it_is_arcface():
    g = torch.Generator().manual_seed(1)
    x, w, y = torch.randn(9, 8, generator=g), torch.randn(11, 8, generator=g), torch.randint(0, 11, (9,), generator=g)
    loss, _ = reference.margin_cross_entropy(x, w, y, mk.ArcFace())
    assert abs(reference.subcenter_loss(x, w, y, subcenters=1).item() - loss.item()) < 1e-4


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_the_loss_equals_the_paper(backend):
    """margin_cross_entropy(..., subcenters=3) with ArcFace against
    subcenter_loss, written from the paper."""
    x, w, y = PROBLEMS[0]
    xr, wr = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = reference.subcenter_loss(xr, wr, y, subcenters=K, s=64.0, m=0.5)
    ref.backward()
    dev = backend_device(backend)
    xg, wg = x.to(dev).clone().requires_grad_(True), w.to(dev).clone().requires_grad_(True)
    loss = mk.margin_cross_entropy(xg, wg, y.to(dev), mk.ArcFace(), backend=backend, subcenters=K)
    loss.backward()
    assert rel_err(loss.detach().cpu(), ref.detach()) < 1e-5
    assert rel_err(xg.grad.cpu(), xr.grad) < 1e-5 and rel_err(wg.grad.cpu(), wr.grad) < 1e-5


def test_subcenters_are_not_a_no_op():
    """The max over sub-centers changes the loss: the tests here can fail."""
    x, w, y = PROBLEMS[0]
    with_k = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="reference", subcenters=K)
    first_only = mk.margin_cross_entropy(x, w[::K].contiguous(), y, mk.ArcFace(), backend="reference")
    assert abs(with_k.item() - first_only.item()) > 1e-1


def _fused_vs_reference(backend, margin, reduction, case=0, dtype=torch.float32, options=None, hard_t=None):
    x, w, y = PROBLEMS[case]
    x, w = x.to(dtype), w.to(dtype)
    m = margin.row_margins(x.shape[0])
    extra = {} if hard_t is None else dict(state={"t": hard_t})
    xr, wr = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = mk.margin_cross_entropy(xr, wr, y, margin, backend="reference", reduction=reduction, margins=m,
                                  subcenters=K, **extra)
    torch.manual_seed(7)
    upstream = torch.rand_like(ref) if ref.dim() else torch.ones_like(ref)
    (ref * upstream).sum().backward()
    dev = backend_device(backend)
    xf, wf = x.to(dev).clone().requires_grad_(True), w.to(dev).clone().requires_grad_(True)
    loss = mk.margin_cross_entropy(xf, wf, y.to(dev), margin, backend=backend, reduction=reduction,
                                   margins=tuple(v.to(dev) for v in m), subcenters=K, options=options, **extra)
    (loss * upstream.float().to(dev)).sum().backward()
    return (loss.detach().cpu(), ref.detach()), (xf.grad.float().cpu(), xr.grad), (wf.grad.float().cpu(), wr.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(MARGINS))
@pytest.mark.parametrize("single_pass", [True, False], ids=["single-pass", "class-blocked"])
def test_backends_equal_the_reference(backend, reduction, name, single_pass):
    pairs = _fused_vs_reference(backend, MARGINS[name], reduction, case=1,
                                options=mk.KernelOptions(single_pass=single_pass))
    for got, want in pairs:
        assert rel_err(got, want) < 1e-5
        assert row_err(got, want) < 1e-4  # per row too: an arg-max row's error is not diluted


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [2, 4, 5])
@pytest.mark.parametrize("single_pass", [True, False], ids=["single-pass", "class-blocked"])
def test_other_subcenter_counts(backend, k, single_pass):
    """K = 2 and 4 (the cpp epilogue's unrolled cases besides 3) and 5 (its
    generic loop)."""
    x, w, y = problem(b=19, d=10, c=13, k=k, seed=11)
    assert subcenter_gap(x, w, k) > 1e-5
    xr, wr = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = mk.margin_cross_entropy(xr, wr, y, mk.ArcFace(), backend="reference", subcenters=k)
    ref.backward()
    dev = backend_device(backend)
    xf, wf = x.to(dev).clone().requires_grad_(True), w.to(dev).clone().requires_grad_(True)
    loss = mk.margin_cross_entropy(xf, wf, y.to(dev), mk.ArcFace(), backend=backend, subcenters=k,
                                   options=mk.KernelOptions(single_pass=single_pass))
    loss.backward()
    assert rel_err(loss.detach().cpu(), ref.detach()) < 1e-5
    assert rel_err(xf.grad.cpu(), xr.grad) < 1e-5 and rel_err(wf.grad.cpu(), wr.grad) < 1e-5


@requires_cpp
def test_the_single_pass_shortcut_takes_subcenters(monkeypatch):
    """cpp's row-chunked shortcut runs with sub-centers (several row chunks)."""
    from margin_kernels.backends import cpp

    calls = []
    real = cpp.single_pass
    monkeypatch.setattr(cpp, "single_pass", lambda *a, **k: calls.append(k["subcenters"]) or real(*a, **k))
    options = mk.KernelOptions(single_pass=True, workspace_bytes=4 * 41 * K * 5)  # 5 rows per chunk
    for got, want in _fused_vs_reference("cpp", mk.ArcFace(), "mean", options=options):
        assert rel_err(got, want) < 1e-5
    assert calls == [K]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [mk.KernelOptions(workspace_bytes=4096),
                                     mk.KernelOptions(triton_backward="split")], ids=["small-blocks", "split"])
def test_blocks_and_backwards(backend, options):
    """Several class blocks (cpp) / the split backward request (triton, which
    runs the atomic one with sub-centers)."""
    for got, want in _fused_vs_reference(backend, mk.ArcFace(), "mean", case=2, options=options):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype):
    """Half-precision inputs (the reference sees the same rounded values);
    small workspace: bf16/fp16 dW goes through chunks of an fp32 scratch."""
    options = mk.KernelOptions(workspace_bytes=4096)
    x, w, y = PROBLEMS[0]
    x, w = x.to(dtype), w.to(dtype)

    def run(a, b, name, **kwargs):
        a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        loss = mk.margin_cross_entropy(a, b, y.to(a.device), mk.ArcFace(), backend=name, subcenters=K, **kwargs)
        loss.backward()
        return loss.detach().cpu(), a.grad.cpu(), b.grad.cpu()

    dev = backend_device(backend)
    truth, ref = run(x.double(), w.double(), "reference"), run(x, w, "reference")
    assert_low_precision(run(x.to(dev), w.to(dev), backend, options=options), ref, truth, backend)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not available")
@pytest.mark.parametrize("class_index", [False, True])
def test_triton_half_weight_gradient_in_chunks(class_index):
    """bf16 weights over 300 classes: dW goes through two chunks of the fp32
    scratch (256 classes, 2 rows each), directly or through a class index."""
    from margin_kernels.backends import triton_backend as tb

    k, c = 2, 300
    x, w, y = problem(b=9, d=8, c=c, k=k, seed=4, ignore=())
    dev = backend_device("triton")
    x_hat = F.normalize(x, dim=1).to(dev)
    w = w.to(torch.bfloat16).to(dev)
    index = torch.arange(c * k, device=dev) if class_index else None
    inv = tb.row_inv_norms(w, class_index=index)
    labels = y.to(dev)
    opts = mk.KernelOptions(workspace_bytes=1).resolved()
    target = torch.zeros(9, device=dev)
    lse = tb.lse_forward(x_hat, w, inv, labels, target, scale=8.0, options=opts, class_index=index, subcenters=k)
    g = torch.ones(9, device=dev)
    dx, dw = tb.lse_backward(x_hat, w, inv, labels, lse, g, scale=8.0, options=opts, class_index=index, subcenters=k)
    # the same sums by hand: softmax over the max cosines, the target logit 0, no target share
    xr, wr = x_hat.double().cpu().requires_grad_(True), w.double().cpu().requires_grad_(True)
    cos = xr @ F.normalize(wr, dim=1).t()
    z = 8.0 * cos.view(9, c, k).amax(2)
    z = torch.where(F.one_hot(y, c).bool(), torch.zeros_like(z), z)
    ref_lse = torch.logsumexp(z, dim=1)
    assert rel_err(lse.cpu(), ref_lse.detach()) < 1e-5
    ref_lse.sum().backward()
    assert rel_err(dx.cpu(), xr.grad) < 1e-4 and rel_err(dw.float().cpu(), wr.grad) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_curricularface_hard_negatives(backend):
    """Sub-centers under CurricularFace's modulation: the hard rule applies to
    each class's max cosine."""
    x, w, y = PROBLEMS[0]
    t = torch.tensor(0.3)
    cos = F.normalize(x.double(), dim=1) @ F.normalize(w.double(), dim=1).t()
    cos = cos.view(x.shape[0], -1, K).amax(2)
    valid = y != -100
    c_y = cos[valid].gather(1, y[valid, None]).clamp(-1, 1)
    gap = (cos[valid] - torch.cos(torch.acos(c_y) + 0.5)).abs()
    assert gap.min() > 2e-5 and (cos[valid] > torch.cos(torch.acos(c_y) + 0.5)).sum() > y.shape[0]  # hard ones exist
    for got, want in _fused_vs_reference(backend, mk.CurricularFace(), "mean", hard_t=t):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_frozen_weight(backend):
    x, w, y = PROBLEMS[0]
    dev = backend_device(backend)
    xr = x.double().requires_grad_(True)
    mk.margin_cross_entropy(xr, w.double(), y, mk.ArcFace(), backend="reference", subcenters=K).backward()
    xf = x.to(dev).clone().requires_grad_(True)
    mk.margin_cross_entropy(xf, w.to(dev), y.to(dev), mk.ArcFace(), backend=backend, subcenters=K).backward()
    assert rel_err(xf.grad.cpu(), xr.grad) < 1e-5


def test_heads_own_a_subcenter_weight():
    x, w, y = PROBLEMS[0]
    head = mk.nn.ArcFace(12, 41, subcenters=K)
    assert head.weight.shape == (41 * K, 12) and "subcenters=3" in repr(head)
    with torch.no_grad():
        head.weight.copy_(w)
    want = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="reference", subcenters=K)
    assert rel_err(head(x, y).detach(), want) < 1e-5
    curricular = mk.nn.CurricularFace(12, 41, subcenters=K)
    with torch.no_grad():
        curricular.weight.copy_(w)
    loss = curricular(x, y)
    t = mk.CurricularFace().updated_t(torch.tensor(0.0), mk.functional.target_cosines(x, w, y, subcenters=K), y != -100)
    assert abs(curricular.t.item() - t.item()) < 1e-7
    assert rel_err(loss.detach(), mk.margin_cross_entropy(x, w, y, mk.CurricularFace(), backend="reference",
                                                          state={"t": t}, subcenters=K)) < 1e-5


@requires_cpp
@pytest.mark.parametrize("head", ["AdaFace", "MagFace", "ElasticArcFace"])
def test_feature_heads_take_subcenters(head):
    """The heads whose margins come from the embeddings (AdaFace, MagFace) or
    from the target cosines (sorted elastic draws) with sub-centers: the fused
    head against the same head on the reference backend."""
    x, w, y = PROBLEMS[0]
    kwargs = dict(plus=True, generator=torch.Generator().manual_seed(0)) if head == "ElasticArcFace" else {}
    losses, grads = [], []
    for backend in ("reference", "cpp"):
        if head == "ElasticArcFace":
            kwargs["generator"] = torch.Generator().manual_seed(0)
        module = getattr(mk.nn, head)(12, 41, subcenters=K, backend=backend, **kwargs)
        with torch.no_grad():
            module.weight.copy_(w)
        xg = (x * 3.0).clone().requires_grad_(True)  # norms inside MagFace's [10, 110]
        loss = module(xg, y)
        loss.backward()
        losses.append(loss.detach())
        grads.append((xg.grad, module.weight.grad))
    assert rel_err(losses[1], losses[0]) < 1e-5
    assert rel_err(grads[1][0], grads[0][0]) < 1e-5 and rel_err(grads[1][1], grads[0][1]) < 1e-5


def test_compiles_fullgraph():
    def loss_fn(x, w, y):
        return mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="cpp", subcenters=K)

    x, w, y = PROBLEMS[0]
    x = x.clone().requires_grad_(True)
    eager = torch.autograd.grad(loss_fn(x, w, y), x)[0]
    compiled = torch.autograd.grad(torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(x, w, y), x)[0]
    assert rel_err(compiled, eager) < 1e-5


def test_bad_input():
    x, w, y = PROBLEMS[0]
    with pytest.raises(ValueError, match="not a multiple of subcenters=3"):
        mk.margin_cross_entropy(x, w[:-1], y, mk.ArcFace(), subcenters=K)
    with pytest.raises(ValueError, match="subcenters must be >= 1"):
        mk.margin_cross_entropy(x, w, y, mk.ArcFace(), subcenters=0)
    with pytest.raises(TypeError, match="subcenters must be an int"):
        mk.margin_cross_entropy(x, w, y, mk.ArcFace(), subcenters=3.0)
    with pytest.raises(ValueError, match="labels must be in \\[0, 41\\)"):
        mk.margin_cross_entropy(x, w, torch.full_like(y, 41), mk.ArcFace(), subcenters=K)
    with pytest.raises(ValueError, match="subcenters must be >= 1"):
        mk.nn.ArcFace(12, 41, subcenters=0)
    with pytest.raises(ValueError, match="subcenters must be >= 1"):
        mk.PartialFC(12, 41, mk.ArcFace(), subcenters=-1)


@requires_cpp
def test_the_kernels_check_whole_classes():
    from margin_kernels import _C

    x = F.normalize(torch.randn(4, 8), dim=1)
    w = torch.randn(5, 8)
    inv = 1 / w.norm(dim=1)
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="not whole classes of subcenters=2"):
        _C.lse_forward(x, w, inv, labels, torch.zeros(4), 1.0, 2, None, None, 2)
    with pytest.raises(RuntimeError, match="subcenters must be >= 1"):
        _C.lse_backward(x, w, inv, labels, torch.zeros(4), torch.ones(4), 1.0, 2, None, None, 0, True)


# ---------------------------------------------------------------- PartialFC

def _reference_step(x, w, y, classes=None):
    """The single-process reference over ``classes`` (all of them by default):
    loss, dx and dW (zero outside the classes' rows)."""
    c = w.shape[0] // K
    classes = torch.arange(c) if classes is None else classes
    remap = torch.full((c,), -1, dtype=torch.long)
    remap[classes] = torch.arange(classes.numel())
    y_sub = torch.where(y >= 0, remap[y.clamp_min(0)], -100)
    rows = (classes[:, None] * K + torch.arange(K)).flatten()
    xr, wr = x.double().requires_grad_(True), w[rows].double().requires_grad_(True)
    loss = mk.margin_cross_entropy(xr, wr, y_sub, mk.ArcFace(), backend="reference", subcenters=K)
    loss.backward()
    dw = torch.zeros_like(w, dtype=torch.float64).index_copy_(0, rows, wr.grad)
    return loss.detach(), xr.grad, dw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_partial_fc_in_one_process(backend, sample_rate):
    """Sampled: the kernels read each sampled class's K rows through the index."""
    x, w, y = PROBLEMS[0]
    if backend_device(backend) != "cpu":
        pytest.skip("the one-process PartialFC check runs on CPU tensors")
    pfc = mk.PartialFC(12, 41, mk.ArcFace(), sample_rate=sample_rate, subcenters=K, backend=backend,
                       generator=torch.Generator().manual_seed(0))
    pfc.load_state_dict({"weight": w})
    xg = x.clone().requires_grad_(True)
    loss = pfc(xg, torch.where(y == -100, -1, y))
    loss.backward()
    classes = None
    if sample_rate < 1.0:
        rows = pfc.last_sampled_index
        assert rows.numel() % K == 0 and (rows.view(-1, K) % K == torch.arange(K)).all()
        classes = rows.view(-1, K)[:, 0] // K
    want_loss, want_dx, want_dw = _reference_step(x, w, y, classes)
    assert rel_err(loss.detach(), want_loss) < 1e-5
    assert rel_err(xg.grad, want_dx) < 1e-5 and rel_err(pfc.weight.grad, want_dw) < 1e-5
    assert pfc.state_dict()["weight"].shape == (41 * K, 12) and "subcenters=3" in repr(pfc)


@requires_cpp
def test_partial_fc_bf16_sampled_in_small_blocks():
    """bf16 weights, sampled classes read through the index in several cpp
    blocks (each gathered and widened to float32 with its K rows)."""
    x, w, y = PROBLEMS[2]
    w16 = w.to(torch.bfloat16)
    pfc = mk.PartialFC(12, 41, mk.ArcFace(), sample_rate=0.5, subcenters=K, dtype=torch.bfloat16, backend="cpp",
                       workspace_bytes=4096, generator=torch.Generator().manual_seed(1))
    pfc.load_state_dict({"weight": w16})
    xg = x.to(torch.bfloat16).requires_grad_(True)
    loss = pfc(xg, torch.where(y == -100, -1, y))
    loss.backward()
    classes = pfc.last_sampled_index.view(-1, K)[:, 0] // K
    want_loss, want_dx, want_dw = _reference_step(x.to(torch.bfloat16).float(), w16.float(), y, classes)
    assert rel_err(loss.detach(), want_loss) < 1e-4
    assert rel_err(xg.grad.float(), want_dx) < 2e-2 and rel_err(pfc.weight.grad.float(), want_dw) < 2e-2


@requires_cpp
def test_partial_fc_sharded_checkpoints_keep_subcenters_together(tmp_path):
    w = PROBLEMS[0][1]
    pfc = mk.PartialFC(12, 41, mk.ArcFace(), subcenters=K)
    pfc.load_state_dict({"weight": w})
    pfc.save_sharded(str(tmp_path / "ckpt"))
    again = mk.PartialFC(12, 41, mk.ArcFace(), subcenters=K)
    again.load_sharded(str(tmp_path / "ckpt"))
    assert torch.equal(again.weight.detach(), w)
    with pytest.raises(ValueError, match="sub-center"):
        mk.PartialFC(12, 41, mk.ArcFace(), subcenters=2).load_sharded(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="expected the full class matrix"):
        mk.PartialFC(12, 41, mk.ArcFace()).load_state_dict({"weight": w})


def _subcenter_ranks(rank, world, sizes, sample_rate):
    pfc = mk.PartialFC(12, 41, mk.ArcFace(), sample_rate=sample_rate, subcenters=K,
                       generator=torch.Generator().manual_seed(rank))
    x, w, y = PROBLEMS[1]
    pfc.load_state_dict({"weight": w})
    start = sum(sizes[:rank])
    xr = x[start : start + sizes[rank]].clone().requires_grad_(True)
    loss = pfc(xr, torch.where(y == -100, -1, y)[start : start + sizes[rank]])
    loss.backward()
    index = pfc.last_sampled_index
    return dict(loss=loss.detach(), dx=xr.grad, dw=pfc.weight.grad.clone(), start=pfc.class_start,
                count=pfc.num_local, classes=None if index is None else index.view(-1, K)[:, 0] // K + pfc.class_start,
                saved=pfc.state_dict()["weight"])


@requires_cpp
@pytest.mark.slow
@pytest.mark.parametrize("world, sizes, sample_rate", [(2, [9, 14], 1.0), (3, [5, 0, 18], 0.5)])
def test_partial_fc_over_ranks(tmp_path, world, sizes, sample_rate):
    """Uneven (and empty) batches over 2-3 gloo ranks, sampled and not, equal
    one process over the classes the ranks read; each rank holds whole classes."""
    results = run_ranks(_subcenter_ranks, world, sizes, sample_rate, outdir=str(tmp_path))
    x, w, y = PROBLEMS[1]
    classes = None if sample_rate == 1.0 else torch.cat([r["classes"] for r in results])
    want_loss, want_dx, want_dw = _reference_step(x, w, y, classes)
    for rank, r in enumerate(results):
        assert rel_err(r["loss"], want_loss) < 1e-5
        start = sum(sizes[:rank])
        if sizes[rank]:
            assert rel_err(r["dx"], want_dx[start : start + sizes[rank]]) < 1e-5
        assert rel_err(r["dw"], want_dw[r["start"] * K : (r["start"] + r["count"]) * K]) < 1e-5
        assert torch.equal(r["saved"], w)


# ---------------------------------------------------------------- clean-up

def _clustered(n_per_class=40, classes=6, k=3, d=16, noisy=4, seed=0):
    """Each class's samples around its sub-center 1 (dominant), a few around
    sub-center 2, and ``noisy`` samples per class pointing away from them."""
    g = torch.Generator().manual_seed(seed)
    w = F.normalize(torch.randn(classes * k, d, generator=g), dim=1)
    xs, ys, noise = [], [], []
    for c in range(classes):
        for i in range(n_per_class):
            centre = w[c * k + (1 if i < 30 else 2)]
            xs.append(centre + 0.1 * torch.randn(d, generator=g))
            ys.append(c)
            noise.append(False)
        for _ in range(noisy):
            xs.append(-w[c * k + 1] + 0.1 * torch.randn(d, generator=g))  # ~180 degrees away
            ys.append(c)
            noise.append(True)
    return torch.stack(xs), torch.tensor(ys), w, torch.tensor(noise)


def test_dominant_subcenters_and_the_samples_far_from_them():
    x, y, w, noise = _clustered()
    dominant = dominant_subcenters(x, y, w, 3, chunk=50)
    assert dominant.tolist() == [1] * 6
    far = far_from_dominant(x, y, w, 3, chunk=50)
    # every noisy sample, and none of the dominant clusters' samples
    in_dominant_cluster = (torch.arange(len(y)) % 44) < 30
    assert far[noise].all()
    assert not far[in_dominant_cluster].any()


def test_classes_without_samples_and_bad_input():
    x, y, w, _ = _clustered(classes=3)
    w = torch.cat([w, torch.randn(6, w.shape[1])])  # two more classes, no samples
    assert dominant_subcenters(x, y, w, 3)[-2:].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="not a multiple of subcenters"):
        dominant_subcenters(x, y, w[:-1], 3)
    with pytest.raises(ValueError, match="labels must be in"):
        dominant_subcenters(x, y + 10, w, 3)
    with pytest.raises(ValueError, match="subcenters must be an int"):
        dominant_subcenters(x, y, w, 0)
    with pytest.raises(ValueError, match="max_angle_degrees"):
        far_from_dominant(x, y, w, 3, max_angle_degrees=math.inf)


@pytest.mark.parametrize("backend", ["reference", "cpp"] + (["triton"] if mk.backends.is_available("triton") else []))
def test_exact_ties_between_subcenters_give_the_first_the_gradient(backend):
    """Identical sub-centers: the class's gradient goes to the first of them,
    on every backend, as the README says."""
    g = torch.Generator().manual_seed(4)
    x, base = torch.randn(6, 8, generator=g), torch.randn(5, 8, generator=g)
    w = base.repeat_interleave(3, dim=0).clone().requires_grad_(True)  # each class: three equal rows
    y = torch.randint(0, 5, (6,), generator=g)
    mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend=backend, subcenters=3).backward()
    rows = w.grad.view(5, 3, 8)
    assert rows[:, 0].abs().sum() > 0
    assert torch.all(rows[:, 1:] == 0)
