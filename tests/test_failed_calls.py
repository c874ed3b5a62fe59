"""A call that raises changes nothing: no head's buffer, no generator, no
PartialFC state, no weight half-loaded from a checkpoint. Edge inputs that are
valid (an empty batch with sub-centers, AdaFace's h = 0) work; invalid ones are
named errors."""
import os

import pytest
import torch

import margin_kernels as mk

from conftest import make_problem, requires_cpp

pytestmark = requires_cpp

D, C = 8, 12
NAN_ROW = 1


def nan_batch(b=6):
    x, _, y = make_problem(b, D, C, seed=3)
    x[NAN_ROW, 0] = float("nan")
    return x, y


def good_batch(b=6):
    x, _, y = make_problem(b, D, C, seed=4)
    return x * 20, y


def snapshot(module) -> dict:
    """Every tensor a module keeps, and its generator's state."""
    state = {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    if getattr(module, "generator", None) is not None:
        state["generator"] = module.generator.get_state().clone()
    return state


def assert_unchanged(module, before: dict) -> None:
    after = snapshot(module)
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key].isnan(), before[key].isnan()), f"{key} changed by a call that raised"
        assert torch.equal(after[key].nan_to_num(), before[key].nan_to_num()), f"{key} changed by a call that raised"


def heads():
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    return {
        "AdaFace": mk.nn.AdaFace(D, C),
        "CurricularFace": mk.nn.CurricularFace(D, C),
        "MagFace": mk.nn.MagFace(D, C),
        "ElasticArcFace": mk.nn.ElasticArcFace(D, C, generator=gen()),
        "ElasticCosFace+": mk.nn.ElasticCosFace(D, C, plus=True, generator=gen()),
        "ArcFace-K3": mk.nn.ArcFace(D, C, subcenters=3),
    }


@pytest.mark.parametrize("name", list(heads()))
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_a_head_call_that_raises_changes_nothing(name, backend):
    """nn.AdaFace updated its statistics before the batch was checked: one NaN
    batch left both buffers NaN, and every later good batch raised too."""
    head = heads()[name]
    head.backend = backend
    head(*good_batch())  # a step, so that the state is not the initial one
    before, margins_before = snapshot(head), head.last_margins
    with pytest.raises(ValueError, match="embeddings row 1 contains NaN"):
        head(*nan_batch())
    assert_unchanged(head, before)
    assert head.last_margins is margins_before
    loss = head(*good_batch())  # and the next good batch trains
    assert torch.isfinite(loss)


def test_a_head_with_a_bad_weight_row_changes_nothing():
    head = mk.nn.CurricularFace(D, C)
    head(*good_batch())
    with torch.no_grad():
        head.weight[3] = float("inf")
    before = snapshot(head)
    with pytest.raises(ValueError, match="weight row 3"):
        head(*good_batch())
    assert_unchanged(head, before)


def pfc_configs():
    gen = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    return {
        "AdaFace": dict(margin=mk.AdaFace()),
        "CurricularFace": dict(margin=mk.CurricularFace()),
        "ElasticArcFace+sampled": dict(margin=mk.ElasticArcFace(plus=True), sample_rate=0.5, generator=gen()),
        "CosFace-sampled-K2": dict(margin=mk.CosFace(), sample_rate=0.5, generator=gen(), subcenters=2),
    }


@pytest.mark.parametrize("name", list(pfc_configs()))
@pytest.mark.parametrize("failure", ["nan_embeddings", "bad_weight_row"])
def test_a_partial_fc_step_that_raises_changes_nothing(name, failure):
    """A bad weight row raises inside the loss, after the margin's state was
    updated and the sampler had drawn: both are now kept as they were."""
    kwargs = dict(pfc_configs()[name])
    pfc = mk.PartialFC(D, 40, kwargs.pop("margin"), generator=kwargs.pop("generator", None), **kwargs)
    x, y = good_batch(8)
    pfc(x, y * 3)
    before, sampled_before = snapshot(pfc), pfc.last_sampled_index
    if failure == "nan_embeddings":
        x, y = nan_batch(8)
        match = "invalid input"
    else:
        with torch.no_grad():
            pfc.weight[int(y[0]) * 3 * pfc.subcenters] = float("nan")  # a row the step reads
        before = snapshot(pfc)
        match = "bad weight rows"
    with pytest.raises(ValueError, match=match):
        pfc(x, y * 3)
    assert_unchanged(pfc, before)
    assert pfc.last_sampled_index is sampled_before


# ---------------------------------------------------------------- edge inputs

@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("margin", [mk.ArcFace(), mk.ElasticCosFace(plus=True), mk.CombinedMargin(m1=1.2, m3=0.1)],
                         ids=["arc", "elastic+", "combined"])
def test_an_empty_batch_gives_zero_with_any_subcenters(backend, k, margin):
    """B = 0 with K > 1 raised a reshape error on every path."""
    if not mk.backends.is_available(backend):
        pytest.skip(f"{backend} is not available")
    x = torch.empty(0, D, requires_grad=True)
    w = torch.randn(C * k, D, requires_grad=True)
    y = torch.empty(0, dtype=torch.long)
    loss = mk.margin_cross_entropy(x, w, y, margin, backend=backend, subcenters=k,
                                   generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0, D)
    assert w.grad is None or torch.all(w.grad == 0)
    rows = mk.margin_cross_entropy(x, w, y, margin, backend=backend, subcenters=k, reduction="none",
                                   generator=torch.Generator().manual_seed(0))
    assert rows.shape == (0,)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("head", [mk.nn.ArcFace, mk.nn.AdaFace, mk.nn.MagFace, mk.nn.CurricularFace])
def test_an_empty_batch_through_heads_and_partial_fc(k, head):
    module = head(D, C, subcenters=k)
    x, y = torch.empty(0, D, requires_grad=True), torch.empty(0, dtype=torch.long)
    before = snapshot(module)
    loss = module(x, y)
    loss.backward()
    assert loss.item() == 0.0
    assert_unchanged(module, before)  # an empty batch moves no statistic
    spec = module.margin
    pfc = mk.PartialFC(D, C, spec, subcenters=k)
    loss = pfc(x, y)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(pfc.weight.grad == 0)


@pytest.mark.parametrize("t", [1e30, -1.5, 1.0001, float("nan"), float("inf")])
def test_curricularface_t_must_be_a_mean_cosine(t):
    """t = 1e30 gave a loss of 3e31."""
    x, w, y = make_problem(4, D, C)
    with pytest.raises(ValueError, match=r"state\['t'\] must be finite and in \[-1, 1\]"):
        mk.margin_cross_entropy(x, w, y, mk.CurricularFace(), state={"t": t})


def test_curricularface_t_at_the_ends_of_its_range():
    x, w, y = make_problem(4, D, C)
    for t in (-1.0, 1.0, torch.tensor(0.5, dtype=torch.float64)):
        assert torch.isfinite(mk.margin_cross_entropy(x, w, y, mk.CurricularFace(), state={"t": t}))


@pytest.mark.parametrize("k, exc", [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)])
def test_draw_margins_checks_subcenters(k, exc):
    """draw_margins(subcenters=0) raised ZeroDivisionError."""
    x, w, y = make_problem(4, D, C)
    with pytest.raises(exc, match="subcenters must be (an int )?>= 1"):
        mk.draw_margins(x, w, y, mk.ElasticArcFace(plus=True), subcenters=k)


def test_adaface_takes_h_zero_as_the_official_config_does():
    """h = 0 (the margin stops adapting: every row gets m1 = 1, m2 = 0,
    m3 = m) was refused."""
    spec = mk.AdaFace(h=0.0)
    norms = torch.tensor([0.5, 20.0, 90.0])
    m1, m2, m3 = spec.margins_from_norms(norms, torch.tensor(20.0), torch.tensor(5.0))
    assert torch.all(m1 == 1) and torch.all(m2 == 0) and torch.allclose(m3, torch.full((3,), 0.4))
    head = mk.nn.AdaFace(D, C, h=0.0)
    assert torch.isfinite(head(*good_batch()))
    with pytest.raises(ValueError, match="h must be >= 0"):
        mk.AdaFace(h=-0.1)


# ---------------------------------------------------------------- state_dict

def test_a_subcenter_state_dict_does_not_load_into_another_k():
    """K=3, C=20 loaded into K=2, C=30 (the same C * K rows) without a word."""
    source = mk.nn.ArcFace(D, 20, subcenters=3)
    target = mk.nn.ArcFace(D, 30, subcenters=2)
    weight = target.weight.detach().clone()
    with pytest.raises(ValueError, match="3 sub-centers per class, this head has 2"):
        target.load_state_dict(source.state_dict())
    assert torch.equal(target.weight, weight)


def test_a_state_dict_of_another_margin_family_is_refused():
    source = mk.nn.CurricularFace(D, C)
    target = mk.nn.ArcFace(D, C)
    with pytest.raises(ValueError, match=r"saved by a head with CurricularFace \(state: \['t'\]\), this head has ArcFace "
                                         r"\(state: none\)"):
        target.load_state_dict(source.state_dict(), strict=False)


def test_state_dicts_round_trip_and_older_ones_still_load():
    source = mk.nn.ArcFace(D, C, subcenters=2)
    target = mk.nn.ArcFace(D, C, subcenters=2)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.weight, source.weight)
    older = {"weight": source.weight.detach().clone() * 2}  # written before the state carried K
    target.load_state_dict(older)
    assert torch.equal(target.weight, older["weight"])
    pfc_source = mk.PartialFC(D, 10, mk.ArcFace(), subcenters=3)
    pfc_target = mk.PartialFC(D, 15, mk.ArcFace(), subcenters=2)
    with pytest.raises(ValueError, match="3 sub-centers per class, this PartialFC has 2"):
        pfc_target.load_state_dict(pfc_source.state_dict())


# ---------------------------------------------------------------- load_sharded

def pfc_of(margin, value=None):
    pfc = mk.PartialFC(D, C, margin)
    if value is not None:
        with torch.no_grad():
            pfc.weight.fill_(value)
    return pfc


@pytest.mark.parametrize("margin", [mk.AdaFace(), mk.CurricularFace()], ids=["adaface", "curricular"])
def test_a_load_missing_the_margins_state_changes_nothing(tmp_path, margin):
    """Loading an ArcFace checkpoint into an AdaFace or CurricularFace
    PartialFC overwrote the weight, then raised on the missing state."""
    path = str(tmp_path / "ck")
    pfc_of(mk.ArcFace(), 1.0).save_sharded(path)
    target = pfc_of(margin, 7.0)
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"meta.pt: saved by a PartialFC with ArcFace \(state: none\), this PartialFC "
                                         f"has {type(margin).__name__}"):
        target.load_sharded(path)
    assert_unchanged(target, before)


def test_a_load_with_another_dtype_or_a_missing_optimizer_state_changes_nothing(tmp_path):
    path = str(tmp_path / "ck")
    pfc_of(mk.ArcFace(), 1.0).save_sharded(path)
    target = mk.PartialFC(D, C, mk.ArcFace(), dtype=torch.bfloat16)
    before = snapshot(target)
    with pytest.raises(ValueError, match="holds torch.float32 weights, this PartialFC torch.bfloat16"):
        target.load_sharded(path)
    assert_unchanged(target, before)
    target = pfc_of(mk.ArcFace(), 7.0)
    optimizer = torch.optim.SGD(target.parameters(), lr=0.1, momentum=0.9)
    target(*good_batch()).backward()
    optimizer.step()
    before, state_before = snapshot(target), optimizer.state[target.weight]["momentum_buffer"].clone()
    with pytest.raises(ValueError, match="saved without optimizer state"):
        target.load_sharded(path, optimizer)
    assert_unchanged(target, before)
    assert torch.equal(optimizer.state[target.weight]["momentum_buffer"], state_before)


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, "pickle of a list", "meta without shards",
                                     "shards not a list", "shard entry without sha256"])
def test_every_malformed_meta_is_a_value_error_naming_it(tmp_path, content):
    """A zero-byte meta.pt raised IndexError."""
    path = str(tmp_path / "ck")
    pfc_of(mk.ArcFace(), 1.0).save_sharded(path)
    meta_path = os.path.join(path, "meta.pt")
    meta = torch.load(meta_path, weights_only=True)
    if content == "pickle of a list":
        torch.save([1, 2], meta_path)
    elif content == "meta without shards":
        torch.save({k: v for k, v in meta.items() if k != "shards"}, meta_path)
    elif content == "shards not a list":
        torch.save(dict(meta, shards=3), meta_path)
    elif content == "shard entry without sha256":
        torch.save(dict(meta, shards=[{k: v for k, v in meta["shards"][0].items() if k != "sha256"}]), meta_path)
    else:
        open(meta_path, "wb").write(content)
    target = pfc_of(mk.ArcFace(), 7.0)
    with pytest.raises(ValueError, match="meta.pt"):
        target.load_sharded(path)
    assert torch.all(target.weight == 7.0)


def _save_two_shards(rank, world, path):
    pfc = pfc_of(mk.ArcFace(), 1.0 + rank)
    pfc.save_sharded(path)
    return None


@pytest.mark.slow
def test_a_failed_load_of_several_shards_changes_nothing(tmp_path):
    """A world-2 save loaded on one process whose second shard is damaged: the
    first shard was read, yet nothing of it (nor of the optimizer) lands."""
    from _dist import run_ranks

    path = str(tmp_path / "ck")
    run_ranks(_save_two_shards, 2, path, outdir=str(tmp_path))
    shards = sorted(f for f in os.listdir(path) if f.startswith("classes_"))
    assert len(shards) == 2
    data = bytearray(open(os.path.join(path, shards[1]), "rb").read())
    data[len(data) // 2] ^= 0x10
    open(os.path.join(path, shards[1]), "wb").write(bytes(data))
    target = pfc_of(mk.ArcFace(), 7.0)
    with pytest.raises(ValueError, match=f"{shards[1]}: sha256 does not match"):
        target.load_sharded(path)
    assert torch.all(target.weight == 7.0)
