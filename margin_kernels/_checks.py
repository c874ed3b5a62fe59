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

from .margins import NORM_EPS, Margin, RowMargins

REDUCTIONS = ("mean", "sum", "none")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT_DTYPES = FUSED_DTYPES + (torch.float64,)


def _tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_batch(embeddings: object, labels: object, *, dtypes: tuple = FLOAT_DTYPES) -> None:
    """The batch alone: tensors, [B, D] embeddings of a float dtype with D >= 1,
    [B] integer labels. Shared by margin_cross_entropy and PartialFC."""
    _tensor("embeddings", embeddings)
    _tensor("labels", labels)
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be 2-D [B, D], got shape {tuple(embeddings.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D [B], got shape {tuple(labels.shape)}")
    if embeddings.dtype not in dtypes:
        names = [str(d).replace("torch.", "") for d in dtypes]
        raise TypeError(f"embeddings must be {', '.join(names[:-1])} or {names[-1]}, got {embeddings.dtype}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if embeddings.shape[1] == 0:
        raise ValueError("embeddings must have D >= 1 features, got D = 0")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} rows but embeddings have B = {embeddings.shape[0]}")


def check_subcenters(subcenters: object, weight_rows: int | None = None) -> None:
    """Sub-centers per class: an int >= 1 that divides the weight's rows."""
    if isinstance(subcenters, bool) or not isinstance(subcenters, int):
        raise TypeError(f"subcenters must be an int >= 1, got {subcenters!r}")
    if subcenters < 1:
        raise ValueError(f"subcenters must be >= 1, got {subcenters}")
    if weight_rows is not None and weight_rows % subcenters:
        raise ValueError(f"weight has {weight_rows} rows, not a multiple of subcenters={subcenters} (a sub-center "
                         "weight is [C * subcenters, D], class c's sub-centers at rows c * subcenters ...)")


def check_args(embeddings: Tensor, weight: Tensor, labels: Tensor, margin: Margin, reduction: str) -> None:
    """Types, shapes, dtypes and devices (free, and traceable by torch.compile)."""
    _tensor("embeddings", embeddings)
    _tensor("weight", weight)
    _tensor("labels", labels)
    if not isinstance(margin, Margin):
        raise TypeError(f"margin must be a margin_kernels margin spec (e.g. ArcFace()), got {type(margin).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [C, D], got shape {tuple(weight.shape)}")
    check_batch(embeddings, labels)
    if weight.dtype != embeddings.dtype:
        raise TypeError(
            f"weight dtype {weight.dtype} does not match embeddings dtype {embeddings.dtype}; cast one of them"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one class (C >= 1), got C = 0")
    if weight.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"weight has D = {weight.shape[1]} but embeddings have D = {embeddings.shape[1]} (shapes "
            f"{tuple(weight.shape)} and {tuple(embeddings.shape)})"
        )
    if not (embeddings.device == weight.device == labels.device):
        raise ValueError(
            f"embeddings, weight and labels must be on one device, got {embeddings.device}, "
            f"{weight.device} and {labels.device}"
        )


def check_margins(margins: object, batch: int, device: torch.device) -> RowMargins:
    """Per-row margins given by the caller: a RowMargins (or 3-tuple) of 1-D
    floating tensors of length B on the embeddings' device, finite; returned as
    float32 RowMargins."""
    if not isinstance(margins, tuple) or len(margins) != 3:
        raise TypeError(f"margins must be a RowMargins (m1, m2, m3) of [B] tensors, got {type(margins).__name__}")
    out = []
    for name, m in zip(("m1", "m2", "m3"), margins):
        if not isinstance(m, Tensor):
            raise TypeError(f"margins.{name} must be a torch.Tensor, got {type(m).__name__}")
        if m.dim() != 1 or m.shape[0] != batch:
            raise ValueError(f"margins.{name} must have shape [B] = [{batch}], got {tuple(m.shape)}")
        if not m.dtype.is_floating_point:
            raise TypeError(f"margins.{name} must be a floating tensor, got {m.dtype}")
        if m.device != device:
            raise ValueError(f"margins.{name} must be on the embeddings' device {device}, got {m.device}")
        if device.type != "meta" and not torch.compiler.is_compiling() and not bool(torch.isfinite(m).all()):
            raise ValueError(f"margins.{name} contains NaN or Inf")
        out.append(m if m.dtype == torch.float64 else m.float())
    return RowMargins(*out)


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
    if embeddings.device.type == "meta":  # no data to read: shapes only
        return
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


def bad_values(embeddings: Tensor, labels: Tensor, ignore_index: int, *, num_classes: int) -> Tensor:
    """check_values' verdict on labels and embeddings as a device flag (no host
    sync), for callers that read it together with other data; True when
    check_values would raise."""
    bad_label = ((labels != ignore_index) & ((labels < 0) | (labels >= num_classes))).any()
    if embeddings.numel() == 0:
        return bad_label
    norms = torch.linalg.vector_norm(embeddings, dim=1, dtype=None if embeddings.dtype == torch.float64 else torch.float32)
    return bad_label | ~(torch.isfinite(norms) & (norms > NORM_EPS)).all()


def _check_row_norms(name: str, t: Tensor) -> None:
    """A row norm is NaN or Inf exactly when the row holds a NaN or Inf or its
    squares overflow; both would normalize to garbage. Costs one read of t and
    B (or C) floats: no mask as large as t."""
    if t.numel() == 0:
        return
    norms = torch.linalg.vector_norm(t, dim=1, dtype=None if t.dtype == torch.float64 else torch.float32)
    bad = ~torch.isfinite(norms) | (norms <= NORM_EPS)
    if bool(bad.any()):
        raise ValueError(describe_bad_row(name, t, int(bad.nonzero()[0, 0])))


def bad_norm_rows(w_inv: Tensor) -> Tensor:
    """Flags of the rows whose 1/max(||w_j||, eps) betrays a bad row: NaN (a NaN
    in the row), 0 (an Inf, or squares that overflow) or 1/eps (a zero row,
    whose direction, and so its cosine and gradient, is undefined). Good rows
    have w_inv in (0, 1/eps)."""
    return ~((w_inv > 0) & (w_inv < 1.0 / NORM_EPS))


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
    t = t.detach()
    if not bool(torch.isfinite(t[row]).all()):
        return f"{name} row {row} contains NaN or Inf"
    if float(torch.linalg.vector_norm(t[row].double())) <= NORM_EPS:
        return (f"{name} row {row} is zero (norm <= {NORM_EPS:g}): its direction, cosine and gradient are "
                "undefined" + ("; initialise class weights randomly, not with zeros" if name == "weight" else ""))
    return f"{name} row {row} has a norm beyond the float32 range (its squares overflow)"
