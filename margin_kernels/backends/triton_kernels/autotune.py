"""How each kernel is autotuned: its candidate configs, its key (bucketed
shapes and every variant flag), the pruning of configs that cannot fit before
anything compiles, and a benchmark that skips a config that fails without
aborting the call."""
from __future__ import annotations

import functools
import os
import warnings

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tuned once per (power-of-two B, power-of-two C, D): a new batch size (the last
# batch, evaluation) must not retune, each trial of the atomic backward zeroing a
# [C, D] buffer. B_BUCKET and C_BUCKET are arguments for the key only.
AUTOTUNE_KEY = ["B_BUCKET", "C_BUCKET", "D"]
# Every flag that changes the compiled kernel is in its key too: a config tuned
# for one variant (no hard negatives, no dW, fast fp32 dots) is not reused for
# another. (Triton adds the tensors' dtypes itself.)
VARIANT_KEYS = {
    "fwd": ["HAS_INDEX", "HAS_HARD", "SUBCENTERS", "UPCAST", "IEEE"],
    "bwd": ["HAS_INDEX", "HAS_HARD", "SUBCENTERS", "UPCAST", "IEEE", "SCALE", "WITH_DW"],
    "bwd_dw": ["HAS_INDEX", "HAS_HARD", "UPCAST", "IEEE", "SCALE"],
    "bwd_dx": ["HAS_INDEX", "HAS_HARD", "UPCAST", "IEEE", "SCALE"],
}
# Registers a thread may give its fp32 accumulators before a config is not
# worth benchmarking (of 255; the rest hold operands, indices and the epilogue).
MAX_ACCUMULATOR_REGISTERS = 128


def autotune_bucket(n: int) -> int:
    """The power of two at or above n (1 for n <= 1): the autotune key's B and C."""
    return 1 << max(int(n) - 1, 0).bit_length()


def candidates(kind: str, interpret: bool = INTERPRET, subcenters: bool = False) -> list[triton.Config]:
    """Autotune candidates per kernel kind: fwd, bwd (atomic), bwd_dw and bwd_dx
    (the split backward, whose tiles also carry a D chunk, BLOCK_D).
    ``subcenters``: the forward's and the atomic backward's candidates for
    SUBCENTERS > 1."""
    if interpret:  # the interpreter pays per block op: few, large tiles (BLOCK_D < 72: D chunks get tested)
        meta = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}
        if kind in ("bwd_dw", "bwd_dx"):
            meta["BLOCK_D"] = 64
        return [triton.Config(meta, num_warps=4, num_stages=1)]
    shapes = {
        "fwd": [(128, 128, 64, 0, 8, 3), (128, 256, 64, 0, 8, 3), (64, 128, 64, 0, 4, 4), (128, 64, 64, 0, 4, 4),
                (64, 64, 64, 0, 4, 3)],
        # two accumulators per D chunk: smaller tiles (a 128 x 128 x 32 tile needs 255 registers and
        # spills with the hard-negative rule's three coefficients on sm_90: benchmarks/triton_aot.py)
        "bwd": [(64, 128, 64, 0, 8, 3), (128, 64, 64, 0, 8, 3), (64, 64, 64, 0, 4, 3)],
        # a [BLOCK_N, BLOCK_D] (dW) or [BLOCK_M, BLOCK_D] (dx) accumulator lives across the whole loop;
        # a BLOCK_D below D recomputes the logits once per D chunk. (512-wide D chunks, a 128 x 64 dW
        # tile with a 256-wide chunk, and a 64 x 128 dx tile with one, spill on sm_90 with hard
        # negatives in bf16 or fp16 with one Triton or another: benchmarks/triton_aot.py.)
        "bwd_dw": [(64, 64, 64, 256, 8, 3), (64, 128, 64, 128, 8, 3), (128, 64, 64, 128, 8, 2),
                   (64, 64, 32, 256, 8, 3)],
        "bwd_dx": [(64, 64, 64, 256, 8, 3), (128, 64, 64, 128, 8, 3), (64, 64, 32, 256, 8, 3)],
    }[kind]
    if subcenters:
        # The running max and arg-max (and in the backward the gradient tile)
        # live across the K GEMM tiles: tiles small enough for the registers
        # (the ones above spill on sm_90 with K = 3; benchmarks/triton_aot.py).
        shapes = {"fwd": [(64, 128, 64, 0, 8, 3), (128, 64, 64, 0, 8, 3), (64, 64, 64, 0, 4, 3)],
                  "bwd": [(64, 64, 64, 0, 8, 3), (64, 64, 32, 0, 8, 3)]}[kind]
    configs = []
    for m, n, k, d, w, st in shapes:
        meta = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}
        if d:
            meta["BLOCK_D"] = d
        configs.append(triton.Config(meta, num_warps=w, num_stages=st))
    return configs


def shared_memory_bytes(kind: str, meta: dict, num_stages: int, operand_bytes: int) -> int:
    """Shared memory a config's pipelined operand tiles take: per stage, a
    BLOCK_M x BLOCK_K and a BLOCK_N x BLOCK_K tile of the GEMM operands (the
    split kernels also stream a BLOCK_D-wide block of x or W)."""
    per_stage = (meta["BLOCK_M"] + meta["BLOCK_N"]) * meta["BLOCK_K"]
    if "BLOCK_D" in meta:
        per_stage += (meta["BLOCK_N"] if kind == "bwd_dx" else meta["BLOCK_M"]) * meta["BLOCK_D"]
    return num_stages * per_stage * operand_bytes


def accumulator_registers(kind: str, meta: dict, num_warps: int) -> int:
    """fp32 registers per thread of the accumulators a config keeps live: the
    logits tile, and the split kernels' [BLOCK_N or BLOCK_M, BLOCK_D] sum."""
    elements = meta["BLOCK_M"] * meta["BLOCK_N"]
    if kind == "bwd_dw":
        elements += meta["BLOCK_N"] * meta["BLOCK_D"]
    elif kind == "bwd_dx":
        elements += meta["BLOCK_M"] * meta["BLOCK_D"]
    return elements // (32 * num_warps)


def fits(kind: str, config: triton.Config, operand_bytes: int, max_shared_memory: int) -> bool:
    """Whether a config can run at all (shared memory) and is worth timing
    (accumulator registers), estimated before any compile;
    benchmarks/triton_aot.py measures the kept ones (spills, shared memory)."""
    meta = config.kwargs
    return (shared_memory_bytes(kind, meta, config.num_stages, operand_bytes) <= max_shared_memory
            and accumulator_registers(kind, meta, config.num_warps) <= MAX_ACCUMULATOR_REGISTERS)


def _device_shared_memory() -> int:
    import torch

    props = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
    return props["max_shared_mem"]


def autotune_args(kind: str, interpret: bool = INTERPRET, subcenters: bool = False) -> dict:
    """autotune() arguments of one kernel: its candidates, its key (the shape
    buckets and every variant flag), and a pruning that keeps the candidates
    the launch can use (the sub-center list where SUBCENTERS > 1) and that fit
    the device, before anything is compiled or timed."""
    key = AUTOTUNE_KEY + VARIANT_KEYS[kind]
    plain = candidates(kind, interpret)
    if interpret:
        return dict(configs=plain, key=key)
    sub = candidates(kind, interpret, subcenters=True) if subcenters else []

    def prune(configs, named_args, **kwargs):
        wanted = sub if kwargs.get("SUBCENTERS", 1) > 1 else plain
        operand_bytes = 4 if kwargs.get("UPCAST") or named_args["W"].element_size() == 4 else 2
        smem = _device_shared_memory()
        kept = [c for c in configs if any(c is w for w in wanted) and fits(kind, c, operand_bytes, smem)]
        # (none fits: the smallest tile, rather than no kernel at all)
        return kept or [min(wanted, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    return dict(configs=plain + sub, key=key, prune_configs_by={"early_config_prune": prune},
                do_bench=functools.partial(bench_or_skip, kind))


def device_usable() -> bool:
    """Whether the current CUDA device still runs work after a failed launch
    (an illegal address poisons the context; a compile error does not)."""
    import torch

    try:
        torch.cuda.synchronize()
        return True
    except Exception:  # any error here means the context is gone
        return False


def _benchmarker():
    """Triton's own timing function for the active device (what the autotuner uses by default)."""
    return triton.runtime.driver.active.get_benchmarker()


def bench_or_skip(kind: str, kernel_call, quantiles):
    """The autotuner's timing of one candidate, made tolerant: Triton itself
    only catches out-of-resources, compile-time assertion and ptxas errors,
    so any other failure of one candidate (an LLVM or driver error in its
    compile or launch) would abort the whole call. Such a candidate is timed
    as infinite and skipped with a warning while the device stays usable; an
    error that leaves the device unusable is raised. (If every candidate
    fails, the autotuner launches one anyway and its error surfaces.)"""
    try:
        return _benchmarker()(kernel_call, quantiles=quantiles)
    except Exception as exc:
        if not device_usable():
            raise
        warnings.warn(f"a Triton autotune candidate of the {kind} kernel failed and is skipped: "
                      f"{type(exc).__name__}: {str(exc)[:300]}", RuntimeWarning, stacklevel=2)
        return [float("inf")] * len(quantiles)
