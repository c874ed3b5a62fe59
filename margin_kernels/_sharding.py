"""How classes are split over ranks, and the process-group wrapper PartialFC and
its checkpoint I/O talk through (a single process is the one-rank case)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
import torch.nn.functional as F
from torch import Tensor


def class_split(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(start, count) of rank's contiguous class block (insightface's split)."""
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


class Group:
    """The process group, or a stand-in for a single process."""

    def __init__(self, group: Any) -> None:
        self.distributed = dist.is_available() and dist.is_initialized()
        self.group = group
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.size = dist.get_world_size(group) if self.distributed else 1

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group)
        return t

    def broadcast(self, t: Tensor, src_rank: int = 0) -> Tensor:
        if self.distributed:
            dist.broadcast(t, self._global(src_rank), group=self.group)
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def send(self, t: Tensor, dst_rank: int) -> None:
        dist.send(t, self._global(dst_rank), group=self.group)

    def recv(self, t: Tensor, src_rank: int) -> Tensor:
        dist.recv(t, self._global(src_rank), group=self.group)
        return t

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather_rows_with_grad(self, t: Tensor, sizes: list[int]) -> Tensor:
        """``all_gather_rows`` with autograd: the backward sums every rank's
        share of the gathered rows' gradient and keeps this rank's rows."""
        if not self.distributed:
            return t
        padded = F.pad(t, (0, 0, 0, max(sizes) - t.shape[0]))
        with warnings.catch_warnings():
            # Recent torch marks this public autograd all-gather deprecated in
            # favour of a private one; the public one stays until a public
            # replacement exists, without a notice on every training step.
            warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
            parts = dist_autograd.all_gather(padded, group=self.group if self.group is not None else dist.group.WORLD)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    def all_gather_rows(self, t: Tensor, sizes: list[int]) -> Tensor:
        """Concatenate every rank's rows (rank order), sizes[r] rows from rank r."""
        if not self.distributed:
            return t
        padded = torch.zeros((max(sizes),) + t.shape[1:], dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])


@dataclass(frozen=True)
class Shard:
    """What one rank holds of a class matrix sharded over a group: the
    surface ``PartialFC.shard`` gives its checkpoint I/O."""

    group: Group
    num_classes: int  # C over all ranks
    embedding_size: int  # D
    subcenters: int  # K weight rows per class
    class_start: int  # this rank's classes: [class_start, class_start + num_local)
    num_local: int
    weight: Tensor  # this rank's [num_local * K, D] parameter
    buffers: Mapping[str, Tensor]  # the margin's running state (the same on every rank)
    layout: dict  # the layout record (``_state.layout_state``) a checkpoint must match
