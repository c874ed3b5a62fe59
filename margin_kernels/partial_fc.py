"""PartialFC: the class matrix sharded over the ranks of a process group
(docs/DESIGN.md §6), with optional sampled negatives.

Rank r owns the contiguous block of classes [start_r, start_r + num_local_r),
num_local_r = C // W + (r < C % W). A step:

1. all-gather the ranks' embeddings (any sizes, zero included) and labels;
2. all-reduce the target cosines (each row's owner knows its class) so that
   every rank computes the same margins and target logits;
3. run the fused kernel forward over the local (sampled) classes: a partial
   logsumexp per row; combine them with two all-reduces (MAX, then SUM);
4. backward: the kernel backward with the global lse gives dW for the local
   classes and this rank's share of dx_hat for every row; the shares are summed
   over ranks and each rank keeps its own rows.

Without an initialized process group the module is the one-rank case of the
same code.
"""
from __future__ import annotations

import math
import zlib
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _shard_io, backends
from ._checks import FUSED_DTYPES, bad_values, check_batch, check_subcenters, check_values
from ._loss_function import LossCall, MarginLoss
from ._state import EXTRA_STATE, check_loaded_layout, generators_kept_on_error, layout_state
from ._sharding import Group, Shard, class_split
from ._targets import geometry, prepare_targets, target_rows
from .functional import kernel_options, reduce_penalty
from .margins import NORM_EPS, CombinedMargin, Margin, StepBatch

__all__ = ["PartialFC", "class_split", "sample_count"]


def sample_count(num_local: int, sample_rate: float, global_batch: int, rounding: str = "ceil") -> int:
    """Classes a sampled step reads on a shard of ``num_local``: rate x num_local
    (rounded up, or down as insightface does), raised to min(num_local, global
    batch) so that every positive of the batch fits without counting them on the
    host. Where rate x num_local is at least the global batch (0.1 x 1M classes
    against a batch of thousands), this is exactly insightface's
    max(int(rate x num_local), positives)."""
    wanted = math.ceil(sample_rate * num_local) if rounding == "ceil" else int(sample_rate * num_local)
    return min(num_local, max(wanted, global_batch))


class PartialFC(nn.Module):
    """Margin-softmax classifier whose classes are sharded over a process group.

    Args:
        embedding_size: D.
        num_classes: C, over all ranks.
        margin: a margin spec (``ArcFace()``, ``CombinedMargin(...)``...).
        sample_rate: keep every positive class of the global batch and fill with
            uniformly drawn negatives up to ``sample_count(C_local, sample_rate,
            B_global)`` = max(ceil(sample_rate * C_local), min(C_local, B_global))
            classes per rank (``sample_rounding="floor"``: int() instead of ceil,
            insightface's count).
        options: how the fused kernels run (``margin_kernels.backends.KernelOptions``).
        process_group: the group the classes are sharded over (default: the
            default group when initialized, else a single process).
        dtype, device: of this rank's weight shard, initialized N(0, 0.01).
        backend: ``"auto"``, ``"cpp"`` or ``"triton"`` (a fused backend).
        generator: source of the weight's initialization, the negative samples
            and elastic margins (on rank 0, which broadcasts the margins); on the
            weight's device type, where everything is drawn.
        workspace_bytes: scratch budget of the fused kernels (a shorthand for
            ``options=KernelOptions(workspace_bytes=...)``).
        subcenters: K sub-centers per class (sub-center ArcFace): this rank's
            weight is [C_local * K, D], class c's sub-centers at rows c * K ...
            c * K + K - 1 (a class's sub-centers stay on one rank), and the
            full matrix of ``state_dict()`` / ``full_weight()`` is [C * K, D].

    ``forward(embeddings, labels)`` takes this rank's rows (any number, zero
    included) and returns the mean loss over the global batch, the same on every
    rank. With ``sample_rate < 1`` the sampled rows' gradient is added straight
    into ``weight.grad`` (created as zeros when None), so no second dense C x D
    gradient ever exists; unsampled rows get a zero gradient, as in insightface's
    PartialFC_V2, so an optimizer with momentum or weight decay still moves them.
    ``last_sampled_index`` holds the weight rows the last step used (K per
    sampled class with sub-centers), for a rows-only optimizer update. A NaN/Inf weight row raises (on every rank) in the step
    that reads it. (Gradient hooks registered on ``weight`` do not see these
    sampled-step gradients.)

    Checkpoints load at any world size. ``state_dict()`` holds the full [C, D]
    class matrix, gathered into host memory on every rank (a collective; each
    rank takes its own slice on load); ``full_weight()`` gathers it on one rank
    only, for export. At millions of classes use ``save_sharded(path,
    optimizer)`` / ``load_sharded``: one file per rank, resharded on load, with
    the weight's optimizer state, and no process ever holds the whole matrix.
    """

    last_sampled_index: Tensor | None

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin: Margin,
        *,
        sample_rate: float = 1.0,
        process_group: Any = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        backend: str = "auto",
        generator: torch.Generator | None = None,
        workspace_bytes: int | None = None,
        sample_rounding: Literal["ceil", "floor"] = "ceil",
        options: backends.KernelOptions | None = None,
        subcenters: int = 1,
    ) -> None:
        super().__init__()
        check_subcenters(subcenters)
        if sample_rounding not in ("ceil", "floor"):
            raise ValueError(f"sample_rounding must be 'ceil' or 'floor', got {sample_rounding!r}")
        if embedding_size < 1 or num_classes < 1:
            raise ValueError(f"embedding_size and num_classes must be >= 1, got {embedding_size} and {num_classes}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not isinstance(margin, Margin):
            raise TypeError(f"margin must be a margin_kernels margin spec, got {type(margin).__name__}")
        if dtype not in FUSED_DTYPES:
            raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        device = torch.device(device if device is not None else "cpu")
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator must be on the weight's device type ({device.type}): samples and margins are "
                             f"drawn there without a host round trip; got a generator on {generator.device}")
        self._group = Group(process_group)
        self._check_same_configuration(embedding_size, num_classes, margin, sample_rate, dtype, sample_rounding, device,
                                       subcenters)
        self.embedding_size, self.num_classes, self.margin = embedding_size, num_classes, margin
        self.subcenters = subcenters
        self.sample_rate, self.backend, self.generator = sample_rate, backend, generator
        self.sample_rounding = sample_rounding
        self.options = kernel_options(options, workspace_bytes)
        self.class_start, self.num_local = class_split(num_classes, self._group.size, self._group.rank)
        self.weight = nn.Parameter(torch.empty(self.num_local * subcenters, embedding_size, device=device)
                                   .normal_(0.0, 0.01, generator=generator).to(dtype))
        self.last_sampled_index = None
        # the margin's running state, from the global batch: the same on every rank
        for name, value in margin.initial_state(device=device).items():
            self.register_buffer(name, value)
        self.register_load_state_dict_pre_hook(_slice_full_weight)

    def _check_same_configuration(self, embedding_size, num_classes, margin, sample_rate, dtype, sample_rounding,
                                  device, subcenters) -> None:
        """Every rank must build the same module: a different embedding size
        aborted a rank inside the collectives, a different class count left
        classes that no rank owns, a different margin gave each rank another
        loss. One small all-gather at construction; raises on every rank."""
        if not self._group.distributed:
            return
        fields = {"embedding_size": embedding_size, "num_classes": num_classes, "margin": zlib.crc32(repr(margin).encode()),
                  "sample_rate": sample_rate, "dtype": zlib.crc32(str(dtype).encode()),
                  "sample_rounding": zlib.crc32(sample_rounding.encode()), "subcenters": subcenters}
        mine = torch.tensor([list(fields.values())], dtype=torch.float64, device=device)
        table = self._group.all_gather_rows(mine, [1] * self._group.size).tolist()
        differ = [name for i, name in enumerate(fields) if any(row[i] != table[0][i] for row in table)]
        if differ:
            ranks = [r for r, row in enumerate(table) if row != table[0]]
            raise ValueError(f"PartialFC: ranks disagree on {', '.join(differ)} (rank(s) {ranks} differ from rank 0; "
                             f"here: embedding_size={embedding_size}, num_classes={num_classes}, margin={margin}, "
                             f"sample_rate={sample_rate}, dtype={dtype}, sample_rounding={sample_rounding!r}, "
                             f"subcenters={subcenters})")

    # ------------------------------------------------------------------ insightface

    @classmethod
    def from_insightface(cls, margin_loss: Any, embedding_size: int, num_classes: int, sample_rate: float = 1.0,
                         fp16: bool = False, *, behaviour: Literal["current", "classic"] = "current",
                         **kwargs) -> "PartialFC":
        """The constructor of insightface's ``PartialFC_V2(margin_loss,
        embedding_size, num_classes, sample_rate, fp16)``.

        ``margin_loss`` is their ``CombinedMarginLoss`` (anything with ``s``,
        ``m1``, ``m2``, ``m3``) or one of our specs, used as it is. Their loss has
        two configurations, and so does the mapping:

        * ArcFace (m1 = 1, m3 = 0): ``behaviour="current"`` (the default)
          reproduces arcface_torch since December 2022, which applies the angle
          margin under ``no_grad`` (a straight-through gradient: slope 1) and
          has no rule for theta + m > pi: ``CombinedMargin(s, 1, m2, 0,
          overflow="none", detach_margin=True)``. ``behaviour="classic"``
          reproduces the version before it: the true gradient through arccos
          and the ``th`` / ``mm`` rule (``overflow="classic"``).
        * CosFace (m3 > 0): their loss applies m3 alone, ignoring m1 and m2:
          ``CombinedMargin(s, 1, 0, m3)`` in both behaviours.

        Other (m1, m3) raise, as theirs does. Negatives are sampled as theirs
        are: ``int(sample_rate * C_local)`` (floor) per rank, raised to the global
        batch as described in :func:`sample_count`. ``fp16`` needs no switch:
        the kernels accumulate in fp32 for every weight dtype.
        """
        if behaviour not in ("current", "classic"):
            raise ValueError(f"behaviour must be 'current' or 'classic', got {behaviour!r}")
        if isinstance(margin_loss, Margin):
            margin = margin_loss
        else:
            s, m1, m2, m3 = (float(getattr(margin_loss, name)) for name in ("s", "m1", "m2", "m3"))
            if m1 == 1.0 and m3 == 0.0:
                margin = (CombinedMargin(s, 1.0, m2, 0.0, overflow="none", detach_margin=True)
                          if behaviour == "current" else CombinedMargin(s, 1.0, m2, 0.0))
            elif m3 > 0:
                margin = CombinedMargin(s, 1.0, 0.0, m3)
            else:
                raise ValueError(f"insightface's CombinedMarginLoss takes m1 = 1 and m3 = 0 (ArcFace) or m3 > 0 "
                                 f"(CosFace), got m1={m1}, m3={m3}")
        kwargs.setdefault("sample_rounding", "floor")
        return cls(embedding_size, num_classes, margin, sample_rate=sample_rate, **kwargs)

    # ------------------------------------------------------------------ forward

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The mean loss over the global batch (the same on every rank). A step
        that raises (on every rank, as collectives do) changes nothing: the
        generator, the margin's state and ``last_sampled_index`` stay as they were."""
        sizes = self._checked_sizes(embeddings, labels)
        with generators_kept_on_error(self.generator):
            loss, state, class_index = self._step(embeddings, labels, sizes)
        with torch.no_grad():  # the margin's state after this batch, now that its loss exists
            for name, value in state.items():
                getattr(self, name).copy_(value)
        self.last_sampled_index = class_index
        return loss

    def _step(self, embeddings: Tensor, labels: Tensor, sizes: list[int]) -> tuple[Tensor, dict, Tensor | None]:
        """(loss, the margin's updated state by buffer name, the sampled index)."""
        group = self._group
        x = group.gather_rows_with_grad(embeddings, sizes)
        y = group.all_gather_rows(labels.long(), sizes)
        valid = y >= 0  # -1 and ignore_index-style negatives are ignored rows
        safe_y = torch.where(valid, y, torch.zeros_like(y))

        x_hat = F.normalize(x.float(), dim=1, eps=NORM_EPS)
        local = valid & (safe_y >= self.class_start) & (safe_y < self.class_start + self.num_local)
        rows_local = torch.where(local, safe_y - self.class_start, torch.full_like(y, -1))

        with torch.no_grad():
            # Each row's owner knows its target geometry (a gather of every row's
            # clamped class, masked: no host sync); cos and sin are summed over
            # ranks so that every rank computes the same margins and target logits.
            target_subcenter = None
            if self.num_local > 0:  # (with sub-centers the owner picks each row's nearest)
                w_rows, target_subcenter = target_rows(x, self.weight, rows_local.clamp_min(0), self.subcenters)
                geo = geometry(x, self.weight.index_select(0, w_rows), mask=rows_local >= 0)
            else:
                geo = geometry(x, torch.ones_like(x), mask=torch.zeros_like(valid))
            cos_sin = group.all_reduce(torch.stack([geo.cos, geo.sin]))
            geo = geo._replace(cos=cos_sin[0], sin=cos_sin[1])
        # The margin's step sees the whole global batch, so its state (updated in
        # training) is the same on every rank; its random draws are rank 0's.
        state = {name: getattr(self, name) for name in self.margin.state_names} or None
        batch = StepBatch(x, valid, geo.cos, geo.sin, self.generator, shared=group.broadcast)
        step = self.margin.step(batch, state, update=self.training)
        targets = prepare_targets(geo, step.margins, self.margin)

        class_index, labels_local = None, rows_local
        if self.sample_rate < 1.0:
            class_index, labels_local = self._sample(rows_local, sum(sizes))
            if self.subcenters > 1:  # each sampled class's rows
                class_index = (class_index[:, None] * self.subcenters
                               + torch.arange(self.subcenters, device=class_index.device)).flatten()
        call = LossCall(float(self.margin.s), backends.resolve(self.backend, x.device), self.options.resolved(),
                        self.subcenters, ignore_index=-1, group=group)
        row_scale = valid.float() / valid.sum().clamp_min(1)
        hard = None if step.hard is None else step.hard.packed()
        loss, _, _ = MarginLoss.apply(x_hat.contiguous(), self.weight, labels_local, *targets, row_scale, class_index,
                                      hard, target_subcenter, call)
        if step.penalty is not None:
            # A penalty over the global batch (the margin's extra term): every rank
            # computes the same value from the gathered rows; each passes 1/world
            # of its gradient, so the sum over ranks in the gather's backward counts it once.
            reg = reduce_penalty(step.penalty, valid, "mean")
            loss = loss + (reg / group.size + (reg - reg / group.size).detach()).to(loss.dtype)
        return loss, (dict(step.state) if self.training else {}), class_index

    def _checked_sizes(self, embeddings: Tensor, labels: Tensor) -> list[int]:
        """Validate this rank's input, agree on it with every rank (so a bad input
        raises everywhere instead of hanging the others), and gather batch sizes.

        The data checks (label range, NaN/Inf rows) are computed on the device and
        travel with the sizes in one all-gather, whose read is the step's only
        host sync before the loss; the message is built only when one fails."""
        problem = ""
        try:
            check_batch(embeddings, labels, dtypes=FUSED_DTYPES)
            if embeddings.shape[1] != self.embedding_size:
                raise ValueError(f"embeddings must be [B, {self.embedding_size}], got {tuple(embeddings.shape)}")
            if embeddings.device != self.weight.device or labels.device != self.weight.device:
                raise ValueError(f"embeddings and labels must be on the weight's device {self.weight.device}, got "
                                 f"{embeddings.device} and {labels.device}")
            if backends.resolve(self.backend, self.weight.device) == "reference":
                raise ValueError("PartialFC needs a fused backend ('cpp' on CPU, 'triton' on CUDA)")
        except (TypeError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        n = embeddings.shape[0] if isinstance(embeddings, Tensor) and embeddings.dim() >= 1 else 0
        status = torch.zeros(3, dtype=torch.long, device=self.weight.device)
        status[0] = n
        if problem:
            status[1] = 1
        else:  # weight: checked in the loss, from the row norms of the classes it reads
            status[2] = bad_values(embeddings, labels, ignore_index=-1, num_classes=self.num_classes).long()
        table = self._group.all_gather_rows(status[None], [1] * self._group.size).tolist()
        bad = [r for r, (_, wrong, bad_data) in enumerate(table) if wrong or bad_data]
        if bad:
            if not problem and table[self._group.rank][2]:
                try:  # this rank's data is bad: name the row
                    check_values(embeddings, None, labels, ignore_index=-1, num_classes=self.num_classes)
                except ValueError as exc:
                    problem = f"ValueError: {exc}"
            here = f" ({problem})" if problem else ""
            raise ValueError(f"PartialFC: invalid input on rank(s) {bad}{here}")
        return [row[0] for row in table]

    def _sample(self, rows_local: Tensor, global_batch: int) -> tuple[Tensor, Tensor]:
        """Every positive class of the global batch on this shard, plus uniform
        negatives; labels become positions in the sorted index. Drawn on the
        weight's device, with no host sync: the count is fixed in advance."""
        count = sample_count(self.num_local, self.sample_rate, global_batch, self.sample_rounding)
        positive = torch.zeros(self.num_local + 1, dtype=torch.bool, device=rows_local.device)
        positive[torch.where(rows_local >= 0, rows_local, self.num_local)] = True  # slot C_local: not a class
        score = torch.rand(self.num_local, generator=self.generator, device=rows_local.device)
        score = torch.where(positive[: self.num_local], 2.0, score)  # positives first, then the highest draws
        index = torch.topk(score, count, sorted=False).indices.sort().values
        labels_local = torch.where(rows_local >= 0, torch.searchsorted(index, rows_local.clamp_min(0)),
                                   torch.full_like(rows_local, -1))
        return index, labels_local

    # ------------------------------------------------------------------ checkpoints

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # A collective when distributed: every rank must call state_dict().
        if self._group.distributed:
            destination[prefix + "weight"] = _shard_io.gather_full(self.shard)
        else:
            destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        for name, buf in self._buffers.items():  # the margin's running state, equal on every rank
            if buf is not None:
                destination[prefix + name] = buf if keep_vars else buf.detach()
        destination[prefix + EXTRA_STATE] = self.get_extra_state()

    def get_extra_state(self) -> dict:
        """The layout a checkpoint must match: sub-centers, margin family, its state."""
        return layout_state(self.subcenters, self.margin, [name for name, _ in self.named_buffers(recurse=False)])

    def set_extra_state(self, state: dict) -> None:
        pass  # checked by _slice_full_weight before anything was copied

    @property
    def shard(self) -> Shard:
        """What this rank holds: its class block, weight and the margin's state."""
        return Shard(self._group, self.num_classes, self.embedding_size, self.subcenters, self.class_start,
                     self.num_local, self.weight, dict(self.named_buffers(recurse=False)), self.get_extra_state())

    def full_weight(self, dst: int = 0) -> Tensor | None:
        """The full [C, D] class matrix on rank ``dst`` (None elsewhere), in host
        memory, for export. A collective: every rank must call it."""
        if not self._group.distributed:
            return self.weight.detach().clone()
        return _shard_io.gather_full(self.shard, dst=dst)

    def save_sharded(self, path: str, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Write a checkpoint directory with one file per rank: this rank's
        classes and, if ``optimizer`` is given, the weight's optimizer state
        (momentum, Adam moments) for the same classes.

        Unlike ``state_dict()``, nothing holds the whole [C, D] matrix, so it
        scales to any class count; ``load_sharded`` reads it back at any world
        size. A collective; ``path`` must be on a file system every rank sees.
        """
        _shard_io.save_sharded(self.shard, path, optimizer)

    def load_sharded(self, path: str, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Load a ``save_sharded`` directory written at any world size: this rank
        memory-maps only the files that overlap its classes. With ``optimizer``,
        the weight's state there is replaced by the checkpoint's."""
        _shard_io.load_sharded(self.shard, path, optimizer)

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"classes [{self.class_start}, {self.class_start + self.num_local}) on rank {self._group.rank}/"
                f"{self._group.size}, sample_rate={self.sample_rate}, margin={self.margin}"
                + (f", subcenters={self.subcenters}" if self.subcenters > 1 else ""))


def _slice_full_weight(module: PartialFC, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: check the layout, then take this rank's slice
    of the full class matrix."""
    check_loaded_layout("PartialFC", module.get_extra_state(), state_dict, prefix)
    key = prefix + "weight"
    if key in state_dict:
        full = state_dict[key]
        k = module.subcenters
        if tuple(full.shape) != (module.num_classes * k, module.embedding_size):
            raise ValueError(f"{key}: expected the full class matrix [{module.num_classes * k}, "
                             f"{module.embedding_size}], got {tuple(full.shape)}")
        state_dict[key] = full[module.class_start * k : (module.class_start + module.num_local) * k]
