"""Fused backends, each a module that implements the kernel interface of
docs/DESIGN.md §4 on one class shard (the same names and order in Python, in
csrc/bindings.cpp and, upper-cased, in the Triton kernels):

    row_inv_norms(weight, *, class_index=None) -> w_inv [C] float32
    lse_forward(x_hat, weight, w_inv, labels_local, target_logit, *, scale, options,
                class_index=None, hard=None, subcenters=1) -> lse [B]
    lse_backward(x_hat, weight, w_inv, labels_local, lse, grad_rows, *, scale, options,
                 class_index=None, hard=None, subcenters=1, weight_grad=True,
                 target_rows=None, target_dw=None)
        -> (dx_hat [B, D] float32, dW [C, D] in weight's dtype, or None without weight_grad)

and the single-shard shortcut, where ``has_single_pass`` says it has one:

    has_single_pass(weight) -> bool
    prefers_single_pass(weight, batch, options) -> bool
    single_pass(x_hat, weight, w_inv, labels_local, target_logit, grad_rows, *,
                           scale, options, hard=None, subcenters=1) -> (lse, dx_hat, dW)

The backwards leave out the target columns (the caller adds their exact share
to dx; lse_backward adds their dW share, ``target_dw`` float32 [B, D] to shard
rows ``target_rows`` int64 [B] (-1: none), to its float32 accumulator before
rounding to the weight's dtype);
``hard`` is the hard-negative rule, float32 [4, B] (``HardNegatives.packed``: thresholds,
then a, b, d: a non-target cosine c above its row's threshold counts as (a c + b) c + d).
``subcenters`` (K): each class is K consecutive weight rows (of ``weight``, or
of ``class_index``), its cosine the max over them; w_inv and dW count rows,
labels_local counts classes, and a class's gradient goes to its arg-max row.

``options`` is a resolved :class:`KernelOptions`.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, replace
from types import ModuleType

import torch

BACKENDS = ("reference", "cpp", "triton")

WORKSPACE_ENV = "MARGIN_KERNELS_WORKSPACE_MB"
TRITON_BACKWARD_ENV = "MARGIN_KERNELS_TRITON_BACKWARD"
TF32_ENV = "MARGIN_KERNELS_TF32"
SINGLE_PASS_ENV = "MARGIN_KERNELS_SINGLE_PASS"
TRITON_BACKWARDS = ("atomic", "split")


@dataclass(frozen=True)
class KernelOptions:
    """How the fused kernels run; ``None`` takes the default, read at call time
    from the environment variable named beside it.

    Args:
        workspace_bytes: scratch a sweep may hold (logits blocks, per-block
            copies, the fp32 dW chunk of half-precision weights);
            ``$MARGIN_KERNELS_WORKSPACE_MB`` MiB, else 64 MiB.
        triton_backward: the Triton backward, ``"atomic"`` (one kernel, fp32
            atomics into dx and dW) or ``"split"`` (a dW kernel without atomics
            and a dx kernel); ``$MARGIN_KERNELS_TRITON_BACKWARD``, else "atomic".
        tf32: float32 inputs on TF32 tensor cores in the Triton kernels (about
            3e-4 relative error instead of the 1e-5 contract);
            ``$MARGIN_KERNELS_TF32`` = 1, else False.
        single_pass: the single-shard shortcut (loss and both gradients in one
            row-chunked sweep, for a reduced loss whose weight needs its
            gradient): True takes it wherever the backend has it, False never,
            None where the backend finds it faster; ``$MARGIN_KERNELS_SINGLE_PASS``
            = 1 / 0, else None.
    """

    workspace_bytes: int | None = None
    triton_backward: str | None = None
    tf32: bool | None = None
    single_pass: bool | None = None

    def __post_init__(self) -> None:
        if self.workspace_bytes is not None and (isinstance(self.workspace_bytes, bool)
                                                 or not isinstance(self.workspace_bytes, int)):
            raise TypeError(f"workspace_bytes must be a positive int (bytes) or None, got {self.workspace_bytes!r}")
        if self.workspace_bytes is not None and self.workspace_bytes < 1:
            raise ValueError(f"workspace_bytes must be >= 1, got {self.workspace_bytes}")
        if self.triton_backward is not None and self.triton_backward not in TRITON_BACKWARDS:
            raise ValueError(f"triton_backward must be one of {TRITON_BACKWARDS}, got {self.triton_backward!r}")
        for name in ("tf32", "single_pass"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool or None, got {getattr(self, name)!r}")

    def resolved(self) -> "KernelOptions":
        """These options with every default filled in from the environment, now."""
        backward = self.triton_backward
        if backward is None:
            backward = os.environ.get(TRITON_BACKWARD_ENV, "atomic")
            if backward not in TRITON_BACKWARDS:
                raise ValueError(f"{TRITON_BACKWARD_ENV} must be one of {TRITON_BACKWARDS}, got {backward!r}")
        tf32 = _env_flag(TF32_ENV, False) if self.tf32 is None else self.tf32
        single_pass = _env_flag(SINGLE_PASS_ENV, None) if self.single_pass is None else self.single_pass
        workspace = default_workspace_bytes() if self.workspace_bytes is None else self.workspace_bytes
        return replace(self, workspace_bytes=workspace, triton_backward=backward, tf32=tf32, single_pass=single_pass)


def _env_flag(name: str, default: bool | None) -> bool | None:
    text = os.environ.get(name)
    if text is None:
        return default
    if text not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {text!r}")
    return text == "1"


def default_workspace_bytes() -> int:
    """Bytes of scratch (logits blocks and per-block copies) a sweep may hold when
    the call does not say (``workspace_bytes=``): $MARGIN_KERNELS_WORKSPACE_MB
    MiB, read at call time, else 64 MiB."""
    text = os.environ.get(WORKSPACE_ENV, "64")
    try:
        mib = float(text)
    except ValueError:
        raise ValueError(f"{WORKSPACE_ENV} must be a number of MiB, got {text!r}") from None
    if not (mib > 0 and mib * 2**20 < 2**62):
        raise ValueError(f"{WORKSPACE_ENV} must be a positive number of MiB, got {text!r}")
    return max(1, int(mib * 2**20))


_MODULES = {"cpp": "cpp", "triton": "triton_backend"}
_loaded: dict[str, ModuleType] = {}


def load(name: str) -> ModuleType:
    """The backend module ``name`` ('cpp' or 'triton'); raises if it cannot run here."""
    if name not in ("cpp", "triton"):
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {name!r}")
    module = _loaded.get(name)
    if module is None:  # first use, in eager mode: torch.compile cannot trace imports
        module = _loaded[name] = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    reason = module.unavailable_reason()
    if reason:
        raise RuntimeError(f"backend={name!r} is unavailable: {reason}")
    return module


def is_available(name: str) -> bool:
    """Whether backend ``name`` can run here (``reference`` always can)."""
    if name == "reference":
        return True
    try:
        load(name)
    except (RuntimeError, ImportError, ValueError):
        return False
    return True


def resolve(name: str, device: torch.device) -> str:
    """Turn 'auto' into a concrete backend for tensors on ``device``."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {name!r}")
        return name
    if device.type == "cuda":
        if is_available("triton"):
            return "triton"
        if is_available("cpp") and load("cpp").runs_on_cuda():
            return "cpp"
    if device.type == "cpu" and is_available("cpp"):
        return "cpp"
    return "reference"


is_available("cpp")  # import it now: cheap, and keeps imports out of compiled code
