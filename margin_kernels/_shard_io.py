"""PartialFC checkpoints whose cost scales with a shard, not with the class count.

Two forms, both loadable at any world size:

* the full [C, D] matrix (``state_dict()``), assembled in host memory one shard
  at a time, so a device never holds more than one extra shard;
* a sharded directory (``save_sharded``), one file per saving rank, where a
  loading rank memory-maps only the files that overlap its own class block and
  copies the overlap. Nothing ever holds the whole matrix. The weight's
  optimizer state (momentum, Adam moments) is resharded the same way.

Directory layout::

    meta.pt                                  format, num_classes, embedding_size, dtype, world_size
    classes_<start>_<end>.pt                 {"start", "end", "weight", "optimizer"}

``<start>``/``<end>`` are zero-padded, so a directory listing is in class order.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .partial_fc import PartialFC

FORMAT = 1
META = "meta.pt"


def _shard_name(start: int, end: int) -> str:
    return f"classes_{start:012d}_{end:012d}.pt"


def _atomic_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- full matrix


def gather_full(pfc: "PartialFC", dst: int | None = None) -> Tensor | None:
    """The full [C, D] class matrix in host memory, on every rank (``dst=None``)
    or on rank ``dst`` only (None elsewhere). A collective.

    Shards travel one at a time through a buffer of one shard on the weight's
    device; a [C, D] gather on the device would not fit at the sizes PartialFC is for.
    """
    import torch.distributed as dist

    from .partial_fc import class_split

    group, weight = pfc._group, pfc.weight.detach()
    splits = [class_split(pfc.num_classes, group.size, r) for r in range(group.size)]
    wanted = dst is None or group.rank == dst
    full = torch.empty((pfc.num_classes, pfc.embedding_size), dtype=weight.dtype) if wanted else None
    buffer = torch.empty((max(n for _, n in splits), pfc.embedding_size), dtype=weight.dtype, device=weight.device)
    for r, (start, count) in enumerate(splits):
        part = buffer[:count]
        if r == group.rank:
            part.copy_(weight)
        if dst is None:
            group.broadcast(part, src_rank=r)
        elif r != dst:  # point to point: only dst needs the rows
            peer = dst if group.rank == r else r
            global_peer = dist.get_global_rank(group.group, peer) if group.group is not None else peer
            if group.rank == r:
                dist.send(part, global_peer, group=group.group)
            elif group.rank == dst:
                dist.recv(part, global_peer, group=group.group)
        if full is not None:
            full[start : start + count].copy_(part)
    return full


# ---------------------------------------------------------------------- sharded directory


def _check_holds_weight(pfc: "PartialFC", optimizer: torch.optim.Optimizer | None) -> None:
    if optimizer is not None and not any(p is pfc.weight for g in optimizer.param_groups for p in g["params"]):
        raise ValueError("optimizer does not hold this PartialFC's weight in its param_groups")


def save_sharded(pfc: "PartialFC", path: str, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write this rank's shard (and its optimizer state) under directory ``path``.

    A collective: every rank calls it with the same ``path`` on a file system
    they share. Returns once every rank's file is complete.
    """
    _check_holds_weight(pfc, optimizer)
    os.makedirs(path, exist_ok=True)
    start, end = pfc.class_start, pfc.class_start + pfc.num_local
    shard_state = None
    if optimizer is not None:
        # Per-class tensors (momentum, moments) are this shard's rows, like the
        # weight; the rest (Adam's step) is the same on every rank.
        shard_state = {key: value.detach().cpu() if isinstance(value, Tensor) else value
                       for key, value in optimizer.state.get(pfc.weight, {}).items()}
    shard = {"start": start, "end": end, "weight": pfc.weight.detach().cpu(), "optimizer": shard_state}
    _atomic_save(shard, os.path.join(path, _shard_name(start, end)))
    if pfc._group.rank == 0:
        _atomic_save({"format": FORMAT, "num_classes": pfc.num_classes, "embedding_size": pfc.embedding_size,
                      "dtype": str(pfc.weight.dtype), "world_size": pfc._group.size}, os.path.join(path, META))
    pfc._group.barrier()


def _shard_files(path: str) -> list[tuple[int, int, str]]:
    found = []
    for name in sorted(os.listdir(path)):
        if name.startswith("classes_") and name.endswith(".pt"):
            start, end = name[len("classes_") : -len(".pt")].split("_")
            found.append((int(start), int(end), os.path.join(path, name)))
    return found


def load_sharded(pfc: "PartialFC", path: str, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Fill this rank's shard (and its optimizer state) from a directory written
    by ``save_sharded`` at any world size. Reads only the overlapping files,
    memory-mapped. Not a collective."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise ValueError(f"path {path!r} is not a sharded PartialFC checkpoint (no {META})")
    meta = torch.load(meta_path, weights_only=True)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: checkpoint format {meta.get('format')!r}, this version reads {FORMAT}")
    expected = (pfc.num_classes, pfc.embedding_size)
    if (meta["num_classes"], meta["embedding_size"]) != expected:
        raise ValueError(f"{path}: checkpoint holds [{meta['num_classes']}, {meta['embedding_size']}] classes x dims, "
                         f"this PartialFC is {list(expected)}")
    _check_holds_weight(pfc, optimizer)

    lo, hi = pfc.class_start, pfc.class_start + pfc.num_local
    covered = lo
    weight = pfc.weight.detach()
    new_state: dict[str, Any] = {}
    for start, end, file in _shard_files(path):
        if end <= lo or start >= hi:
            continue
        if start > covered:
            break
        shard = torch.load(file, mmap=True, weights_only=True)
        a, b = max(start, lo), min(end, hi)
        weight[a - lo : b - lo].copy_(shard["weight"][a - start : b - start])
        if optimizer is not None:
            saved = shard["optimizer"]
            if saved is None:
                raise ValueError(f"{file}: saved without optimizer state, but an optimizer was given")
            for key, value in saved.items():
                if isinstance(value, Tensor) and value.shape == shard["weight"].shape:
                    if key not in new_state:
                        new_state[key] = torch.empty((pfc.num_local,) + value.shape[1:], dtype=value.dtype,
                                                     device=weight.device)
                    new_state[key][a - lo : b - lo].copy_(value[a - start : b - start])
                elif key not in new_state:
                    new_state[key] = value.clone() if isinstance(value, Tensor) else value
        covered = max(covered, b)
    if covered < hi:
        raise ValueError(f"{path}: no shard file holds classes [{covered}, {hi}) (a missing or partial checkpoint)")
    if optimizer is not None:
        optimizer.state[pfc.weight] = new_state
