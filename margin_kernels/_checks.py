"""Argument validation shared by the functional API, the modules and PartialFC.

``check_args`` looks only at types, shapes, dtypes and devices (free, and
traceable by torch.compile); ``check_values`` reads the data (label range,
NaN/Inf) and therefore synchronizes with the device. The weight, by far the
largest input, is checked from the row norms the fused paths compute anyway
(``check_weight_norms``) instead of by a pass of its own.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .margins import Margin

REDUCTIONS = ("mean", "sum", "none")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT_DTYPES = FUSED_DTYPES + (torch.float64,)


def _tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_args(embeddings: Tensor, weight: Tensor, labels: Tensor, margin: Margin, reduction: str) -> None:
    _tensor("embeddings", embeddings)
    _tensor("weight", weight)
    _tensor("labels", labels)
    if not isinstance(margin, Margin):
        raise TypeError(f"margin must be a margin_kernels margin spec (e.g. ArcFace()), got {type(margin).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be 2-D [B, D], got shape {tuple(embeddings.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [C, D], got shape {tuple(weight.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D [B], got shape {tuple(labels.shape)}")
    if embeddings.dtype not in FLOAT_DTYPES:
        raise TypeError(f"embeddings must be float32, bfloat16, float16 or float64, got {embeddings.dtype}")
    if weight.dtype != embeddings.dtype:
        raise TypeError(
            f"weight dtype {weight.dtype} does not match embeddings dtype {embeddings.dtype}; cast one of them"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one class (C >= 1), got C = 0")
    if weight.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"weight has D = {weight.shape[1]} but embeddings have D = {embeddings.shape[1]} (shapes "
            f"{tuple(weight.shape)} and {tuple(embeddings.shape)})"
        )
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} rows but embeddings have B = {embeddings.shape[0]}")
    if not (embeddings.device == weight.device == labels.device):
        raise ValueError(
            f"embeddings, weight and labels must be on one device, got {embeddings.device}, "
            f"{weight.device} and {labels.device}"
        )


def check_values(
    embeddings: Tensor, weight: Tensor | None, labels: Tensor, ignore_index: int, *, num_classes: int | None = None
) -> None:
    """Labels in [0, num_classes) or == ignore_index; every row of embeddings and
    weight finite with a norm inside float32's range.

    ``num_classes`` defaults to weight's row count (PartialFC passes the global
    one). ``weight=None`` skips the weight: the fused paths check it from the row
    norms they compute anyway (``check_weight_norms``), saving a pass over C x D.
    """
    if num_classes is None:
        if weight is None:
            raise TypeError("check_values: pass num_classes when weight is None")
        num_classes = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels must be in [0, {num_classes}) or equal ignore_index={ignore_index}; "
            f"row {row} has label {int(labels[row])}"
        )
    _check_row_norms("embeddings", embeddings)
    if weight is not None:
        _check_row_norms("weight", weight)


def _check_row_norms(name: str, t: Tensor) -> None:
    """A row norm is NaN or Inf exactly when the row holds a NaN or Inf or its
    squares overflow; both would normalize to garbage. Costs one read of t and
    B (or C) floats: no mask as large as t."""
    if t.numel() == 0:
        return
    norms = torch.linalg.vector_norm(t, dim=1, dtype=None if t.dtype == torch.float64 else torch.float32)
    bad = ~torch.isfinite(norms)
    if bool(bad.any()):
        raise ValueError(describe_bad_row(name, t, int(bad.nonzero()[0, 0])))


def bad_norm_rows(w_inv: Tensor) -> Tensor:
    """Flags of the rows whose 1/max(||w_j||, eps) betrays a bad row: NaN (a NaN
    in the row) or 0 (an Inf, or squares that overflow). Good rows have w_inv in
    (0, 1/eps]."""
    return ~(w_inv > 0)


def first_bad_weight_row(w_inv: Tensor, class_index: Tensor | None = None) -> int | None:
    """The weight row of the first bad norm (mapped through ``class_index``), or None."""
    bad = bad_norm_rows(w_inv)
    if not bool(bad.any()):
        return None
    position = int(bad.nonzero()[0, 0])
    return position if class_index is None else int(class_index[position])


def check_weight_norms(w_inv: Tensor, weight: Tensor, class_index: Tensor | None = None) -> None:
    """check_values' weight check, from the row norms a fused backend computed
    (of the rows ``class_index`` selects, when given)."""
    row = first_bad_weight_row(w_inv, class_index)
    if row is not None:
        raise ValueError(describe_bad_row("weight", weight, row))


def describe_bad_row(name: str, t: Tensor, row: int) -> str:
    if bool(torch.isfinite(t[row]).all()):
        return f"{name} row {row} has a norm beyond the float32 range (its squares overflow)"
    return f"{name} row {row} contains NaN or Inf"
