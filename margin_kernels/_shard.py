"""The loss over one class shard, forward and backward, on top of the kernel
interface: the one place that calls the backends' class-blocked passes. The
single-process loss is the one-shard case (no group); PartialFC passes its
process group, and the partial logsumexps of the shards combine across ranks
here. ``_loss_function`` puts autograd on these functions.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import bad_norm_rows, check_weight_norms, describe_bad_row, first_bad_weight_row
from ._sharding import Group
from ._targets import Targets, add_target_gradients, target_share


def shard_forward(kernels, x_hat: Tensor, weight: Tensor, labels_local: Tensor, targets: Targets, *, scale: float,
                  options, class_index: Tensor | None = None, hard: Tensor | None = None, subcenters: int = 1,
                  group: Group | None = None) -> tuple[Tensor, Tensor]:
    """(logsumexp per row over every shard's classes, 1/||w_j|| of this shard's
    rows). ``hard``: the hard-negative rule, [4, B] (``HardNegatives.packed``),
    or None; ``subcenters``: weight rows per class.

    Without ``group`` a bad weight row raises here; with one, each rank's flag
    travels in the SUM all-reduce of the logsumexp, so a bad shard raises on
    every rank instead of hanging the others."""
    w_inv = kernels.row_inv_norms(weight, class_index=class_index)
    if group is None:
        check_weight_norms(w_inv, weight, class_index)
    lse = kernels.lse_forward(x_hat, weight, w_inv, labels_local, targets.logit, scale=scale, options=options,
                              class_index=class_index, hard=hard, subcenters=subcenters)
    if group is None:
        return lse, w_inv
    row_max = group.all_reduce(lse.clone(), "max")
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    flags = torch.zeros(group.size, device=lse.device)
    flags[group.rank] = bad_norm_rows(w_inv).any().float()
    summed = group.all_reduce(torch.cat([torch.exp(lse - row_max), flags]))
    total, flags = summed[: lse.shape[0]], summed[lse.shape[0] :]
    if bool(flags.any()):  # the step's second host sync, after the collective that carries it
        _raise_bad_weight(weight, w_inv, class_index, flags)
    return row_max + total.log(), w_inv


def shard_backward(kernels, x_hat: Tensor, weight: Tensor, w_inv: Tensor, labels_local: Tensor, targets: Targets,
                   lse: Tensor, grad_rows: Tensor, *, scale: float, options, class_index: Tensor | None = None,
                   hard: Tensor | None = None, subcenters: int = 1, target_subcenter: Tensor | None = None,
                   weight_grad: bool = True) -> tuple[Tensor, Tensor | None, Tensor]:
    """(d/dx_hat, d/dW of this shard (None without ``weight_grad``), d/d(target
    logit) of the rows whose target is here) for per-row upstream gradients
    ``grad_rows`` (zero for ignored rows). The kernels leave
    the target columns out; their exact gradient comes from ``_targets`` (to the
    sub-center ``target_subcenter`` of each row's class, with sub-centers): the
    dW share goes into the kernels' float32 blocks, the dx share is added here."""
    share = target_share(targets, labels_local, lse, grad_rows, w_inv, subcenters, target_subcenter, weight_grad)
    dx_hat, dw = kernels.lse_backward(
        x_hat, weight, w_inv, labels_local, lse, grad_rows, scale=scale, options=options, class_index=class_index,
        hard=hard, subcenters=subcenters, weight_grad=weight_grad,
        target_rows=None if share.dw is None else share.rows, target_dw=share.dw,
    )
    add_target_gradients(dx_hat, None, targets, share)
    return dx_hat, dw, share.d_logit


def _raise_bad_weight(weight: Tensor, w_inv: Tensor, class_index: Tensor | None, flags: Tensor) -> None:
    ranks = flags.nonzero().flatten().tolist()
    row = first_bad_weight_row(w_inv, class_index)
    here = "" if row is None else f"; here: local {describe_bad_row('weight', weight, row)}"
    raise ValueError(f"PartialFC: bad weight rows (NaN/Inf, overflowing or zero norms) on rank(s) {ranks}{here}")
