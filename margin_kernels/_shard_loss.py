"""The loss over one class shard, forward and backward, on top of the kernel
interface: the one place that calls the backends. The single-process loss is
the one-shard case (no group); PartialFC passes its process group, and the
partial logsumexps of the shards combine across ranks here.

Three autograd entry points sit on these functions: the custom op of
``_ops.py`` (per-row losses, traced by torch.compile), ``SinglePassLoss`` (the
backends' one-sweep shortcut, a choice of ``functional``), and ``ShardedLoss``
(PartialFC).
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
    rows). ``hard``: CurricularFace's [2, B] (thresholds, t), or None;
    ``subcenters``: weight rows per class.

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


class SinglePassLoss(torch.autograd.Function):
    """The single-shard shortcut: forward computes the reduced loss and both
    gradients in one row-chunked sweep (three GEMMs); backward only scales them
    by the upstream gradient, in place, so no second C x D tensor appears.

    Eager only (functional.py never uses it under torch.compile). Its backward
    is not differentiable (the gradients are constants of the forward): a
    double backward (create_graph=True) raises instead of returning a wrong
    second derivative (``once_differentiable`` would not: the upstream gradient
    of a loss needs no grad, so it treats the result as a constant).
    """

    @staticmethod
    def forward(ctx, x_hat, weight, labels_local, target_logit, target_grad_x, target_grad_w, row_scale, hard,
                target_subcenter, subcenters, scale, kernels, options):
        targets = Targets(target_logit, target_grad_x, target_grad_w)
        w_inv = kernels.row_inv_norms(weight)
        check_weight_norms(w_inv, weight)
        lse, dx_hat, dw = kernels.fused_forward_backward(
            x_hat, weight, w_inv, labels_local, targets.logit, row_scale, scale=scale, options=options, hard=hard,
            subcenters=subcenters,
        )
        share = target_share(targets, labels_local, lse, row_scale, w_inv, subcenters, target_subcenter)
        add_target_gradients(dx_hat, dw, targets, share)  # (float32 dW: no second rounding)
        loss = (row_scale * (lse - targets.logit)).sum()
        d_logit = share.d_logit
        ctx.save_for_backward(dx_hat, dw, d_logit)
        ctx.consumed = False
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        if torch.is_grad_enabled():  # create_graph=True: the gradients are constants here, a 2nd derivative would be wrong
            raise RuntimeError(
                "margin_cross_entropy: double backward (create_graph=True) through a fused backend (its single-pass "
                "path) is not supported. Use backend='reference' for higher-order gradients."
            )
        if ctx.consumed:
            raise RuntimeError(
                "margin_cross_entropy: a second backward through the fused single-pass path "
                "(retain_graph=True) is not supported; its gradients were scaled in place. "
                "Pass reduction='none' and reduce yourself to backpropagate twice."
            )
        ctx.consumed = True
        dx_hat, dw, d_logit = ctx.saved_tensors
        return (dx_hat.mul_(grad_loss), dw.mul_(grad_loss), None, d_logit * grad_loss) + (None,) * 9


class ShardedLoss(torch.autograd.Function):
    """PartialFC's loss: the mean over the global batch's valid rows, from this
    rank's (sampled) classes; every rank returns the same value."""

    @staticmethod
    def forward(ctx, x_hat, weight, labels_local, target_logit, target_grad_x, target_grad_w, valid, class_index, hard,
                target_subcenter, subcenters, scale, kernels, group, options):
        targets = Targets(target_logit, target_grad_x, target_grad_w)
        lse, w_inv = shard_forward(kernels, x_hat, weight, labels_local, targets, scale=scale, options=options,
                                   class_index=class_index, hard=hard, subcenters=subcenters, group=group)
        count = valid.sum().clamp_min(1).float()
        loss = torch.where(valid, lse - targets.logit, torch.zeros_like(lse)).sum() / count
        ctx.save_for_backward(x_hat, weight, w_inv, labels_local, lse, valid, class_index, hard, target_subcenter,
                              *targets)
        ctx.scale, ctx.kernels, ctx.options, ctx.count = scale, kernels, options, count
        ctx.subcenters = subcenters
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        if torch.is_grad_enabled():  # create_graph=True: these gradients are not differentiable
            raise RuntimeError("PartialFC: double backward (create_graph=True) through a fused backend is not "
                               "supported")
        x_hat, weight, w_inv, labels_local, lse, valid, class_index, hard, target_subcenter, *target_parts = \
            ctx.saved_tensors
        targets = Targets(*target_parts)
        g = torch.where(valid, grad_loss / ctx.count, torch.zeros_like(lse))
        weight_grad = ctx.needs_input_grad[1]  # False for a frozen weight: no dW products, no dW memory
        # The rows' owners add the target columns' terms and return the target
        # logits' gradient (margins that need one: MagFace); the all-gather's
        # backward sums over ranks, counting each once.
        dx_hat, dw, d_logit = shard_backward(ctx.kernels, x_hat, weight, w_inv, labels_local, targets, lse, g,
                                             scale=ctx.scale, options=ctx.options, class_index=class_index,
                                             hard=hard, subcenters=ctx.subcenters, target_subcenter=target_subcenter,
                                             weight_grad=weight_grad)
        if weight_grad and class_index is not None:
            if weight.is_leaf:
                # Rows-only update straight into .grad: autograd would otherwise
                # build a dense C x D gradient next to .grad just to add it in.
                if weight.grad is None:
                    weight.grad = torch.zeros_like(weight)
                weight.grad.index_add_(0, class_index, dw.to(weight.grad.dtype))
                dw = None
            else:  # rows outside the sample get a zero gradient
                dw = torch.zeros_like(weight).index_copy_(0, class_index, dw)
        return (dx_hat, dw, None, d_logit if ctx.needs_input_grad[3] else None) + (None,) * 11
