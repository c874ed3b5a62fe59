"""The torchrun training recipe (examples/train_partial_fc.py): its data and
metrics, and a run stopped and resumed bit for bit at 2 gloo ranks, and at
another world size."""
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from margin_kernels import backends

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "train_partial_fc.py"

requires_cpp = pytest.mark.skipif(not backends.is_available("cpp"), reason="cpp backend unavailable")


sys.path.insert(0, str(SCRIPT.parent))  # the script's own pieces: examples/partial_fc_recipe
from partial_fc_recipe import report, synthetic_faces as faces, verification  # noqa: E402


def recipe():
    spec = importlib.util.spec_from_file_location("train_partial_fc", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_partial_fc"] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


R = recipe()

# A few steps of a tiny model: ElasticArcFace draws its margins from the head's
# generator, so the RNG path is part of what must resume exactly.
TINY = ["--identities", "40", "--batch", "12", "--steps", "6", "--embedding-size", "16", "--image-size", "16",
        "--width", "8", "--eval-identities", "8", "--eval-samples", "2", "--eval-negatives", "40", "--eval-every", "3",
        "--checkpoint-every", "3", "--warmup", "2", "--margin", "elastic", "--margin-args", "s=16,m=0.3",
        "--lr", "0.05", "--quiet"]


def launch(out, world: int, *extra: str) -> None:
    if world == 1:
        cmd = [sys.executable, str(SCRIPT)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               str(SCRIPT)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd + TINY + ["--out", str(out), *extra], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def final_state(out) -> dict:
    """Every tensor of the last checkpoint: the backbone, its optimizer, and
    each head shard's weight and optimizer state, by file."""
    root = pathlib.Path(out) / "checkpoint"
    path = root / (root / "latest").read_text().strip()
    train = torch.load(path / "train.pt", weights_only=False)
    state = {f"backbone.{k}": v for k, v in train["backbone"].items()}
    for i, s in train["optimizer"]["state"].items():
        state |= {f"optimizer.{i}.{k}": v for k, v in s.items() if torch.is_tensor(v)}
    for shard in sorted((path / "head").glob("classes_*.pt")):
        blob = torch.load(shard, weights_only=False)
        name = shard.name.split(".")[0]
        state[f"{name}.weight"] = blob["weight"]
        for k, v in (blob.get("optimizer") or {}).items():
            if torch.is_tensor(v):
                state[f"{name}.optimizer.{k}"] = v
    return state


# ---------------------------------------------------------------- data and metrics

def test_the_hash_is_uniform_and_a_function_of_its_counters():
    u = faces.hash_uniform(3, 1, torch.arange(100_000))
    assert u.min() >= 0 and u.max() < 1 and abs(float(u.mean()) - 0.5) < 0.01
    assert torch.equal(u, faces.hash_uniform(3, 1, torch.arange(100_000)))
    assert not torch.equal(u, faces.hash_uniform(4, 1, torch.arange(100_000)))
    n = faces.hash_normal(0, 2, torch.arange(100_000))
    assert abs(float(n.mean())) < 0.02 and abs(float(n.std()) - 1) < 0.02


def test_identities_differ_and_their_photos_vary():
    cfg = R.Config(identities=50, image_size=16)
    protos = faces.prototypes(torch.arange(50), cfg.seed, 16).flatten(1)
    sims = torch.nn.functional.normalize(protos, dim=1) @ torch.nn.functional.normalize(protos, dim=1).t()
    assert float((sims - torch.eye(50)).abs().max()) < 0.95  # no two identities alike
    photos = faces.augment(protos.view(50, 1, 16, 16)[:1].expand(8, 1, 16, 16), 0, 0, torch.arange(8))
    assert len({tuple(p.flatten()[:5].tolist()) for p in photos}) == 8


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_the_global_batch_is_the_same_at_every_world_size(world):
    cfg = R.Config(identities=30, batch=13, image_size=16)
    whole = faces.train_batch(7, range(0, 13), cfg, "cpu")
    parts = [faces.train_batch(7, faces.rank_rows(13, world, r), cfg, "cpu") for r in range(world)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])
    assert int(whole[1].max()) < 30


def test_held_out_identities_are_not_trained_on():
    cfg = R.Config(identities=30, eval_identities=5, eval_samples=3, image_size=16)
    _, ids = faces.eval_images(cfg, "cpu")
    assert sorted(set(ids.tolist())) == list(range(30, 35)) and ids.numel() == 15
    labels = torch.cat([faces.train_batch(s, range(0, 64), cfg, "cpu")[1] for s in range(20)])
    assert int(labels.max()) < 30


def test_verification_metrics():
    same = torch.tensor([True] * 10 + [False] * 2000)
    perfect = torch.where(same, 1.0, 0.0) + torch.linspace(0, 0.1, same.numel())
    m = verification.verification(perfect, same)
    assert m["accuracy"] == 1.0 and m["tar@far=0.001"] == 1.0 and m["tar@far=0.01"] == 1.0
    # scores that say nothing: chance, whatever the class balance
    noise = faces.hash_uniform(0, 9, torch.arange(same.numel()))
    m = verification.verification(noise, same)
    assert 0.5 <= m["accuracy"] < 0.8 and m["pairs_genuine"] == 10 and m["pairs_impostor"] == 2000
    # one impostor above every genuine pair: at FAR = 1e-3 (2 of 2000 allowed) it does not count
    scores = torch.where(same, 0.5, 0.0)
    scores[-1] = 0.9
    assert verification.verification(scores, same)["tar@far=0.001"] == 1.0
    assert "tar@far=0.001" not in verification.verification(scores[-500:], same[-500:])  # too few impostors
    roc = m["roc"]
    assert all(0 <= far <= 1 and 0 <= tar <= 1 for far, tar in roc) and roc == sorted(roc)


def test_the_margin_names():
    assert type(R.margin_spec("softmax", {})).__name__ == "NormSoftmax"
    assert type(R.margin_spec("elastic", {"s": 16.0})).__name__ == "ElasticArcFace"
    assert R.margin_spec("cosface", {"m": 0.3}).m == 0.3
    with pytest.raises(SystemExit, match="--margin must be one of"):
        R.margin_spec("nope", {})
    with pytest.raises(SystemExit, match="--margin-args: softmax takes .*s.*; not m"):
        R.margin_spec("softmax", {"m": 0.3})


def test_the_schedule():
    cfg = R.Config(steps=100, warmup=10)
    assert R.lr_factor(0, cfg) == pytest.approx(0.1) and R.lr_factor(9, cfg) == 1.0
    assert R.lr_factor(99, cfg) < 0.01
    assert R.lr_factor(55, R.Config(steps=100, warmup=10, schedule="poly")) == pytest.approx(0.25)


# ---------------------------------------------------------------- stop and resume

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 6-step run at 2 ranks, and one stopped after step 3
    (a copy of its checkpoint kept) and resumed there."""
    if not backends.is_available("cpp"):
        pytest.skip("cpp backend unavailable")
    tmp = tmp_path_factory.mktemp("recipe")
    launch(tmp / "whole", 2)
    launch(tmp / "resumed", 2, "--stop-after", "3")
    shutil.copytree(tmp / "resumed", tmp / "at_step_3")
    launch(tmp / "resumed", 2, "--resume")
    return tmp


@requires_cpp
@pytest.mark.slow
def test_a_resumed_run_is_bit_identical_to_one_that_never_stopped(runs):
    whole = json.loads((runs / "whole" / "run.json").read_text())
    resumed = json.loads((runs / "resumed" / "run.json").read_text())
    assert len(whole["loss"]) == 6 and resumed["loss"] == whole["loss"]
    assert [e["step"] for e in whole["evals"]] == [0, 3, 6]
    assert resumed["evals"] == whole["evals"]
    a, b = final_state(runs / "whole"), final_state(runs / "resumed")
    assert a.keys() == b.keys() and any(k.startswith("classes_") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the run changed something: the checkpoint is not its initialization
    first = final_state(runs / "at_step_3")
    assert not torch.equal(first["backbone.features.weight"], a["backbone.features.weight"])


@requires_cpp
@pytest.mark.slow
def test_a_run_resumes_at_another_world_size(runs):
    """Saved at 2 ranks, continued on 1: the head is resharded, and as the
    loss does not depend on how the batch is split, steps 4-6 match the
    uninterrupted run's up to the order of the sums."""
    launch(runs / "at_step_3", 1, "--resume")
    whole = json.loads((runs / "whole" / "run.json").read_text())
    other = json.loads((runs / "at_step_3" / "run.json").read_text())
    assert other["world_size"] == 1
    assert other["loss"][:3] == whole["loss"][:3]
    for a, b in zip(other["loss"][3:], whole["loss"][3:]):
        assert abs(a - b) <= 1e-4 * abs(b), (other["loss"], whole["loss"])
    a, b = final_state(runs / "at_step_3"), final_state(runs / "whole")
    wa = torch.cat([v for k, v in sorted(a.items()) if k.startswith("classes_") and k.endswith(".weight")])
    wb = torch.cat([v for k, v in sorted(b.items()) if k.startswith("classes_") and k.endswith(".weight")])
    assert wa.shape == wb.shape and float((wa - wb).abs().max()) <= 1e-4 * float(wb.abs().max())
    for k in (k for k in b if k.startswith("backbone.")):
        assert float((a[k] - b[k]).abs().max()) <= 1e-4 * max(float(b[k].abs().max()), 1e-6), k


@requires_cpp
@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    launch(tmp_path, 1, "--stop-after", "1")
    cmd = [sys.executable, str(SCRIPT), *TINY, "--out", str(tmp_path), "--resume", "--identities", "41"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0 and "trained with other settings (identities)" in proc.stderr


def test_the_comparison_figure(tmp_path):
    """Several runs on one figure, one of them without enough impostors for TAR@FAR=1e-3."""
    pytest.importorskip("matplotlib")
    same = torch.tensor([True] * 20 + [False] * 2000)
    scores = faces.hash_uniform(0, 5, torch.arange(same.numel())) + same.float() * 0.3
    full = {"step": 10, **verification.verification(scores, same)}
    few = {"step": 10, **verification.verification(scores[:200], same[:200])}
    runs = {"arcface": {"loss": [3.0, 2.0, 1.5], "evals": [full]}, "softmax": {"loss": [2.0, 1.0], "evals": [few]},
            "cosface": {"loss": [1.0], "evals": []}}
    report.plot(runs, str(tmp_path / "compare.png"))
    assert (tmp_path / "compare.png").stat().st_size > 10_000


@requires_cpp
@pytest.mark.slow
def test_compare_trains_each_margin_and_draws_them_together(tmp_path):
    cmd = [sys.executable, str(SCRIPT), *TINY, "--steps", "2", "--eval-every", "2", "--checkpoint-every", "0",
           "--compare", "softmax,cosface", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for margin in ("softmax", "cosface"):
        run = json.loads((tmp_path / margin / "run.json").read_text())
        assert run["config"]["margin"] == margin and len(run["loss"]) == 2 and run["evals"][-1]["step"] == 2
    assert "softmax: accuracy" in proc.stdout and "cosface: accuracy" in proc.stdout
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "compare.png").exists()
