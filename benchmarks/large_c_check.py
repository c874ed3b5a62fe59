"""The fused loss against a float32 oracle at a class count past 2^31 weight
elements (8M classes x 512 = 4.1e9), where a 32-bit offset would wrap onto
another row.

    python3 benchmarks/large_c_check.py                         # C=8M, D=512, B=1024, bf16, on CUDA
    python3 benchmarks/large_c_check.py --device cpu --classes 5000 --dim 64 --batch 16 --backends cpp

The oracle is the reference's math (normalize, cosine logits, the margin at the
target column through ``reference._margin_target``, logsumexp) evaluated one
class block at a time in float32 with autograd, so it never holds the B x C
logits: first the logsumexp over all blocks, then per block the surrogate
sum_ij g_i exp(z_ij - lse_i) - sum_i g_i z_i,y_i, whose gradient with respect to
the logits is g (softmax - onehot). Labels include the last class and classes
past row 4,194,304. Exit status 1 when any backend is off its tolerance.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import margin_kernels as mk
from margin_kernels import reference

TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 3e-2}  # as the tests state them


def problem(b: int, d: int, c: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(b, d, generator=g, device=device).to(dtype)
    w = torch.empty(c, d, dtype=dtype, device=device)
    for c0 in range(0, c, 1 << 20):  # filled in slices: no fp32 [C, D] on the way
        w[c0 : c0 + (1 << 20)] = torch.randn(min(1 << 20, c - c0), d, generator=g, device=device).to(dtype)
    y = torch.randint(0, c, (b,), generator=g, device=device)
    y[0], y[1 % b] = c - 1, min(c - 1, 4_194_305 + 17)  # the last class, and one past 2^31 / 512 rows
    if b > 2:
        y[2] = -100  # an ignored row
    return x, w, y


def oracle(x, w, y, margin: mk.Margin, block: int):
    """(loss, dx, dW blocks) in float32, block by block, by autograd (mean reduction)."""
    valid = y != -100
    safe = torch.where(valid, y, torch.zeros_like(y))
    xf = x.float().requires_grad_(True)
    margins = margin.row_margins(x.shape[0], device=x.device)
    flags = dict(overflow=margin.overflow, easy_margin=margin.easy_margin, detach_margin=margin.detach_margin)

    def block_logits(c0, wf):  # x normalized per block: each block's graph is freed by its backward
        x_hat = F.normalize(xf, dim=1, eps=reference.NORM_EPS)
        z = margin.s * (x_hat @ F.normalize(wf, dim=1, eps=reference.NORM_EPS).t())
        inside = valid & (safe >= c0) & (safe < c0 + wf.shape[0])
        col = (safe - c0).clamp(0, wf.shape[0] - 1)
        cos_y = z.gather(1, col[:, None]).squeeze(1) / margin.s
        w_y = F.normalize(wf.index_select(0, col), dim=1, eps=reference.NORM_EPS)
        t = reference._margin_target(cos_y, x_hat, w_y, margins, **flags)
        z = torch.where(F.one_hot(col, wf.shape[0]).bool() & inside[:, None], margin.s * t[:, None], z)
        return z, inside, col

    with torch.no_grad():
        parts = [torch.logsumexp(block_logits(c0, w[c0 : c0 + block].float())[0], dim=1)
                 for c0 in range(0, w.shape[0], block)]
        lse = torch.logsumexp(torch.stack(parts), dim=0)
    count = valid.sum().clamp_min(1)
    g = valid.float() / count
    loss = torch.zeros((), device=x.device)
    dw_blocks = []
    for c0 in range(0, w.shape[0], block):
        wf = w[c0 : c0 + block].float().requires_grad_(True)
        z, inside, col = block_logits(c0, wf)
        target = torch.where(inside, z.gather(1, col[:, None]).squeeze(1), torch.zeros_like(lse))
        surrogate = (g[:, None] * torch.exp(z - lse[:, None])).sum() - (g * target).sum()
        surrogate.backward()
        loss = loss + (g * target).sum()
        dw_blocks.append(wf.grad)
    loss = (g * lse).sum() - loss
    return loss.detach(), xf.grad, dw_blocks


def rel_err_blocks(got: torch.Tensor, blocks: list[torch.Tensor], block: int) -> float:
    num = den = 0.0
    for i, ref in enumerate(blocks):
        part = got[i * block : i * block + ref.shape[0]].float()
        num += float((part - ref).double().pow(2).sum())
        den += float(ref.double().pow(2).sum())
    return (num / max(den, 1e-300)) ** 0.5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=8_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--dtype", choices=sorted(TOLERANCE), default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--backends", nargs="+", default=["triton", "triton-split", "cpp"])
    p.add_argument("--block", type=int, default=1 << 18, help="classes per oracle block")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    margin = mk.ArcFace()
    t0 = time.perf_counter()
    x, w, y = problem(args.batch, args.dim, args.classes, dtype, args.device)
    ref_loss, ref_dx, ref_dw = oracle(x, w, y, margin, args.block)
    print(f"large-C check: B={args.batch} D={args.dim} C={args.classes:,} {args.dtype} on {args.device}; "
          f"C x D = {args.classes * args.dim:,} elements (2^31 = {2**31:,}); oracle {time.perf_counter() - t0:.1f} s",
          flush=True)
    tol = TOLERANCE[args.dtype]
    rows, ok = [], True
    for name in args.backends:
        backend = "triton" if name.startswith("triton") else name
        options = mk.backends.KernelOptions(triton_backward="split" if name == "triton-split" else "atomic")
        row = dict(backend=name)
        try:
            xg = x.detach().clone().requires_grad_(True)
            wg = w.detach().requires_grad_(True)
            t1 = time.perf_counter()
            loss = mk.margin_cross_entropy(xg, wg, y, margin, backend=backend, options=options)
            loss.backward()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            row.update(seconds=round(time.perf_counter() - t1, 2), loss=rel_err(loss.detach(), ref_loss),
                       dx=rel_err(xg.grad.float(), ref_dx), dW=rel_err_blocks(wg.grad, ref_dw, args.block))
            wg.grad = None
            row["ok"] = all(row[k] <= tol for k in ("loss", "dx", "dW"))
        except Exception as exc:  # report every backend, then fail
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        ok &= row["ok"]
        rows.append(row)
        shown = (f"loss {row['loss']:.1e}  dx {row['dx']:.1e}  dW {row['dW']:.1e}  ({row['seconds']} s)"
                 if "loss" in row else row["error"])
        print(f"  {name:<13} {'PASS' if row['ok'] else 'FAIL'}  relative errors {shown}  (tolerance {tol:g})",
              flush=True)
        if args.json:  # after every backend: a run cut off by a time limit keeps the rows it finished
            write_json(args, tol, rows, complete=name == args.backends[-1])
    return 0 if ok else 1


def write_json(args, tol: float, rows: list[dict], complete: bool) -> None:
    tmp = f"{args.json}.tmp"
    with open(tmp, "w") as f:
        json.dump(dict(classes=args.classes, dim=args.dim, batch=args.batch, dtype=args.dtype, device=args.device,
                       tolerance=tol, complete=complete, rows=rows), f, indent=1)
    os.replace(tmp, args.json)


if __name__ == "__main__":
    sys.exit(main())
