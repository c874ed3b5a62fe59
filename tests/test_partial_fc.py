"""PartialFC over 1-3 gloo ranks against the single-process reference."""
import math

import pytest
import torch

import margin_kernels as mk
from margin_kernels.partial_fc import class_split

from _dist import run_ranks
from conftest import backend_device, rel_err, requires_cpp, row_err

pytestmark = requires_cpp

D, C = 24, 103  # C not divisible by 2 or 3
MARGIN = mk.CombinedMargin(s=32.0, m1=1.1, m2=0.3, m3=0.1)


def global_problem(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = sum(sizes)
    x = torch.randn(b, D, generator=g)
    y = torch.randint(0, C, (b,), generator=g)
    if b > 3:
        y[3] = -1  # an ignored row
    w = torch.randn(C, D, generator=g)
    return x, y, w


def my_rows(rank, sizes):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def step(rank, sizes, sample_rate=1.0, seed=0):
    """One forward/backward on this rank's rows; weights loaded from the full matrix."""
    x, y, w = global_problem(sizes, seed)
    pfc = mk.PartialFC(D, C, MARGIN, sample_rate=sample_rate, generator=torch.Generator().manual_seed(rank))
    pfc.load_state_dict({"weight": w})
    xr = x[my_rows(rank, sizes)].clone().requires_grad_(True)
    loss = pfc(xr, y[my_rows(rank, sizes)])
    loss.backward()
    return dict(loss=loss.detach(), dx=xr.grad, dw=pfc.weight.grad, start=pfc.class_start, count=pfc.num_local,
                index=pfc.last_sampled_index)


def trained(rank, sizes, optimizer_cls=torch.optim.SGD, **opt_kwargs):
    """A PartialFC and its optimizer after one step, so optimizer state exists."""
    x, y, w = global_problem(sizes, seed=1)
    pfc = mk.PartialFC(D, C, MARGIN)
    pfc.load_state_dict({"weight": w})
    opt = optimizer_cls(pfc.parameters(), **(opt_kwargs or {"lr": 0.1, "momentum": 0.9}))
    pfc(x[my_rows(rank, sizes)], y[my_rows(rank, sizes)]).backward()
    opt.step()
    return pfc, opt


def next_step(pfc, opt, rank, sizes):
    """The weight shard after one more SGD step on the global batch of seed 7,
    split over the ranks by ``sizes``."""
    x, y, _ = global_problem(sizes, seed=7)
    opt.zero_grad()
    pfc(x[my_rows(rank, sizes)], y[my_rows(rank, sizes)]).backward()
    opt.step()
    return pfc.weight.detach().clone()


def reference(sizes, seed=0, classes=None):
    """Loss and grads of the whole batch on one process; `classes` restricts the
    softmax to a subset (sampled negatives)."""
    x, y, w = global_problem(sizes, seed)
    if classes is not None:
        remap = torch.full((C,), -1, dtype=torch.long)
        remap[classes] = torch.arange(classes.numel())
        y = torch.where(y >= 0, remap[y.clamp_min(0)], y)
        w = w[classes]
    x.requires_grad_(True)
    w.requires_grad_(True)
    loss = mk.margin_cross_entropy(x, w, y, MARGIN, backend="reference", ignore_index=-1)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def check_against_reference(results, sizes):
    loss, dx, dw = reference(sizes)
    for rank, r in enumerate(results):
        assert rel_err(r["loss"], loss) < 1e-5
        if sizes[rank]:
            assert rel_err(r["dx"], dx[my_rows(rank, sizes)]) < 1e-5
            assert row_err(r["dx"], dx[my_rows(rank, sizes)]) < 1e-4
        assert rel_err(r["dw"], dw[r["start"] : r["start"] + r["count"]]) < 1e-5
        assert row_err(r["dw"], dw[r["start"] : r["start"] + r["count"]]) < 1e-4  # a shard's edge rows too


# ---------------------------------------------------------------- workers (run in spawned ranks)


def _world2(rank, world, ckpt_path, sharded_dir):
    out = {"full": step(rank, [9, 9]), "uneven": step(rank, [4, 11]), "sampled": step(rank, [9, 9], sample_rate=0.3)}
    pfc = mk.PartialFC(D, C, MARGIN, generator=torch.Generator().manual_seed(rank))
    state = pfc.state_dict()  # a collective: the full matrix on every rank
    if rank == 0:
        torch.save(state, ckpt_path)
    out["exported"] = pfc.full_weight(dst=0)
    out["exported_on_1"] = pfc.full_weight(dst=1)
    nan_pfc = mk.PartialFC(D, C, MARGIN)
    if rank == 1:
        with torch.no_grad():
            nan_pfc.weight[2, 5] = float("nan")
    try:
        nan_pfc(torch.randn(5, D), torch.randint(0, C, (5,)))
        out["nan"] = "no error"
    except ValueError as exc:
        out["nan"] = str(exc)
    trained_pfc, opt = trained(rank, [9, 9])
    trained_pfc.save_sharded(sharded_dir, opt)
    out["trained"] = trained_pfc.weight.detach().clone()
    out["momentum"] = opt.state[trained_pfc.weight]["momentum_buffer"].clone()
    out["next"] = next_step(trained_pfc, opt, rank, [9, 9])
    adam_pfc, adam_opt = trained(rank, [9, 9], torch.optim.AdamW, lr=1e-3)
    adam_pfc.save_sharded(sharded_dir + "_adamw", adam_opt)
    out["next_adamw"] = next_step(adam_pfc, adam_opt, rank, [9, 9])
    bad_labels = torch.randint(0, C, (5,))
    if rank == 1:
        bad_labels[2] = C + 7
    try:
        pfc(torch.randn(5, D), bad_labels)
        out["bad"] = "no error"
    except ValueError as exc:
        out["bad"] = str(exc)
    # Ranks built with different configurations: a named error on every rank
    # (a different D aborted a rank inside gloo; a different C or s ran silently).
    out["config"] = {}
    for name, kwargs in (("embedding_size", {"embedding_size": D + rank}), ("num_classes", {"num_classes": C + rank}),
                         ("margin", {"margin": mk.ArcFace(s=64.0 + rank)}), ("sample_rate", {"sample_rate": 1 - 0.5 * rank}),
                         ("dtype", {"dtype": (torch.float32, torch.bfloat16)[rank]}),
                         ("subcenters", {"subcenters": 1 + rank})):
        args = {"embedding_size": D, "num_classes": C, "margin": MARGIN, **kwargs}
        try:
            mk.PartialFC(args.pop("embedding_size"), args.pop("num_classes"), args.pop("margin"), **args)
            out["config"][name] = "no error"
        except ValueError as exc:
            out["config"][name] = str(exc)
    return out


def _world3(rank, world, ckpt_path, sharded_dir):
    pfc = mk.PartialFC(D, C, MARGIN)
    pfc.load_state_dict(torch.load(ckpt_path))
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(5))
    y = torch.arange(7) * 13 % C
    resumed = mk.PartialFC(D, C, MARGIN)
    opt = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    resumed.load_sharded(sharded_dir, opt)
    out = {"zero_rank": step(rank, [5, 0, 7]), "loaded_loss": pfc(x, y).detach(), "shard": pfc.weight.detach(),
           "resumed": resumed.weight.detach().clone(), "momentum": opt.state[resumed.weight]["momentum_buffer"].clone()}
    out["next"] = next_step(resumed, opt, rank, [6, 6, 6])
    adam = mk.PartialFC(D, C, MARGIN)
    adam_opt = torch.optim.AdamW(adam.parameters(), lr=1e-3)
    adam.load_sharded(sharded_dir + "_adamw", adam_opt)
    out["next_adamw"] = next_step(adam, adam_opt, rank, [6, 6, 6])
    return out


# ---------------------------------------------------------------- tests


def test_class_split_matches_insightface():
    splits = [class_split(103, 3, r) for r in range(3)]
    assert splits == [(0, 35), (35, 34), (69, 34)]
    assert sum(n for _, n in splits) == 103


def test_single_process_is_the_one_rank_case():
    check_against_reference([step(0, [13])], [13])


@pytest.mark.slow
def test_two_and_three_ranks(tmp_path):
    ckpt, sharded = str(tmp_path / "pfc_world2.pt"), str(tmp_path / "sharded_world2")
    r2 = run_ranks(_world2, 2, ckpt, sharded, outdir=str(tmp_path))
    check_against_reference([r["full"] for r in r2], [9, 9])
    check_against_reference([r["uneven"] for r in r2], [4, 11])

    # sample_rate=0.3: positives kept, counts right, gradients of the softmax over
    # the union of the ranks' samples, zero outside the sample.
    sampled = [r["sampled"] for r in r2]
    x, y, _ = global_problem([9, 9])
    classes = torch.cat([r["index"] + r["start"] for r in sampled])
    for r in sampled:
        positives = torch.unique(y[(y >= r["start"]) & (y < r["start"] + r["count"])]) - r["start"]
        assert torch.isin(positives, r["index"]).all()
        # ceil(0.3 C_local), raised to the global batch (18) so that positives fit without a host sync
        assert r["index"].numel() == min(r["count"], max(math.ceil(0.3 * r["count"]), 18))
        untouched = torch.ones(r["count"], dtype=torch.bool)
        untouched[r["index"]] = False
        assert torch.all(r["dw"][untouched] == 0)
    loss, dx, dw = reference([9, 9], classes=classes)
    for rank, r in enumerate(sampled):
        assert rel_err(r["loss"], loss) < 1e-5
        assert rel_err(r["dx"], dx[my_rows(rank, [9, 9])]) < 1e-5
        lo = int((classes < r["start"]).sum())
        assert rel_err(r["dw"][r["index"]], dw[lo : lo + r["index"].numel()]) < 1e-5

    # Bad input on one rank raises on every rank, naming it, instead of hanging.
    assert all("rank(s) [1]" in r["bad"] for r in r2)
    for name in ("embedding_size", "num_classes", "margin", "sample_rate", "dtype", "subcenters"):
        assert all(f"ranks disagree on {name} (rank(s) [1] differ from rank 0" in r["config"][name] for r in r2), name
    assert "labels must be in [0, 103)" in r2[1]["bad"]
    assert all("bad weight rows (NaN/Inf, overflowing or zero norms) on rank(s) [1]" in r["nan"] for r in r2)
    assert "local weight row 2 contains NaN or Inf" in r2[1]["nan"]

    # Checkpoint saved at world size 2: the full matrix, exported on rank 0 only.
    saved = torch.load(ckpt)["weight"]
    assert saved.shape == (C, D) and torch.equal(r2[0]["exported"], saved) and r2[1]["exported"] is None
    assert torch.equal(r2[1]["exported_on_1"], saved) and r2[0]["exported_on_1"] is None

    r3 = run_ranks(_world3, 3, ckpt, sharded, outdir=str(tmp_path))
    check_against_reference([r["zero_rank"] for r in r3], [5, 0, 7])
    assert torch.equal(torch.cat([r["shard"] for r in r3]), saved)
    single = mk.PartialFC(D, C, MARGIN)
    single.load_state_dict(torch.load(ckpt))
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(5))
    loaded = single(x, torch.arange(7) * 13 % C).detach()
    # world 3 saw the same 7 rows on every rank (21 rows, 3 copies): same mean loss
    assert all(rel_err(r["loaded_loss"], loaded) < 1e-5 for r in r3)

    # Sharded checkpoint of a trained world-2 run, resharded onto 3 ranks and onto 1.
    weight2 = torch.cat([r["trained"] for r in r2])
    momentum2 = torch.cat([r["momentum"] for r in r2])
    assert momentum2.abs().sum() > 0
    assert torch.equal(torch.cat([r["resumed"] for r in r3]), weight2)
    assert torch.equal(torch.cat([r["momentum"] for r in r3]), momentum2)
    one = mk.PartialFC(D, C, MARGIN)
    opt = torch.optim.SGD(one.parameters(), lr=0.1, momentum=0.9)
    one.load_sharded(sharded, opt)
    assert torch.equal(one.weight.detach(), weight2)
    assert torch.equal(opt.state[one.weight]["momentum_buffer"], momentum2)
    # ... and the next step is the one the world-2 run takes (up to the order of the cross-rank sums)
    next2 = torch.cat([r["next"] for r in r2])
    assert torch.allclose(torch.cat([r["next"] for r in r3]), next2, rtol=1e-6, atol=1e-8)
    assert torch.allclose(next_step(one, opt, 0, [18]), next2, rtol=1e-6, atol=1e-8)
    assert not torch.allclose(next2, weight2, rtol=1e-6, atol=1e-8)  # (the step moved the weight)
    adam_next2 = torch.cat([r["next_adamw"] for r in r2])
    assert torch.allclose(torch.cat([r["next_adamw"] for r in r3]), adam_next2, rtol=1e-6, atol=1e-8)
    adam = mk.PartialFC(D, C, MARGIN)
    adam_opt = torch.optim.AdamW(adam.parameters(), lr=1e-3)
    adam.load_sharded(sharded + "_adamw", adam_opt)
    assert torch.allclose(next_step(adam, adam_opt, 0, [18]), adam_next2, rtol=1e-6, atol=1e-8)


def test_bad_input_single_process():
    pfc = mk.PartialFC(D, C, MARGIN)
    with pytest.raises(ValueError, match=r"embeddings must be \[B, 24\]"):
        pfc(torch.randn(4, 23), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be in"):
        pfc(torch.randn(4, D), torch.tensor([0, 1, C, 2]))
    with pytest.raises(ValueError, match="must be on the weight's device"):
        pfc(torch.randn(4, D, device="meta"), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="sample_rate must be in"):
        mk.PartialFC(D, C, MARGIN, sample_rate=0.0)
    with pytest.raises(ValueError, match="embeddings row 1 contains NaN or Inf"):
        pfc(torch.randn(4, D).index_fill(0, torch.tensor([1]), float("inf")), torch.zeros(4, dtype=torch.long))
    with torch.no_grad():
        pfc.weight[7, 3] = float("inf")
    with pytest.raises(ValueError, match=r"on rank\(s\) \[0\]; here: local weight row 7 contains NaN or Inf"):
        pfc(torch.randn(4, D), torch.zeros(4, dtype=torch.long))


def test_sampled_step_checks_the_rows_it_reads():
    """With sampling, a bad weight row is reported when a step reads it."""
    pfc = mk.PartialFC(D, C, MARGIN, sample_rate=0.1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pfc.weight[50] = float("nan")
    x = torch.randn(4, D)
    with pytest.raises(ValueError, match="local weight row 50 contains NaN"):
        pfc(x, torch.tensor([1, 50, 2, 3]))  # 50 is a positive: always sampled
    pfc.generator.manual_seed(0)
    loss = pfc(x, torch.tensor([1, 4, 2, 3]))
    assert 50 not in pfc.last_sampled_index.tolist()  # (this seed's sample)
    assert torch.isfinite(loss)


class CombinedMarginLoss(torch.nn.Module):
    """insightface's CombinedMarginLoss as arcface_torch ships it since December
    2022, written here from its algorithm: ArcFace's angle margin applied in
    place under no_grad (straight-through gradient, no rule for theta + m > pi);
    CosFace's m3 applied alone."""

    def __init__(self, s, m1, m2, m3):
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3

    def forward(self, logits, labels):
        rows = torch.where(labels != -1)[0]
        cols = labels[rows]
        if self.m1 == 1.0 and self.m3 == 0.0:
            with torch.no_grad():
                target = logits[rows, cols].arccos() + self.m2
                logits.arccos_()
                logits[rows, cols] = target
                logits.cos_()
        else:
            logits[rows, cols] = logits[rows, cols] - self.m3
        return logits * self.s


def classic_arcface(logits, labels, s, m):
    """ArcFace before that change: cos(theta + m) with the true gradient, and
    c - m sin(m) where theta + m > pi."""
    rows = torch.where(labels != -1)[0]
    cols = labels[rows]
    c = logits[rows, cols]
    sin = (1 - c * c).clamp_min(0).sqrt()
    margined = torch.where(c > math.cos(math.pi - m), c * math.cos(m) - sin * math.sin(m), c - math.sin(math.pi - m) * m)
    logits = logits.clone()
    logits[rows, cols] = margined
    return logits * s


@pytest.mark.parametrize("behaviour, m", [("current", (1.0, 0.5, 0.0)), ("classic", (1.0, 0.5, 0.0)),
                                          ("current", (1.0, 0.0, 0.4))])
def test_from_insightface_reproduces_their_loss_and_gradients(behaviour, m):
    torch.manual_seed(0)
    b, c = 12, 40
    x = torch.randn(b, D)
    w = torch.randn(c, D)
    y = torch.randint(0, c, (b,))
    y[3] = -1
    x[0] = -w[y[0]] + 0.01 * torch.randn(D)  # theta near pi: where the overflow rules differ
    theirs_loss = CombinedMarginLoss(64.0, *m)
    pfc = mk.PartialFC.from_insightface(theirs_loss, D, c, 1.0, False, behaviour=behaviour)
    pfc.load_state_dict({"weight": w})
    xa = x.clone().requires_grad_(True)
    loss = pfc(xa, y)
    loss.backward()

    xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    logits = torch.nn.functional.linear(torch.nn.functional.normalize(xb), torch.nn.functional.normalize(wb))
    logits = logits.clamp(-1, 1)
    if behaviour == "classic":
        z = classic_arcface(logits, y, 64.0, m[1])
    else:
        z = theirs_loss(logits, y)
    ref = torch.nn.functional.cross_entropy(z, y, ignore_index=-1)
    ref.backward()
    assert rel_err(loss.detach(), ref.detach()) < 1e-5
    assert rel_err(xa.grad, xb.grad) < 1e-4
    assert rel_err(pfc.weight.grad, wb.grad) < 1e-4


def test_from_insightface_maps_their_configurations_and_sampled_count():
    arc = mk.PartialFC.from_insightface(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), 24, 1000, 0.2, True)
    assert arc.margin == mk.CombinedMargin(64.0, 1.0, 0.5, 0.0, overflow="none", detach_margin=True)
    assert arc.sample_rate == 0.2 and arc.weight.shape == (1000, 24)
    classic = mk.PartialFC.from_insightface(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), 24, 1000, behaviour="classic")
    assert classic.margin == mk.CombinedMargin(64.0, 1.0, 0.5, 0.0)
    cos = mk.PartialFC.from_insightface(CombinedMarginLoss(64.0, 1.2, 0.3, 0.4), 24, 1000)
    assert cos.margin == mk.CombinedMargin(64.0, 1.0, 0.0, 0.4)  # theirs applies m3 alone
    with pytest.raises(ValueError, match="m1 = 1 and m3 = 0"):
        mk.PartialFC.from_insightface(CombinedMarginLoss(64.0, 1.35, 0.0, 0.0), 24, 1000)
    # their count: int(r * C_local); ours by default: the ceiling
    pfc = mk.PartialFC.from_insightface(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), D, C, 0.1,
                                        generator=torch.Generator().manual_seed(0))
    pfc(torch.randn(4, D), torch.tensor([1, 2, 3, 4]))
    assert pfc.last_sampled_index.numel() == int(0.1 * C) == 10
    ours = mk.PartialFC(D, C, MARGIN, sample_rate=0.1, generator=torch.Generator().manual_seed(0))
    ours(torch.randn(4, D), torch.tensor([1, 2, 3, 4]))
    assert ours.last_sampled_index.numel() == math.ceil(0.1 * C) == 11


def test_sampled_gradient_accumulates_into_existing_grad():
    torch.manual_seed(0)
    pfc = mk.PartialFC(D, C, MARGIN, sample_rate=0.2, generator=torch.Generator().manual_seed(1))
    x, y = torch.randn(10, D), torch.randint(0, C, (10,))
    pfc.generator.manual_seed(1)
    pfc(x, y).backward()
    first = pfc.weight.grad.clone()
    index = pfc.last_sampled_index
    pfc.generator.manual_seed(1)  # the same sample again
    pfc(x, y).backward()
    assert torch.equal(pfc.last_sampled_index, index)
    assert torch.allclose(pfc.weight.grad, 2 * first)
    assert first.abs().sum() > 0


@pytest.mark.parametrize("optimizer_cls, kwargs", [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
                                                    (torch.optim.AdamW, {"lr": 1e-3})])
def test_sharded_checkpoint_resumes_the_same_trajectory(tmp_path, optimizer_cls, kwargs):
    pfc, opt = trained(0, [13], optimizer_cls, **kwargs)
    pfc.save_sharded(str(tmp_path), opt)
    resumed = mk.PartialFC(D, C, MARGIN)
    resumed_opt = optimizer_cls(resumed.parameters(), **kwargs)
    resumed.load_sharded(str(tmp_path), resumed_opt)
    x, y, _ = global_problem([13], seed=2)
    for module, optimizer in ((pfc, opt), (resumed, resumed_opt)):
        optimizer.zero_grad()
        module(x, y).backward()
        optimizer.step()
    assert torch.equal(resumed.weight, pfc.weight)


def test_sharded_checkpoint_errors(tmp_path):
    pfc, opt = trained(0, [13])
    pfc.save_sharded(str(tmp_path / "ck"))  # weights only
    with pytest.raises(ValueError, match="not a sharded PartialFC checkpoint"):
        pfc.load_sharded(str(tmp_path))
    with pytest.raises(ValueError, match=r"holds \[103, 24\] .* is \[104, 24\]"):
        mk.PartialFC(D, C + 1, MARGIN).load_sharded(str(tmp_path / "ck"))
    with pytest.raises(ValueError, match="saved without optimizer state"):
        pfc.load_sharded(str(tmp_path / "ck"), opt)
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="optimizer does not hold this PartialFC's weight"):
        pfc.save_sharded(str(tmp_path / "ck2"), other)
    next((tmp_path / "ck").glob("classes_000000000000_000000000103.*.pt")).unlink()
    with pytest.raises(ValueError, match=r"meta.pt lists files that are missing: \['classes_000000000000_000000000103"):
        pfc.load_sharded(str(tmp_path / "ck"))


@pytest.mark.parametrize("sample_rate", [1.0, 0.4])
def test_triton_backend_single_process(sample_rate):
    """The path PartialFC takes on GPUs: the Triton kernels (interpreted on CPU
    here), with their index-gather when sampling."""
    from margin_kernels import backends

    if not backends.is_available("triton"):
        pytest.skip("triton backend unavailable")
    device = backend_device("triton")
    sizes = [11]
    x, y, w = global_problem(sizes, seed=3)
    pfc = mk.PartialFC(D, C, MARGIN, sample_rate=sample_rate, backend="triton", device=device,
                       generator=torch.Generator(device=device).manual_seed(0))
    pfc.load_state_dict({"weight": w})
    xr = x.clone().to(device).requires_grad_(True)
    loss = pfc(xr, y.to(device))
    loss.backward()
    classes = None if sample_rate == 1.0 else pfc.last_sampled_index.cpu()
    ref_loss, ref_dx, ref_dw = reference(sizes, seed=3, classes=classes)
    assert rel_err(loss.detach().cpu(), ref_loss) < 1e-5
    assert rel_err(xr.grad.cpu(), ref_dx) < 1e-5
    dw = pfc.weight.grad.cpu() if classes is None else pfc.weight.grad.cpu()[classes]
    assert rel_err(dw, ref_dw) < 1e-5


class HostSyncs(torch.overrides.TorchFunctionMode):
    """Records the calls that make the host wait for a device: reading a value
    (bool, int, item, tolist) or an op whose output size depends on the data."""

    READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist"}
    DATA_SIZED = {"nonzero", "unique", "masked_select", "unique_consecutive", "argwhere"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        bool_index = name == "__getitem__" and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in (args[1] if isinstance(args[1], tuple)
                                                                            else (args[1],)))
        if name in self.READS | self.DATA_SIZED or bool_index:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sample_rate", [1.0, 0.3])
def test_a_step_syncs_with_the_host_only_where_collectives_need_it(sample_rate):
    """One read for the gathered batch sizes (which carry the input checks) and
    one for the bad-weight flag of the loss's all-reduce: sampling, target
    cosines and validation add none."""
    pfc = mk.PartialFC(D, C, MARGIN, sample_rate=sample_rate, generator=torch.Generator().manual_seed(0))
    x, y, _ = global_problem([12])
    x.requires_grad_(True)
    pfc(x, y)  # warm-up: imports and one-time checks
    with HostSyncs() as mode:
        pfc(x, y).backward()
    assert mode.calls == ["tolist", "__bool__"], mode.calls


def _step_warnings(rank, world):
    import warnings

    pfc = mk.PartialFC(D, 20, mk.ArcFace(), sample_rate=0.5, generator=torch.Generator().manual_seed(rank))
    x = torch.randn(3, D, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pfc(x, torch.tensor([0, 7, 19])).backward()
    return [f"{w.category.__name__}: {w.message}" for w in caught]


@pytest.mark.slow
def test_a_sharded_step_warns_of_nothing(tmp_path):
    """No deprecation notice from the autograd all-gather on every step."""
    assert run_ranks(_step_warnings, 2, outdir=str(tmp_path)) == [[], []]
