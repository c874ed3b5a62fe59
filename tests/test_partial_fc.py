"""PartialFC over 1-3 gloo ranks against the single-process reference."""
import math

import pytest
import torch

import margin_kernels as mk
from margin_kernels.partial_fc import class_split

from _dist import run_ranks
from conftest import rel_err, requires_cpp

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
        assert rel_err(r["dw"], dw[r["start"] : r["start"] + r["count"]]) < 1e-5


# ---------------------------------------------------------------- workers (run in spawned ranks)


def _world2(rank, world, ckpt_path):
    out = {"full": step(rank, [9, 9]), "uneven": step(rank, [4, 11]), "sampled": step(rank, [9, 9], sample_rate=0.3)}
    pfc = mk.PartialFC(D, C, MARGIN, generator=torch.Generator().manual_seed(rank))
    state = pfc.state_dict()  # a collective: the full matrix on every rank
    if rank == 0:
        torch.save(state, ckpt_path)
    out["exported"] = pfc.full_weight(dst=0)
    bad_labels = torch.randint(0, C, (5,))
    if rank == 1:
        bad_labels[2] = C + 7
    try:
        pfc(torch.randn(5, D), bad_labels)
        out["bad"] = "no error"
    except ValueError as exc:
        out["bad"] = str(exc)
    return out


def _world3(rank, world, ckpt_path):
    pfc = mk.PartialFC(D, C, MARGIN)
    pfc.load_state_dict(torch.load(ckpt_path))
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(5))
    y = torch.arange(7) * 13 % C
    return {"zero_rank": step(rank, [5, 0, 7]), "loaded_loss": pfc(x, y).detach(), "shard": pfc.weight.detach()}


# ---------------------------------------------------------------- tests


def test_class_split_matches_insightface():
    splits = [class_split(103, 3, r) for r in range(3)]
    assert splits == [(0, 35), (35, 34), (69, 34)]
    assert sum(n for _, n in splits) == 103


def test_single_process_is_the_one_rank_case():
    check_against_reference([step(0, [13])], [13])


@pytest.mark.slow
def test_two_and_three_ranks(tmp_path):
    ckpt = str(tmp_path / "pfc_world2.pt")
    r2 = run_ranks(_world2, 2, ckpt, outdir=str(tmp_path))
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
        assert r["index"].numel() == max(math.ceil(0.3 * r["count"]), positives.numel())
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
    assert "labels must be in [0, 103)" in r2[1]["bad"]

    # Checkpoint saved at world size 2: the full matrix, exported on rank 0 only.
    saved = torch.load(ckpt)["weight"]
    assert saved.shape == (C, D) and torch.equal(r2[0]["exported"], saved) and r2[1]["exported"] is None

    r3 = run_ranks(_world3, 3, ckpt, outdir=str(tmp_path))
    check_against_reference([r["zero_rank"] for r in r3], [5, 0, 7])
    assert torch.equal(torch.cat([r["shard"] for r in r3]), saved)
    single = mk.PartialFC(D, C, MARGIN)
    single.load_state_dict(torch.load(ckpt))
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(5))
    loaded = single(x, torch.arange(7) * 13 % C).detach()
    # world 3 saw the same 7 rows on every rank (21 rows, 3 copies): same mean loss
    assert all(rel_err(r["loaded_loss"], loaded) < 1e-5 for r in r3)


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


def test_from_insightface_maps_their_combined_margin_loss():
    class CombinedMarginLoss:  # the attributes of insightface's class
        s, m1, m2, m3, interclass_filtering_threshold = 64.0, 1.0, 0.5, 0.0, 0

    pfc = mk.PartialFC.from_insightface(CombinedMarginLoss(), 24, 1000, 0.2, True)
    assert pfc.margin == mk.CombinedMargin(64.0, 1.0, 0.5, 0.0) and pfc.sample_rate == 0.2
    assert pfc.weight.shape == (1000, 24)


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


@pytest.mark.parametrize("sample_rate", [1.0, 0.4])
def test_triton_backend_single_process(sample_rate):
    """The path PartialFC takes on GPUs: the Triton kernels (interpreted on CPU
    here), with their index-gather when sampling."""
    from margin_kernels import backends

    if not backends.is_available("triton"):
        pytest.skip("triton backend unavailable")
    sizes = [11]
    x, y, w = global_problem(sizes, seed=3)
    pfc = mk.PartialFC(D, C, MARGIN, sample_rate=sample_rate, backend="triton",
                       generator=torch.Generator().manual_seed(0))
    pfc.load_state_dict({"weight": w})
    xr = x.clone().requires_grad_(True)
    loss = pfc(xr, y)
    loss.backward()
    classes = None if sample_rate == 1.0 else pfc.last_sampled_index
    ref_loss, ref_dx, ref_dw = reference(sizes, seed=3, classes=classes)
    assert rel_err(loss.detach(), ref_loss) < 1e-5
    assert rel_err(xr.grad, ref_dx) < 1e-5
    dw = pfc.weight.grad if classes is None else pfc.weight.grad[classes]
    assert rel_err(dw, ref_dw) < 1e-5
