"""The loss's one autograd Function, and its registration as torch.library
custom ops so that torch.compile traces it without graph breaks.

Every fused path goes through :class:`MarginLoss`: the single-process loss
(one shard, no group), a ``PartialFC`` rank's shard of the sharded loss (its
process group and, when sampling, a class index) and the backend's single-pass
shortcut, which forms both gradients during the forward (``LossCall.single_pass``).
Eager calls apply the Function; compiled calls go through the custom op
``margin_kernels::margin_loss``, whose forward is the same code and whose
autograd is the Function's own ``backward``.
"""
from __future__ import annotations

import ast
import functools
from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor

from . import backends
from ._checks import check_values, check_weight_norms
from ._shard import shard_backward, shard_forward
from ._sharding import Group
from ._targets import Targets, add_target_gradients, target_share

__all__ = ["LossCall", "MarginLoss", "local_labels"]


@dataclass(frozen=True)
class LossCall:
    """The non-tensor parameters of one loss call.

    Args:
        scale: s.
        backend: a fused backend's name (``"cpp"``, ``"triton"``).
        options: resolved :class:`~margin_kernels.backends.KernelOptions`.
        subcenters: weight rows per class (K).
        ignore_index: the label of rows without a target here (-1 for a
            PartialFC shard, whose labels are already local).
        reduce: return ``sum(row_scale * rows)`` (mean and sum), else the rows.
        single_pass: form both gradients during the forward (a backend that
            has the shortcut; reduced, one shard, eager).
        check: validate labels and x_hat inside the call (compiled calls,
            where the caller cannot read values back).
        group: the process group the classes are sharded over, or None.
    """

    scale: float
    backend: str
    options: backends.KernelOptions
    subcenters: int = 1
    ignore_index: int = -100
    reduce: bool = True
    single_pass: bool = False
    check: bool = False
    group: Optional[Group] = None

    def encode(self) -> str:
        """The call as the custom ops take it. The process group does not
        travel: the backward needs no collective, and compiled calls have none."""
        own = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name not in ("options", "group")]
        opts = [f"options.{f.name}={getattr(self.options, f.name)!r}" for f in fields(self.options)]
        return ";".join(own + opts)

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def decode(text: str) -> "LossCall":
        own, opts = {}, {}
        for item in text.split(";"):
            key, value = item.split("=", 1)
            target = opts if key.startswith("options.") else own
            target[key.removeprefix("options.")] = ast.literal_eval(value)
        return LossCall(options=backends.KernelOptions(**opts), **own)


def local_labels(labels: Tensor, ignore_index: int) -> Tensor:
    """int64 labels with -1 where the row has no target (``ignore_index``)."""
    return torch.where(labels == ignore_index, torch.full_like(labels, -1), labels).long()


DOUBLE_BACKWARD = ("margin_cross_entropy: double backward (create_graph=True) through a fused backend is not "
                   "supported. Use backend='reference' for higher-order gradients.")
SECOND_BACKWARD = ("margin_cross_entropy: a second backward through the fused single-pass path "
                   "(retain_graph=True) is not supported; its gradients were scaled in place. "
                   "Pass reduction='none' and reduce yourself to backpropagate twice.")


def _forward(x_hat: Tensor, weight: Tensor, labels: Tensor, targets: Targets, row_scale: Tensor,
             class_index: Tensor | None, hard: Tensor | None, target_subcenter: Tensor | None,
             call: LossCall) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """(loss, lse, w_inv, the single pass's (dx_hat, dW, d logit) or None)."""
    if call.check:
        check_values(x_hat, None, labels, call.ignore_index, num_classes=weight.shape[0] // call.subcenters)
    kernels = backends.load(call.backend)
    labels_local = local_labels(labels, call.ignore_index)
    grads = None
    if call.single_pass:
        w_inv = kernels.row_inv_norms(weight)
        check_weight_norms(w_inv, weight)
        lse, dx_hat, dw = kernels.single_pass(x_hat, weight, w_inv, labels_local, targets.logit, row_scale,
                                              scale=call.scale, options=call.options, hard=hard,
                                              subcenters=call.subcenters)
        share = target_share(targets, labels_local, lse, row_scale, w_inv, call.subcenters, target_subcenter)
        add_target_gradients(dx_hat, dw, targets, share)  # (float32 dW: no second rounding)
        grads = (dx_hat, dw, share.d_logit)
    else:
        lse, w_inv = shard_forward(kernels, x_hat, weight, labels_local, targets, scale=call.scale,
                                   options=call.options, class_index=class_index, hard=hard,
                                   subcenters=call.subcenters, group=call.group)
    rows = torch.where(row_scale != 0, lse - targets.logit, torch.zeros_like(lse)) * row_scale
    return (rows.sum() if call.reduce else rows), lse, w_inv, grads


def _save(ctx, inputs: tuple, lse: Tensor, w_inv: Tensor, call: LossCall, grads) -> None:
    x_hat, weight, labels, target_logit, grad_x, grad_w, row_scale, class_index, hard, target_subcenter = inputs
    ctx.call = call
    if grads is not None:  # the single pass: the gradients are formed already
        ctx.save_for_backward(*grads)
        ctx.consumed = False
    else:
        ctx.save_for_backward(x_hat, weight, w_inv, labels, target_logit, grad_x, grad_w, row_scale, class_index,
                              hard, target_subcenter, lse)


class MarginLoss(torch.autograd.Function):
    """The fused loss over one class shard: ``(loss, lse, w_inv)`` from the
    normalized embeddings, the raw weight (rows ``class_index`` of it, when
    given), the labels, the target logits with their gradients (``_targets``),
    ``row_scale`` (each row's weight in the loss: 0 for ignored rows, 1/count
    for a mean), the hard-negative rule and the target sub-centers.

    Its backward is not differentiable: a double backward (create_graph=True)
    raises instead of returning a wrong second derivative. With a class index
    and a leaf weight, the sampled rows' gradient goes straight into
    ``weight.grad`` (no dense C x D gradient beside it).
    """

    @staticmethod
    def forward(ctx, x_hat: Tensor, weight: Tensor, labels: Tensor, target_logit: Tensor, grad_x: Tensor,
                grad_w: Tensor, row_scale: Tensor, class_index: Tensor | None, hard: Tensor | None,
                target_subcenter: Tensor | None, call: LossCall):
        inputs = (x_hat, weight, labels, target_logit, grad_x, grad_w, row_scale, class_index, hard, target_subcenter)
        loss, lse, w_inv, grads = _forward(x_hat, weight, labels, Targets(target_logit, grad_x, grad_w), row_scale,
                                           class_index, hard, target_subcenter, call)
        _save(ctx, inputs, lse, w_inv, call, grads)
        ctx.mark_non_differentiable(lse, w_inv)
        return loss, lse, w_inv

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_lse, grad_w_inv):
        if torch.is_grad_enabled():  # create_graph=True: these gradients have no derivative of their own
            raise RuntimeError(DOUBLE_BACKWARD)
        call: LossCall = ctx.call
        wants_logit = ctx.needs_input_grad[3]  # margins that need their gradient (functions of the embeddings)
        if call.single_pass:
            if ctx.consumed:
                raise RuntimeError(SECOND_BACKWARD)
            ctx.consumed = True
            dx_hat, dw, d_logit = ctx.saved_tensors
            return (dx_hat.mul_(grad_loss), dw.mul_(grad_loss), None, d_logit * grad_loss if wants_logit else None,
                    None, None, None, None, None, None, None)
        (x_hat, weight, w_inv, labels, target_logit, grad_x, grad_w, row_scale, class_index, hard, target_subcenter,
         lse) = ctx.saved_tensors
        weight_grad = ctx.needs_input_grad[1]  # False for a frozen weight: no dW products, no dW memory
        grad_rows = row_scale * grad_loss.float()
        dx_hat, dw, d_logit = torch.ops.margin_kernels.margin_loss_backward(
            grad_rows, x_hat, weight, w_inv, labels, target_logit, grad_x, grad_w, class_index, hard,
            target_subcenter, lse, weight_grad, call.encode(),
        )
        if not weight_grad:
            dw = None
        elif class_index is not None:
            if weight.is_leaf:
                # Rows-only update straight into .grad: autograd would otherwise
                # build a dense C x D gradient next to .grad just to add it in.
                if weight.grad is None:
                    weight.grad = torch.zeros_like(weight)
                weight.grad.index_add_(0, class_index, dw.to(weight.grad.dtype))
                dw = None
            else:  # rows outside the sample get a zero gradient
                dw = torch.zeros_like(weight).index_copy_(0, class_index, dw)
        return (dx_hat, dw, None, d_logit if wants_logit else None, None, None, None, None, None, None, None)


# ---------------------------------------------------------------- custom ops


@torch.library.custom_op("margin_kernels::margin_loss", mutates_args=())
def margin_loss(x_hat: Tensor, weight: Tensor, labels: Tensor, target_logit: Tensor, grad_x: Tensor, grad_w: Tensor,
                row_scale: Tensor, class_index: Optional[Tensor], hard: Optional[Tensor],
                target_subcenter: Optional[Tensor], call: str) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`MarginLoss`'s forward as a custom op (``call``: ``LossCall.encode()``)."""
    loss, lse, w_inv, _ = _forward(x_hat, weight, labels, Targets(target_logit, grad_x, grad_w), row_scale,
                                   class_index, hard, target_subcenter, LossCall.decode(call))
    return loss, lse, w_inv


@margin_loss.register_fake
def _(x_hat, weight, labels, target_logit, grad_x, grad_w, row_scale, class_index, hard, target_subcenter, call):
    b = x_hat.shape[0]
    rows = weight.shape[0] if class_index is None else class_index.shape[0]
    loss = x_hat.new_empty(()) if LossCall.decode(call).reduce else x_hat.new_empty(b)
    return loss, x_hat.new_empty(b), x_hat.new_empty(rows)


@torch.library.custom_op("margin_kernels::margin_loss_backward", mutates_args=())
def margin_loss_backward(grad_rows: Tensor, x_hat: Tensor, weight: Tensor, w_inv: Tensor, labels: Tensor,
                         target_logit: Tensor, grad_x: Tensor, grad_w: Tensor, class_index: Optional[Tensor],
                         hard: Optional[Tensor], target_subcenter: Optional[Tensor], lse: Tensor, weight_grad: bool,
                         call: str) -> tuple[Tensor, Tensor, Tensor]:
    """(d/dx_hat, d/dW of the shard's rows ([0, D] without ``weight_grad``),
    d/d target logit) for per-row upstream gradients ``grad_rows``."""
    c = LossCall.decode(call)
    dx_hat, dw, d_logit = shard_backward(
        backends.load(c.backend), x_hat, weight, w_inv, local_labels(labels, c.ignore_index),
        Targets(target_logit, grad_x, grad_w), lse, grad_rows, scale=c.scale, options=c.options,
        class_index=class_index, hard=hard, subcenters=c.subcenters, target_subcenter=target_subcenter,
        weight_grad=weight_grad,
    )
    return dx_hat, dw if dw is not None else weight.new_empty(0, weight.shape[1]), d_logit


@margin_loss_backward.register_fake
def _(grad_rows, x_hat, weight, w_inv, labels, target_logit, grad_x, grad_w, class_index, hard, target_subcenter, lse,
      weight_grad, call):
    rows = w_inv.shape[0] if weight_grad else 0
    return torch.empty_like(x_hat), weight.new_empty(rows, weight.shape[1]), torch.empty_like(lse)


def _setup_context(ctx, inputs, output) -> None:
    *tensors, call = inputs
    _, lse, w_inv = output
    _save(ctx, tuple(tensors), lse, w_inv, LossCall.decode(call), None)
    ctx.mark_non_differentiable(lse, w_inv)


margin_loss.register_autograd(MarginLoss.backward, setup_context=_setup_context)
