"""margin_cross_entropy(): validation, the margin's step, dispatch to a backend."""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends, reference
from ._checks import FUSED_DTYPES, check_args, check_margins, check_subcenters, check_values
from ._loss_function import LossCall, MarginLoss
from ._state import state_dtype
from ._targets import geometry, prepare_targets, target_rows
from .margins import NORM_EPS, Margin, MarginStep, RowMargins, StepBatch

__all__ = ["margin_cross_entropy", "draw_margins"]


def draw_margins(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: Margin,
    *,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
    subcenters: int = 1,
    state: Mapping[str, Tensor | float] | None = None,
) -> RowMargins:
    """The per-row (m1, m2, m3) that ``margin_cross_entropy`` would use for this batch.

    The margin's step sees the rows' target cosines, computed here from a
    gather of B weight rows (B x K with sub-centers), as margin_cross_entropy
    does; ``state`` is the margin's running state, for specs that keep one.
    """
    check_subcenters(subcenters, weight.shape[0])
    state = margin.check_state(state, embeddings.device, state_dtype(embeddings.dtype))
    valid = labels != ignore_index
    rows, _ = _target_rows(embeddings, weight, labels, valid, subcenters)
    geo = geometry(embeddings, weight.index_select(0, rows), mask=valid)
    return margin.step(StepBatch(embeddings, valid, geo.cos, geo.sin, generator), state).margins


def target_cosines(embeddings: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100,
                   subcenters: int = 1) -> Tensor:
    """cos(x_i, w_{y_i}) per row, from the same float64 geometry as the fused
    path, in float32 (float64 for float64 embeddings); 0 for ignored rows
    (labels are clamped into range, the loss itself rejects bad ones); with
    sub-centers, the nearest one's."""
    valid = labels != ignore_index
    return _target_cosines(embeddings, weight, labels, valid, subcenters).to(state_dtype(embeddings.dtype))


def _target_cosines(embeddings: Tensor, weight: Tensor, labels: Tensor, valid: Tensor, subcenters: int) -> Tensor:
    """target_cosines in float64 (what sorted elastic margins are ordered by:
    the same order for every input dtype)."""
    rows, _ = _target_rows(embeddings, weight, labels, valid, subcenters)
    return geometry(embeddings, weight.index_select(0, rows), mask=valid).cos


def _target_rows(embeddings: Tensor, weight: Tensor, labels: Tensor, valid: Tensor,
                 subcenters: int) -> tuple[Tensor, Tensor | None]:
    """``target_rows`` of the labels, ignored rows pointing at class 0."""
    classes = weight.shape[0] // subcenters
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long().clamp(0, classes - 1)
    return target_rows(embeddings, weight, safe_labels, subcenters)


def margin_cross_entropy(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: Margin,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    backend: str = "auto",
    generator: torch.Generator | None = None,
    return_lse: bool = False,
    workspace_bytes: int | None = None,
    margins: RowMargins | None = None,
    options: backends.KernelOptions | None = None,
    state: Mapping[str, Tensor | float] | None = None,
    subcenters: int = 1,
) -> Tensor | tuple[Tensor, Tensor]:
    """Margin-softmax cross-entropy of ``embeddings`` against class ``weight``.

    Computes, for x_hat and w_hat the L2-normalized rows,
    ``loss_i = logsumexp_j z_ij - z_iy`` with ``z_ij = s cos(x_i, w_j)`` and the
    target logit ``z_iy = s (cos(m1 theta + m2) - m3)`` (docs/DESIGN.md §1), the
    margin's hard negatives reweighted and its penalty added. Fused backends
    never hold the B x C logits.

    Args:
        embeddings: [B, D] float32, bfloat16 or float16 (float64: reference only).
        weight: [C, D] class weights of the same dtype and device; not normalized.
            With ``subcenters=K``: [C * K, D], class c's sub-centers at rows
            c * K ... c * K + K - 1.
        labels: [B] integer class indices in [0, C), or ``ignore_index``.
        margin: a margin spec: ``ArcFace()``, ``CosFace()``, ``CombinedMargin()``...
        reduction: ``"mean"`` (over rows not ignored; 0 when all are), ``"sum"`` or ``"none"``.
        ignore_index: label value whose rows contribute nothing.
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"``.
        generator: source of elastic margin draws, for reproducible steps.
        return_lse: also return the per-row logsumexp (detached).
        workspace_bytes: scratch budget of the fused sweep in bytes (default:
            ``$MARGIN_KERNELS_WORKSPACE_MB`` MiB, else 64 MiB); a shorthand for
            ``options=KernelOptions(workspace_bytes=...)``.
        margins: per-row (m1, m2, m3) to use instead of the margin's (e.g. the
            ``last_margins`` of a head, to replay a step). The margin's penalty
            term (``MarginStep.penalty``), if it has one, is then the caller's to add.
        options: how the fused kernels run (:class:`margin_kernels.backends.KernelOptions`:
            workspace, the Triton backward, TF32, the single pass); defaults
            read from the environment at call time.
        state: the margin's running state by name, for specs that keep one
            (the names of ``margin.state_names``; ``margin.initial_state()`` at the start of
            training). Used as given: the caller updates it, as the heads in
            :mod:`margin_kernels.nn` do.
        subcenters: sub-center ArcFace's K (Deng et al., ECCV 2020): each
            class's cosine is the max over its K sub-centers, its gradient goes
            to the arg-max one; combines with every margin. The fused kernels
            take the max inside each class block (no B x C x K tensor).

    Returns:
        The loss (a scalar, or [B] for ``reduction="none"``) in float32, and the
        [B] logsumexp if ``return_lse``.
    """
    loss, lse, _ = margin_loss_step(embeddings, weight, labels, margin, reduction=reduction,
                                    ignore_index=ignore_index, backend=backend, generator=generator,
                                    workspace_bytes=workspace_bytes, margins=margins, options=options, state=state,
                                    subcenters=subcenters)
    return (loss, lse) if return_lse else loss


def margin_loss_step(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: Margin,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    backend: str = "auto",
    generator: torch.Generator | None = None,
    workspace_bytes: int | None = None,
    margins: RowMargins | None = None,
    options: backends.KernelOptions | None = None,
    state: Mapping[str, Tensor | float] | None = None,
    subcenters: int = 1,
    update: bool = False,
    own_step: bool = False,
) -> tuple[Tensor, Tensor, MarginStep | None]:
    """(loss, lse, the margin's step) of ``margin_cross_entropy``; with
    ``update`` the step updates the margin's state from the batch first (the
    heads in training), and its ``state`` is what the caller commits. The
    reference backend judges on its own (no step, None) unless ``own_step``:
    the heads need the step's margins and state whatever the backend."""
    check_args(embeddings, weight, labels, margin, reduction)
    check_subcenters(subcenters, weight.shape[0])
    options = kernel_options(options, workspace_bytes)
    name = backends.resolve(backend, embeddings.device)
    if name != "reference" and embeddings.dtype not in FUSED_DTYPES:
        raise TypeError(f"backend={name!r} takes float32, bfloat16 or float16 inputs, got {embeddings.dtype}")
    compiling = torch.compiler.is_compiling()
    if not compiling:  # the fused paths check weight from its row norms
        check_values(embeddings, weight if name == "reference" else None, labels, ignore_index,
                     num_classes=weight.shape[0] // subcenters)
    state = margin.check_state(state, embeddings.device, state_dtype(embeddings.dtype))
    if margins is not None:
        margins = check_margins(margins, labels.shape[0], embeddings.device)

    if name == "reference" and not (own_step or update):  # the oracle: from the raw inputs and the spec's numbers
        loss, lse = reference.margin_cross_entropy(
            embeddings, weight, labels, margin, reduction=reduction, ignore_index=ignore_index, margins=margins,
            generator=generator, state=state, subcenters=subcenters,
        )
        return loss, lse, None

    valid = labels != ignore_index
    w_rows, target_subcenter = _target_rows(embeddings, weight, labels, valid, subcenters)
    geo = geometry(embeddings, weight.index_select(0, w_rows), mask=valid)
    step = margin.step(StepBatch(embeddings, valid, geo.cos, geo.sin, generator), state, update=update,
                       margins=margins)
    if name == "reference":  # the step's margins and state, the rest the oracle's own
        loss, lse = reference.margin_cross_entropy(
            embeddings, weight, labels, margin, reduction=reduction, ignore_index=ignore_index,
            margins=step.margins, state=dict(step.state) or None, subcenters=subcenters,
        )
    else:
        loss, lse = _fused_loss(name, embeddings, weight, labels, valid, geo, step, margin, target_subcenter,
                                reduction=reduction, ignore_index=ignore_index, subcenters=subcenters,
                                options=options.resolved(), compiling=compiling)
    if step.penalty is not None and margins is None:
        loss = loss + reduce_penalty(step.penalty, valid, reduction).to(loss.dtype)
    return loss, lse, step


def _fused_loss(name, embeddings, weight, labels, valid, geo, step, margin, target_subcenter, *, reduction,
                ignore_index, subcenters, options, compiling) -> tuple[Tensor, Tensor]:
    x_hat = F.normalize(embeddings.float(), dim=1, eps=NORM_EPS).contiguous()
    targets = prepare_targets(geo, step.margins, margin)
    hard = None if step.hard is None else step.hard.packed()
    row_scale = valid.float()
    if reduction == "mean":
        row_scale = row_scale / valid.sum().clamp_min(1)
    call = LossCall(float(margin.s), name, options, subcenters, int(ignore_index), reduce=reduction != "none",
                    single_pass=_use_single_pass(name, weight, reduction, compiling, labels.shape[0], options),
                    check=compiling)
    args = (x_hat, weight.contiguous(), labels, *targets, row_scale, None, hard, target_subcenter)
    if compiling:
        loss, lse, _ = torch.ops.margin_kernels.margin_loss(*args, call.encode())
    else:
        loss, lse, _ = MarginLoss.apply(*args, call)
    return loss, lse


def reduce_penalty(penalty: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """A per-row penalty over the valid rows, reduced as the loss is."""
    return reference.reduce_rows(torch.where(valid, penalty, torch.zeros_like(penalty)), valid, reduction)


def kernel_options(options: backends.KernelOptions | None, workspace_bytes: int | None) -> backends.KernelOptions:
    """The options of a call: ``options``, with the ``workspace_bytes`` shorthand
    in (KernelOptions validates it)."""
    if options is None:
        return backends.KernelOptions(workspace_bytes=workspace_bytes)
    if not isinstance(options, backends.KernelOptions):
        raise TypeError(f"options must be a margin_kernels.backends.KernelOptions, got {type(options).__name__}")
    if workspace_bytes is not None:
        if options.workspace_bytes not in (None, workspace_bytes):
            raise ValueError(f"workspace_bytes={workspace_bytes} disagrees with options.workspace_bytes="
                             f"{options.workspace_bytes}; pass one of them")
        return replace(options, workspace_bytes=workspace_bytes)
    return options


def _use_single_pass(name: str, weight: Tensor, reduction: str, compiling: bool, batch: int, options) -> bool:
    """The backend's single-pass shortcut: eager, reduced, weight gradient
    wanted, a backend that has it, and ``options.single_pass`` (None: where the
    backend finds it faster at this size)."""
    if compiling:
        return False
    kernels = backends.load(name)
    applies = (
        reduction in ("mean", "sum")
        and torch.is_grad_enabled()
        and weight.requires_grad
        and weight.is_contiguous()
        and kernels.has_single_pass(weight)
    )
    if not applies or options.single_pass is False:
        return False
    return options.single_pass or kernels.prefers_single_pass(weight, batch, options)
