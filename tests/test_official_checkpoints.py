"""margin_kernels.official: the official heads' checkpoints, laid out exactly as
their code saves them (the modules below register the same parameters and
buffers, under the same names and shapes, as the published constructors), load
in one call into our heads and PartialFC, at any world size."""
import os

import pytest
import torch
from torch import nn

import margin_kernels as mk
from margin_kernels import official

from _dist import run_ranks

D, C = 6, 10


def full_matrix(rows: int = C, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- their modules' state

class ArcfaceTorchPartialFC(nn.Module):
    """arcface_torch's PartialFC_V2: rank r's contiguous block of the classes."""

    def __init__(self, rank: int, world_size: int, embedding_size: int, num_classes: int) -> None:
        super().__init__()
        self.num_local = num_classes // world_size + int(rank < num_classes % world_size)
        self.class_start = num_classes // world_size * rank + min(rank, num_classes % world_size)
        self.weight = nn.Parameter(torch.normal(0, 0.01, (self.num_local, embedding_size)))


class CVLfacePartialFC(nn.Module):
    """CVLface's PartialFC_V2: the class count rounded up to a multiple of the
    world size, and AdaFace's running statistics as buffers."""

    def __init__(self, rank: int, world_size: int, embedding_size: int, num_classes: int, adaface: bool) -> None:
        super().__init__()
        padded = num_classes // world_size * world_size
        if padded < num_classes:
            padded += world_size
        self.num_local = padded // world_size + int(rank < padded % world_size)
        self.class_start = padded // world_size * rank + min(rank, padded % world_size)
        self.weight = nn.Parameter(torch.normal(0, 0.01, (self.num_local, embedding_size)))
        if adaface:
            self.register_buffer("batch_mean", torch.ones(1) * 20)
            self.register_buffer("batch_std", torch.ones(1) * 100)


class AdaFaceHead(nn.Module):
    """AdaFace's head.py: kernel [D, C] and three [1] buffers."""

    def __init__(self, embedding_size: int, classnum: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.Tensor(embedding_size, classnum))
        self.register_buffer("t", torch.zeros(1))
        self.register_buffer("batch_mean", torch.ones(1) * 20)
        self.register_buffer("batch_std", torch.ones(1) * 100)


class MagLinear(nn.Module):
    """MagFace's MagLinear: weight [in_features, out_features]."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.Tensor(in_features, out_features))


class CurricularFaceHead(nn.Module):
    """CurricularFace's head: kernel [in_features, out_features], t [1]."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.Tensor(in_features, out_features))
        self.register_buffer("t", torch.zeros(1))


def save_arcface_torch_ranks(folder, full: torch.Tensor, world: int) -> None:
    for rank in range(world):
        theirs = ArcfaceTorchPartialFC(rank, world, D, full.shape[0])
        with torch.no_grad():
            theirs.weight.copy_(full[theirs.class_start: theirs.class_start + theirs.num_local])
        torch.save(theirs.state_dict(), os.path.join(folder, f"softmax_fc_gpu_{rank}.pt"))


# ---------------------------------------------------------------- arcface_torch

@pytest.mark.parametrize("world", [1, 3, 4])
def test_arcface_torch_rank_files_into_a_head_and_partial_fc(tmp_path, world):
    full = full_matrix()
    save_arcface_torch_ranks(tmp_path, full, world)
    head = mk.nn.ArcFace(D, C)
    official.load_arcface_torch(head, tmp_path)
    assert torch.equal(head.weight.detach(), full)
    pfc = mk.PartialFC(D, C, mk.ArcFace())
    official.load_arcface_torch(pfc, [tmp_path / f"softmax_fc_gpu_{r}.pt" for r in range(world)])
    assert torch.equal(pfc.weight.detach(), full)


def test_arcface_torch_state_dicts_and_sub_centers(tmp_path):
    full = full_matrix(3 * C)
    states = []
    for rank in range(2):
        theirs = ArcfaceTorchPartialFC(rank, 2, D, 3 * C)
        theirs.weight.data.copy_(full[theirs.class_start: theirs.class_start + theirs.num_local])
        states.append(theirs.state_dict())
    head = mk.nn.ArcFace(D, C, subcenters=3)
    official.load_arcface_torch(head, states)
    assert torch.equal(head.weight.detach(), full)


def test_arcface_torch_full_training_states(tmp_path):
    """With save_all_states, each rank's checkpoint_gpu_{rank}.pt holds the
    head under state_dict_softmax_fc, beside the backbone and the optimizer."""
    full = full_matrix()
    paths = []
    for rank in range(2):
        theirs = ArcfaceTorchPartialFC(rank, 2, D, C)
        theirs.weight.data.copy_(full[theirs.class_start: theirs.class_start + theirs.num_local])
        paths.append(tmp_path / f"checkpoint_gpu_{rank}.pt")
        torch.save({"epoch": 3, "global_step": 120, "state_dict_backbone": {"fc.weight": torch.zeros(2, 2)},
                    "state_dict_softmax_fc": theirs.state_dict(), "state_optimizer": {}, "state_lr_scheduler": {}},
                   paths[-1])
    head = mk.nn.ArcFace(D, C)
    official.load_arcface_torch(head, paths)
    assert torch.equal(head.weight.detach(), full)


def _load_on_ranks(rank, world, folder):
    pfc = mk.PartialFC(D, C, mk.ArcFace())
    official.load_arcface_torch(pfc, folder)
    return pfc.class_start, pfc.weight.detach().clone()


@pytest.mark.slow
def test_arcface_torch_files_of_3_ranks_into_partial_fc_at_2(tmp_path):
    full = full_matrix()
    folder = tmp_path / "theirs"
    folder.mkdir()
    save_arcface_torch_ranks(folder, full, 3)
    results = run_ranks(_load_on_ranks, 2, str(folder), outdir=str(tmp_path))
    assert [start for start, _ in results] == [0, 5]
    assert torch.equal(torch.cat([w for _, w in results]), full)


def test_a_rank_reads_only_the_files_of_its_classes(tmp_path, monkeypatch):
    """Rank 1 of 2 (classes 5..9) of a 4-rank save ([3, 3, 2, 2] rows) copies
    from files 1, 2 and 3 only (its class block read through the ranks'
    blocks, none of them whole)."""
    full = full_matrix()
    save_arcface_torch_ranks(tmp_path, full, 4)
    blocks = official._RankBlocks(official._rank_sources(tmp_path, "softmax_fc_gpu_"), "weight", padded=False)
    opened = []
    real = official._open
    monkeypatch.setattr(official, "_open", lambda s: opened.append(os.path.basename(str(s))) or real(s))
    assert torch.equal(blocks.read(5, 10), full[5:10])
    assert sorted(set(opened)) == ["softmax_fc_gpu_1.pt", "softmax_fc_gpu_2.pt", "softmax_fc_gpu_3.pt"]


# ---------------------------------------------------------------- CVLface

@pytest.mark.parametrize("world", [1, 4])
def test_cvlface_padded_ranks_with_adaface_statistics(tmp_path, world):
    full = full_matrix(12)  # 10 classes padded to 12 at 4 ranks
    paths = []
    for rank in range(world):
        theirs = CVLfacePartialFC(rank, world, D, C, adaface=True)
        theirs.weight.data.copy_(full[theirs.class_start: theirs.class_start + theirs.num_local])
        theirs.batch_mean.fill_(23.5)
        theirs.batch_std.fill_(7.25)
        paths.append(tmp_path / f"partial_fc_rank{rank}.pt")
        torch.save(theirs.state_dict(), paths[-1])
    head = mk.nn.AdaFace(D, C)
    official.load_cvlface(head, paths)
    assert torch.equal(head.weight.detach(), full[:C])
    assert float(head.batch_mean) == 23.5 and float(head.batch_std) == 7.25
    pfc = mk.PartialFC(D, C, mk.AdaFace())
    official.load_cvlface(pfc, tmp_path)
    assert torch.equal(pfc.weight.detach(), full[:C]) and float(pfc.batch_std) == 7.25


def test_cvlface_arcface_has_no_statistics(tmp_path):
    full = full_matrix()
    theirs = CVLfacePartialFC(0, 1, D, C, adaface=False)
    theirs.weight.data.copy_(full)
    head = mk.nn.ArcFace(D, C)
    official.load_cvlface(head, [theirs.state_dict()])
    assert torch.equal(head.weight.detach(), full)


# ---------------------------------------------------------------- single heads

def test_adaface_head(tmp_path):
    full = full_matrix()
    theirs = AdaFaceHead(D, C)
    theirs.kernel.data.copy_(full.t())
    theirs.batch_mean.fill_(31.0)
    theirs.batch_std.fill_(4.5)
    torch.save(theirs.state_dict(), tmp_path / "head.pt")
    head = mk.nn.AdaFace(D, C)
    official.load_adaface(head, tmp_path / "head.pt")
    assert torch.equal(head.weight.detach(), full)
    assert float(head.batch_mean) == 31.0 and float(head.batch_std) == 4.5
    # inside a training checkpoint: {"state_dict": {"head.kernel": ...}}
    wrapped = {"state_dict": {f"head.{k}": v for k, v in theirs.state_dict().items()}, "epoch": 3}
    other = mk.nn.AdaFace(D, C)
    official.load_adaface(other, wrapped, prefix="head.")
    assert torch.equal(other.weight.detach(), full) and float(other.batch_std) == 4.5
    pfc = mk.PartialFC(D, C, mk.AdaFace())
    official.load_adaface(pfc, theirs.state_dict())
    assert torch.equal(pfc.weight.detach(), full) and float(pfc.batch_mean) == 31.0


def test_magface_and_curricularface_heads():
    full = full_matrix()
    mag = MagLinear(D, C)
    mag.weight.data.copy_(full.t())
    head = mk.nn.MagFace(D, C)
    official.load_magface(head, mag.state_dict())
    assert torch.equal(head.weight.detach(), full)
    cur = CurricularFaceHead(D, C)
    cur.kernel.data.copy_(full.t())
    cur.t.fill_(0.375)
    head = mk.nn.CurricularFace(D, C)
    official.load_curricularface(head, cur.state_dict())
    assert torch.equal(head.weight.detach(), full) and float(head.t) == 0.375
    assert head.t.shape == ()
    # a training checkpoint wrapping the head's state dict, with or without a prefix
    for prefix in ("", "module.head."):
        wrapped = {"epoch": 7, "state_dict": {prefix + k: v for k, v in cur.state_dict().items()}, "optimizer": {}}
        other = mk.nn.CurricularFace(D, C)
        official.load_curricularface(other, wrapped, prefix=prefix)
        assert torch.equal(other.weight.detach(), full) and float(other.t) == 0.375


def test_a_loaded_head_trains_on():
    """Loading replaces values, not the parameter: an optimizer built before
    still updates the loaded weight."""
    full = full_matrix()
    head = mk.nn.CurricularFace(D, C)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    cur = CurricularFaceHead(D, C)
    cur.kernel.data.copy_(full.t())
    official.load_curricularface(head, cur.state_dict())
    head(torch.randn(4, D), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert not torch.equal(head.weight.detach(), full)


# ---------------------------------------------------------------- refusals

def test_mismatches_are_refused_before_anything_is_copied(tmp_path):
    full = full_matrix()
    head = mk.nn.AdaFace(D, C)
    before = head.weight.detach().clone()
    theirs = AdaFaceHead(D + 1, C)
    with pytest.raises(ValueError, match="7 dimensions, the module's are 6"):
        official.load_adaface(head, theirs.state_dict())
    with pytest.raises(ValueError, match=r"\[D=6, C=11\], the module has 10 class rows"):
        official.load_adaface(head, AdaFaceHead(D, C + 1).state_dict())
    with pytest.raises(ValueError, match="no 'kernel'"):
        official.load_adaface(head, MagLinear(D, C).state_dict())
    with pytest.raises(ValueError, match="margin state 'batch_mean'.*matching family"):
        official.load_adaface(mk.nn.ArcFace(D, C), AdaFaceHead(D, C).state_dict())
    assert torch.equal(head.weight.detach(), before)
    # rank files: a missing rank, another class count
    save_arcface_torch_ranks(tmp_path, full, 3)
    os.remove(tmp_path / "softmax_fc_gpu_1.pt")
    with pytest.raises(ValueError, match=r"not ranks 0 \.\. 1 \(found ranks \[0, 2\]\)"):
        official.load_arcface_torch(mk.nn.ArcFace(D, C), tmp_path)
    with pytest.raises(ValueError, match=r"2 rank files of \[4, 3\] rows, where 10 rows"):
        official.load_arcface_torch(mk.nn.ArcFace(D, C), [tmp_path / "softmax_fc_gpu_0.pt",
                                                          tmp_path / "softmax_fc_gpu_2.pt"])
    with pytest.raises(ValueError, match="does not exist"):
        official.load_magface(mk.nn.MagFace(D, C), tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="no softmax_fc_gpu_<rank>.pt"):
        official.load_arcface_torch(mk.nn.ArcFace(D, C), tmp_path / "..")
    with pytest.raises(TypeError, match="module must be a margin_kernels.nn head or a PartialFC"):
        official.load_magface(nn.Linear(D, C), MagLinear(D, C).state_dict())
    with pytest.raises(TypeError, match="checkpoints must be a folder or a non-empty list"):
        official.load_arcface_torch(mk.nn.ArcFace(D, C), [])
