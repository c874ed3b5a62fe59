"""margin_cross_entropy(): validation, dispatch to a backend, autograd."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends, reference
from ._checks import FUSED_DTYPES, check_args, check_margins, check_subcenters, check_values
from ._ops import _labels_local  # also registers the margin_kernels:: custom ops
from ._shard_loss import SinglePassLoss
from ._targets import geometry, prepare_targets, target_rows
from ._state import state_dtype
from .margins import NORM_EPS, CurricularFace, Margin, RowMargins

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
) -> RowMargins:
    """The per-row (m1, m2, m3) that ``margin_cross_entropy`` would use for this batch.

    Sorted elastic margins need the rows' target cosines; they are computed
    here from a gather of B weight rows (B x K with sub-centers), as
    margin_cross_entropy does.
    """
    check_subcenters(subcenters, weight.shape[0])
    valid = labels != ignore_index
    cos_y = _target_cosines(embeddings, weight, labels, valid, subcenters) if margin.needs_target_cosine else None
    return margin.row_margins(labels.shape[0], device=embeddings.device, cos_target=cos_y, valid=valid,
                              generator=generator, dtype=state_dtype(embeddings.dtype))


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
    curriculum_t: Tensor | float | None = None,
    subcenters: int = 1,
) -> Tensor | tuple[Tensor, Tensor]:
    """Margin-softmax cross-entropy of ``embeddings`` against class ``weight``.

    Computes, for x_hat and w_hat the L2-normalized rows,
    ``loss_i = logsumexp_j z_ij - z_iy`` with ``z_ij = s cos(x_i, w_j)`` and the
    target logit ``z_iy = s (cos(m1 theta + m2) - m3)`` (docs/DESIGN.md §1). Fused
    backends never hold the B x C logits.

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
        margins: per-row (m1, m2, m3) to use instead of drawing them from
            ``margin`` (e.g. the ``last_margins`` of an elastic module, to replay a step).
        options: how the fused kernels run (:class:`margin_kernels.backends.KernelOptions`:
            workspace, the Triton backward, TF32); defaults read from the
            environment at call time.
        curriculum_t: CurricularFace's t for this step (required with a
            ``CurricularFace`` margin, and only there); used as given, the
            caller updates it (:class:`margin_kernels.nn.CurricularFace` does).
        subcenters: sub-center ArcFace's K (Deng et al., ECCV 2020): each
            class's cosine is the max over its K sub-centers, its gradient goes
            to the arg-max one; combines with every margin. The fused kernels
            take the max inside each class block (no B x C x K tensor).

    Returns:
        The loss (a scalar, or [B] for ``reduction="none"``) in float32, and the
        [B] logsumexp if ``return_lse``.
    """
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
    curriculum_t = _check_curriculum_t(margin, curriculum_t, embeddings.device)
    if margins is not None:
        margins = check_margins(margins, labels.shape[0], embeddings.device)

    if name == "reference":  # the oracle: from the raw inputs and the spec's numbers, on its own
        loss, lse = reference.margin_cross_entropy(
            embeddings, weight, labels, margin, reduction=reduction, ignore_index=ignore_index, margins=margins,
            generator=generator, curriculum_t=curriculum_t, subcenters=subcenters,
        )
        return (loss, lse) if return_lse else loss

    valid = labels != ignore_index
    w_rows, target_subcenter = _target_rows(embeddings, weight, labels, valid, subcenters)
    geo = geometry(embeddings, weight.index_select(0, w_rows))
    hard = None if curriculum_t is None else margin.hard_rule(geo.cos, geo.sin, curriculum_t, valid).float()
    x_hat = F.normalize(embeddings.float(), dim=1, eps=NORM_EPS)
    if margins is None:  # as draw_margins, reusing the target cosines computed here
        margins = margin.row_margins(labels.shape[0], device=embeddings.device, cos_target=geo.cos,
                                     valid=valid, generator=generator)
    targets = prepare_targets(geo, margins, margin)
    kernels = backends.load(name)
    options = options.resolved()

    if _can_fuse(kernels, weight, reduction, compiling, labels.shape[0], options):
        labels_local = _labels_local(labels, ignore_index)
        row_scale = valid.float()
        if reduction == "mean":
            row_scale = row_scale / valid.sum().clamp_min(1)
        loss, lse = SinglePassLoss.apply(
            x_hat.contiguous(), weight, labels_local, *targets, row_scale, hard, target_subcenter, subcenters,
            margin.s, kernels, options
        )
    else:
        rows, lse, _ = torch.ops.margin_kernels.margin_ce_rows(
            x_hat.contiguous(), weight.contiguous(), labels, targets.logit, targets.grad_x, targets.grad_w, hard,
            target_subcenter, subcenters, float(margin.s), int(ignore_index), name, options.workspace_bytes, options.triton_backward, options.tf32,
            compiling,
        )
        loss = reference.reduce_rows(rows, valid, reduction)
    return (loss, lse) if return_lse else loss


def _check_curriculum_t(margin: Margin, t: Tensor | float | None, device: torch.device) -> Tensor | None:
    """CurricularFace's t as a float64 0-d tensor on ``device``; None elsewhere."""
    if not isinstance(margin, CurricularFace):
        if t is not None:
            raise ValueError(f"curriculum_t is CurricularFace's; got it with {type(margin).__name__}")
        return None
    if t is None:
        raise ValueError("CurricularFace needs its running t: use margin_kernels.nn.CurricularFace (which keeps it), "
                         "or pass curriculum_t= (0.0 at the start of training)")
    if isinstance(t, bool) or not isinstance(t, (int, float, Tensor)):
        raise TypeError(f"curriculum_t must be a float or a 0-d tensor, got {type(t).__name__}")
    t = torch.as_tensor(t, dtype=torch.float64)
    if t.numel() != 1:
        raise ValueError(f"curriculum_t must be a scalar, got shape {tuple(t.shape)}")
    # A running mean of cosines. (A CUDA tensor is not read back: that would
    # cost a host sync per step.)
    if t.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(t.abs() <= 1):
        raise ValueError(f"curriculum_t must be finite and in [-1, 1] (a running mean of target cosines), got {t.item()}")
    return t.reshape(()).to(device)


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


def _can_fuse(kernels, weight: Tensor, reduction: str, compiling: bool, batch: int, options) -> bool:
    """The row-chunked single-pass shortcut: eager, reduced, weight gradient
    wanted, a backend that has it, and ``options.single_pass`` (None: where the
    backend finds it faster at this size)."""
    applies = (
        not compiling
        and reduction in ("mean", "sum")
        and torch.is_grad_enabled()
        and weight.requires_grad
        and weight.is_contiguous()
        and kernels.supports_fused(weight)
    )
    if not applies or options.single_pass is False:
        return False
    return options.single_pass or kernels.prefers_fused(weight, batch, options)

