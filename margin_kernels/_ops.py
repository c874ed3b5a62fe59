"""The fused loss as torch.library custom ops, so that torch.compile traces it
without graph breaks and the meta device can plan its memory.

``margin_kernels::margin_ce_rows`` is the single-shard loss per row (the one-shard
case of ``_shard_loss``); its backward is ``margin_kernels::margin_ce_rows_backward``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends
from ._checks import check_values
from ._shard_loss import shard_backward, shard_forward
from ._targets import Targets, target_logit_grad


def _labels_local(labels: Tensor, ignore_index: int) -> Tensor:
    return torch.where(labels == ignore_index, torch.full_like(labels, -1), labels).long()


@torch.library.custom_op("margin_kernels::margin_ce_rows", mutates_args=())
def margin_ce_rows(
    x_hat: Tensor,
    weight: Tensor,
    labels: Tensor,
    target_logit: Tensor,
    target_grad_x: Tensor,
    target_grad_w: Tensor,
    hard: Optional[Tensor],
    target_subcenter: Optional[Tensor],
    subcenters: int,
    s: float,
    ignore_index: int,
    backend: str,
    workspace_bytes: int,
    triton_backward: str,
    tf32: bool,
    check: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss per row, logsumexp per row, 1/||w_j||) of the fused loss.

    ``target_grad_x`` / ``target_grad_w``: the target logits' gradients (see
    ``_targets``), used by the backward. ``hard``: CurricularFace's [2, B]
    (thresholds, t), or None. ``subcenters``: weight rows per class (K), with
    ``target_subcenter`` [B] the sub-center of each row's target (None for
    K = 1). ``check``: validate labels and x_hat
    here (under torch.compile, where the caller cannot); weight is always
    checked, from its row norms. ``workspace_bytes``, ``triton_backward`` and
    ``tf32`` are the resolved :class:`~margin_kernels.backends.KernelOptions`.
    """
    if check:
        check_values(x_hat, None, labels, ignore_index, num_classes=weight.shape[0] // subcenters)
    kernels = backends.load(backend)
    options = backends.KernelOptions(workspace_bytes, triton_backward, tf32)
    labels_local = _labels_local(labels, ignore_index)
    targets = Targets(target_logit, target_grad_x, target_grad_w)
    lse, w_inv = shard_forward(kernels, x_hat, weight, labels_local, targets, scale=s, options=options, hard=hard,
                               subcenters=subcenters)
    loss = torch.where(labels_local >= 0, lse - target_logit, torch.zeros_like(lse))
    return loss, lse, w_inv


@margin_ce_rows.register_fake
def _(x_hat, weight, labels, target_logit, target_grad_x, target_grad_w, hard, target_subcenter, subcenters, s,
      ignore_index, backend, workspace_bytes, triton_backward, tf32, check):
    b, c = x_hat.shape[0], weight.shape[0]
    return x_hat.new_empty(b), x_hat.new_empty(b), x_hat.new_empty(c)


@torch.library.custom_op("margin_kernels::margin_ce_rows_backward", mutates_args=())
def margin_ce_rows_backward(
    grad_rows: Tensor,
    x_hat: Tensor,
    weight: Tensor,
    w_inv: Tensor,
    labels: Tensor,
    target_logit: Tensor,
    target_grad_x: Tensor,
    target_grad_w: Tensor,
    hard: Optional[Tensor],
    target_subcenter: Optional[Tensor],
    subcenters: int,
    lse: Tensor,
    s: float,
    ignore_index: int,
    backend: str,
    workspace_bytes: int,
    triton_backward: str,
    tf32: bool,
    weight_grad: bool,
) -> tuple[Tensor, Tensor]:
    """(d loss / d x_hat, d loss / d weight) for upstream per-row gradients; the
    weight's is [0, D] (and never computed) without ``weight_grad``."""
    kernels = backends.load(backend)
    options = backends.KernelOptions(workspace_bytes, triton_backward, tf32)
    labels_local = _labels_local(labels, ignore_index)
    g = torch.where(labels_local >= 0, grad_rows.float(), torch.zeros_like(lse))
    targets = Targets(target_logit, target_grad_x, target_grad_w)
    dx, dw, _ = shard_backward(kernels, x_hat, weight, w_inv, labels_local, targets, lse, g, scale=s, options=options,
                            hard=hard, subcenters=subcenters, target_subcenter=target_subcenter,
                            weight_grad=weight_grad)
    return dx, dw if dw is not None else weight.new_empty(0, weight.shape[1])


@margin_ce_rows_backward.register_fake
def _(grad_rows, x_hat, weight, w_inv, labels, target_logit, target_grad_x, target_grad_w, hard, target_subcenter,
      subcenters, lse, s, ignore_index, backend, workspace_bytes, triton_backward, tf32, weight_grad):
    return torch.empty_like(x_hat), weight.new_empty(weight.shape if weight_grad else (0, weight.shape[1]))


def _setup_context(ctx, inputs, output):
    x_hat, weight, labels, target_logit, grad_x, grad_w, hard, target_subcenter, subcenters, *args, _ = inputs
    _, lse, w_inv = output
    ctx.save_for_backward(x_hat, weight, w_inv, labels, target_logit, grad_x, grad_w, hard, target_subcenter, lse)
    ctx.subcenters = subcenters
    ctx.args = tuple(args)  # s ... tf32
    ctx.mark_non_differentiable(lse, w_inv)


DOUBLE_BACKWARD = ("margin_cross_entropy: double backward (create_graph=True) through a fused backend is not "
                   "supported. Use backend='reference' for higher-order gradients.")


def _backward(ctx, grad_loss, grad_lse, grad_w_inv):
    if torch.is_grad_enabled():  # create_graph=True: the backward op has no derivative of its own
        raise RuntimeError(DOUBLE_BACKWARD)
    x_hat, weight, w_inv, labels, target_logit, grad_x, grad_w, hard, target_subcenter, lse = ctx.saved_tensors
    weight_grad = ctx.needs_input_grad[1]
    dx_hat, dw = margin_ce_rows_backward(grad_loss, x_hat, weight, w_inv, labels, target_logit, grad_x, grad_w, hard,
                                         target_subcenter, ctx.subcenters, lse, *ctx.args, weight_grad)
    d_logit = None
    if ctx.needs_input_grad[3]:  # margins that need their gradient (MagFace)
        own = _labels_local(labels, ctx.args[1]) >= 0
        d_logit = target_logit_grad(target_logit, lse, own, grad_loss.float())
    return (dx_hat, dw if weight_grad else None, None, d_logit) + (None,) * 12


margin_ce_rows.register_autograd(_backward, setup_context=_setup_context)
