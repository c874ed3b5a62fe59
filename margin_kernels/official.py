"""Load the official margin heads' checkpoints, one call each, into a head of
``margin_kernels.nn`` or into a ``PartialFC`` at any world size.

Each loader takes the checkpoint as its authors' code writes it (file paths or
loaded state dicts) and the module to fill, and checks the shapes before it
copies anything. A ``PartialFC`` rank copies only the classes it owns, and
from per-rank checkpoints memory-maps only the files that overlap them, so
this scales with the shard, not with the class count; no collective is called.

- ``load_arcface_torch``: insightface arcface_torch's ``PartialFC_V2``,
  ``softmax_fc_gpu_{rank}.pt`` (``{"weight": [C_r, D]}``) or
  ``checkpoint_gpu_{rank}.pt`` per rank, classes split contiguously
  (C_r = C // W + (r < C % W));
- ``load_cvlface``: CVLface's ``PartialFC_V2`` (or ``FC``), the same per rank
  with the class count padded up to a multiple of W, and with AdaFace its
  ``batch_mean`` and ``batch_std`` [1];
- ``load_adaface``: AdaFace's ``head.py``, ``kernel`` [D, C], ``t``,
  ``batch_mean``, ``batch_std`` [1];
- ``load_magface``: MagFace's ``MagLinear``, ``weight`` [D, C];
- ``load_curricularface``: the CurricularFace head, ``kernel`` [D, C], ``t`` [1].

Their margin settings map to the specs as the README's "Coming from ..."
table says; these functions move the numbers.
"""
from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping, Sequence
from typing import Union

import torch
from torch import Tensor

from .nn import MarginSoftmaxLoss
from .partial_fc import PartialFC, class_split

__all__ = ["load_arcface_torch", "load_cvlface", "load_adaface", "load_magface", "load_curricularface"]

Checkpoint = Union[str, "os.PathLike[str]", Mapping[str, Tensor]]
Module = Union[MarginSoftmaxLoss, PartialFC]


def load_arcface_torch(module: Module, checkpoints: str | Sequence[Checkpoint]) -> None:
    """insightface arcface_torch's ``PartialFC_V2`` class centers, saved by
    each of its W ranks as ``softmax_fc_gpu_{rank}.pt`` (``{"weight":
    [C_r, D]}``), into ``module`` (a head of C classes, or a ``PartialFC``
    at any world size).

    ``checkpoints``: the training's output folder (every
    ``softmax_fc_gpu_*.pt`` in it, by rank), or the ranks' files or state
    dicts in rank order; the ranks' full training states
    (``checkpoint_gpu_{rank}.pt`` with ``save_all_states``, the head under
    ``state_dict_softmax_fc``) are taken as well. Pair it with
    ``PartialFC.from_insightface`` for the margin."""
    _fill(module, _RankBlocks(_rank_sources(checkpoints, "softmax_fc_gpu_"), "weight", padded=False,
                              within="state_dict_softmax_fc"), {})


def load_cvlface(module: Module, checkpoints: str | Sequence[Checkpoint]) -> None:
    """CVLface's ``PartialFC_V2`` (or its single-rank ``FC``): ``{"weight":
    [C_r, D]}`` per rank, the class count padded up to a multiple of its world
    size (the padding rows, past ``module``'s class count, are dropped), and
    with an AdaFace loss the running ``batch_mean`` and ``batch_std`` ([1],
    the same on every rank), which go to ``module``'s AdaFace state.

    ``checkpoints``: the ranks' files or state dicts in rank order (a folder:
    every ``*.pt`` in it whose name ends in the rank number)."""
    sources = _rank_sources(checkpoints, "")
    first = _open(sources[0])
    _fill(module, _RankBlocks(sources, "weight", padded=True),
          {name: first[name] for name in ("batch_mean", "batch_std") if name in first})


def load_adaface(module: Module, checkpoint: Checkpoint, prefix: str = "") -> None:
    """AdaFace's ``head.py`` (``kernel`` [D, C], ``batch_mean`` and
    ``batch_std`` [1]; its ``t`` is unused by the loss and skipped) into an
    AdaFace head or ``PartialFC(margin=AdaFace())``. ``prefix``: the keys'
    prefix where the head was saved inside a larger state dict (``"head."``
    in the official training's Lightning checkpoints, under
    ``state_dict``)."""
    state = _state(checkpoint, prefix, "kernel")
    _fill(module, _Transposed(_require(state, "kernel", prefix)),
          {name: _require(state, name, prefix) for name in ("batch_mean", "batch_std")})


def load_magface(module: Module, checkpoint: Checkpoint, prefix: str = "") -> None:
    """MagFace's ``MagLinear`` (``weight`` [D, C]) into a MagFace head or
    ``PartialFC(margin=MagFace())``."""
    state = _state(checkpoint, prefix, "weight")
    _fill(module, _Transposed(_require(state, "weight", prefix)), {})


def load_curricularface(module: Module, checkpoint: Checkpoint, prefix: str = "") -> None:
    """The CurricularFace head (``kernel`` [D, C], ``t`` [1]) into a
    CurricularFace head or ``PartialFC(margin=CurricularFace())``."""
    state = _state(checkpoint, prefix, "kernel")
    _fill(module, _Transposed(_require(state, "kernel", prefix)), {"t": _require(state, "t", prefix)})


# ---------------------------------------------------------------- sources of class rows

def _open(source: Checkpoint) -> Mapping[str, Tensor]:
    if isinstance(source, Mapping):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a checkpoint must be a path or a state dict, got {type(source).__name__}")
    if not os.path.isfile(source):
        raise ValueError(f"checkpoint {os.fspath(source)!r} does not exist")
    # memory-mapped: a rank reads the pages of its own classes only
    return torch.load(source, map_location="cpu", mmap=True, weights_only=True)


def _state(checkpoint: Checkpoint, prefix: str, key: str) -> Mapping[str, Tensor]:
    """The state dict holding ``prefix + key``: the checkpoint itself, or the
    ``state_dict`` a training checkpoint wraps it in."""
    state = _open(checkpoint)
    wrapped = state.get("state_dict")
    if prefix + key not in state and isinstance(wrapped, Mapping) and prefix + key in wrapped:
        return wrapped
    return state


def _require(state: Mapping[str, Tensor], key: str, prefix: str) -> Tensor:
    if prefix + key not in state:
        raise ValueError(f"checkpoint: no {prefix + key!r} among its keys {sorted(state)[:8]}")
    return state[prefix + key]


def _rank_sources(checkpoints, stem: str) -> list:
    """The ranks' checkpoints in rank order: a folder's ``{stem}{rank}.pt``
    files by rank number, or the sequence as given."""
    if isinstance(checkpoints, (str, os.PathLike)):
        folder = os.fspath(checkpoints)
        if not os.path.isdir(folder):
            raise ValueError(f"checkpoints: {folder!r} is not a folder (pass the ranks' files as a list)")
        numbered = {}
        for path in glob.glob(os.path.join(folder, f"{stem}*.pt")):
            match = re.search(r"(\d+)\.pt$", os.path.basename(path))
            if match:
                numbered[int(match.group(1))] = path
        if not numbered:
            raise ValueError(f"checkpoints: no {stem}<rank>.pt file in {folder!r}")
        if sorted(numbered) != list(range(len(numbered))):
            raise ValueError(f"checkpoints: the rank files in {folder!r} are not ranks 0 .. {len(numbered) - 1} "
                             f"(found ranks {sorted(numbered)})")
        return [numbered[r] for r in range(len(numbered))]
    if isinstance(checkpoints, Mapping) or not isinstance(checkpoints, Sequence) or not checkpoints:
        raise TypeError("checkpoints must be a folder or a non-empty list of the ranks' files or state dicts")
    return list(checkpoints)


class _RankBlocks:
    """Class rows saved as one contiguous block per rank."""

    def __init__(self, sources: list, key: str, padded: bool, within: str | None = None) -> None:
        self.sources, self.key, self.within = sources, key, within
        self.blocks = []  # (first row, rows, source)
        start, dims = 0, set()
        for rank, source in enumerate(sources):
            weight = self._weight(source)
            if weight.dim() != 2:
                raise ValueError(f"checkpoints: rank {rank}'s {key!r} must be [rows, D], got {tuple(weight.shape)}")
            self.blocks.append((start, weight.shape[0], source))
            start += weight.shape[0]
            dims.add(weight.shape[1])
        if len(dims) != 1:
            raise ValueError(f"checkpoints: the ranks' {key!r} differ in D ({sorted(dims)})")
        self.rows, self.dim, self.padded = start, dims.pop(), padded

    def _weight(self, source) -> Tensor:
        state = _open(source)
        if self.within is not None and self.within in state:  # a full training state
            state = state[self.within]
        return _require(state, self.key, "")

    def check_rows(self, wanted: int) -> None:
        world = len(self.blocks)
        counts = [n for _, n, _ in self.blocks]
        if self.padded:  # CVLface: ceil(C / W) * W classes, W equal blocks
            expected = [-(-wanted // world)] * world
        else:
            expected = [class_split(wanted, world, r)[1] for r in range(world)]
        if counts != expected:
            raise ValueError(f"checkpoints: {world} rank files of {counts} rows, where {wanted} rows split over "
                             f"{world} ranks give {expected} (another class count or sub-center count, or a "
                             f"missing rank file)")

    def read(self, start: int, end: int) -> Tensor:
        parts = []
        for first, n, source in self.blocks:
            lo, hi = max(start, first), min(end, first + n)
            if lo < hi:
                parts.append(self._weight(source)[lo - first: hi - first])
        return torch.cat(parts) if parts else torch.empty(0, self.dim)


class _Transposed:
    """Class rows stored as the columns of a [D, C] matrix."""

    def __init__(self, kernel: Tensor) -> None:
        if kernel.dim() != 2:
            raise ValueError(f"checkpoint: the class matrix must be [D, C], got {tuple(kernel.shape)}")
        self.kernel, self.padded = kernel, False
        self.dim, self.rows = kernel.shape

    def check_rows(self, wanted: int) -> None:
        if self.rows != wanted:
            raise ValueError(f"checkpoint: its class matrix is [D={self.dim}, C={self.rows}], the module has "
                             f"{wanted} class rows")

    def read(self, start: int, end: int) -> Tensor:
        return self.kernel[:, start:end].t()


# ---------------------------------------------------------------- the copy

def _fill(module: Module, rows, state: dict[str, Tensor]) -> None:
    """Copy rows [start, end) of the source (this module's classes; all of
    them for a head) and the margin's state into ``module``, checking first."""
    if isinstance(module, PartialFC):
        k = module.subcenters
        total, start, count = module.num_classes * k, module.class_start * k, module.num_local * k
    elif isinstance(module, MarginSoftmaxLoss):
        start, total = 0, module.weight.shape[0]
        count = total
    else:
        raise TypeError(f"module must be a margin_kernels.nn head or a PartialFC, got {type(module).__name__}")
    dim = module.weight.shape[1]
    if rows.dim != dim:
        raise ValueError(f"checkpoint: embeddings of {rows.dim} dimensions, the module's are {dim}")
    rows.check_rows(total)
    buffers = dict(module.named_buffers(recurse=False))
    for name, value in state.items():
        if name not in buffers:
            raise ValueError(f"checkpoint: it holds the margin state {name!r}, which {module.margin!r} does not "
                             f"keep; load it into a module of the matching family")
        if value.numel() != 1:
            raise ValueError(f"checkpoint: {name!r} must hold one value, got shape {tuple(value.shape)}")
    with torch.no_grad():
        module.weight.copy_(rows.read(start, start + count))
        for name, value in state.items():
            buffers[name].copy_(value.reshape(()))
