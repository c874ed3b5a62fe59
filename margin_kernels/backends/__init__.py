"""Fused backends. Each module meets the kernel contract of DESIGN.md §2 on one
class shard:

    row_inv_norms(weight, class_index=None) -> w_inv [C] float32
    lse_forward(x_hat, weight, w_inv, labels_local, target_logit, s, workspace_bytes,
                class_index=None) -> lse [B]
    lse_backward(x_hat, weight, w_inv, labels_local, target_logit, target_slope, s,
                 lse, grad_rows, workspace_bytes, class_index=None, weight_grad=True)
        -> (dx_hat [B, D] float32, dW [C, D] in weight's dtype, or None without weight_grad)

``labels_local`` is -1 for rows whose class is not in the shard (or ignored);
``target_logit`` is s * t for the rows' target columns and ``target_slope`` is
dt/dc there (see margin_kernels.margins.target_logit). A backend may also offer

    fused_forward_backward(x_hat, weight, w_inv, labels_local, target_logit,
                           target_slope, grad_rows, s, workspace_bytes) -> (lse, dx_hat, dW)

the single-shard shortcut that sweeps row chunks over all classes.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("reference", "cpp", "triton")

WORKSPACE_ENV = "MARGIN_KERNELS_WORKSPACE_MB"


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
