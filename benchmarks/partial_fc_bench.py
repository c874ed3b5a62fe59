"""PartialFC benchmark: samples/s and peak memory per rank, ours against an
insightface-style Partial FC, plus a memory model for one 80 GB GPU.

    python3 benchmarks/partial_fc_bench.py                          # one process, both implementations
    torchrun --nproc_per_node 2 benchmarks/partial_fc_bench.py       # gloo on CPU, NCCL on GPUs
    python3 benchmarks/partial_fc_bench.py --model                   # memory model, checked against measurements

The insightface-style module is written here from Partial FC's published
algorithm (arcface_torch's PartialFC_V2): all-gather embeddings and labels,
keep positives plus uniform negatives, index the sampled weight rows (a copy),
normalize, linear, clamp, the margin in place under no_grad, scale, and a
distributed softmax cross-entropy over the full B x K logits.

Peak memory: CUDA's max_memory_allocated, or on CPU the peak resident set
(VmHWM after /proc/self/clear_refs) above the process's baseline before the
module exists, so weights, momentum, gradients and workspace all count.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import margin_kernels as mk
from margin_kernels.bench import reset_peak, rss_status
from margin_kernels.partial_fc import class_split

GiB = 2**30


class InsightfacePartialFC(torch.nn.Module):
    """Partial FC as arcface_torch's PartialFC_V2 computes it (ArcFace margin)."""

    def __init__(self, embedding_size, num_classes, s=64.0, m=0.5, sample_rate=1.0, generator=None):
        super().__init__()
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.start, self.num_local = class_split(num_classes, self.world, self.rank)
        self.num_sample = int(sample_rate * self.num_local)
        self.s, self.m, self.sample_rate, self.generator = s, m, sample_rate, generator
        self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (self.num_local, embedding_size)))

    def _gather(self, t):
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t)
        parts[self.rank] = t  # keeps the autograd edge for this rank's rows
        return torch.cat(parts)

    def forward(self, embeddings, labels):
        x = self._gather(embeddings)
        y = self._gather(labels).view(-1, 1)
        local = (y >= self.start) & (y < self.start + self.num_local)
        y = torch.where(local, y - self.start, torch.full_like(y, -1))
        weight = self.weight
        if self.sample_rate < 1:
            positive = torch.unique(y[y >= 0])
            perm = torch.rand(self.num_local, generator=self.generator)
            perm[positive] = 2.0
            index = torch.topk(perm, max(self.num_sample, positive.numel()))[1].sort()[0]
            y[y >= 0] = torch.searchsorted(index, y[y >= 0])
            weight = self.weight[index]
        logits = F.linear(F.normalize(x), F.normalize(weight)).clamp(-1, 1)
        rows = torch.where(y.view(-1) != -1)[0]
        with torch.no_grad():  # CombinedMarginLoss, ArcFace branch
            target = logits[rows, y[rows].view(-1)]
            logits[rows, y[rows].view(-1)] = torch.cos(torch.acos(target) + self.m)
        logits = logits * self.s
        # DistCrossEntropy: softmax over all ranks' classes, then -log p_target
        row_max = logits.max(dim=1, keepdim=True)[0]
        if self.world > 1:
            dist.all_reduce(row_max, dist.ReduceOp.MAX)
        exp = torch.exp(logits - row_max.detach())
        total = exp.sum(dim=1, keepdim=True)
        if self.world > 1:
            dist.all_reduce(total)
        prob = exp / total
        p_target = torch.zeros(prob.shape[0], 1, device=prob.device)
        p_target[rows] = prob[rows].gather(1, y[rows])
        if self.world > 1:
            dist.all_reduce(p_target)
        return -torch.log(p_target.clamp_min(1e-30)).mean()


def build(impl, args, generator):
    if impl == "ours":
        return mk.PartialFC(args.dim, args.classes, mk.ArcFace(), sample_rate=args.sample_rate, generator=generator)
    return InsightfacePartialFC(args.dim, args.classes, sample_rate=args.sample_rate, generator=generator)


def measure(impl: str, args) -> dict:
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(rank)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.dim, requires_grad=True)
    y = torch.randint(0, args.classes, (args.batch,))
    # A tiny step first: library loads and first-call imports are not the module's memory.
    tiny = build(impl, argparse.Namespace(**{**vars(args), "classes": 64}), gen)
    tiny_opt = torch.optim.SGD(tiny.parameters(), lr=0.1, momentum=0.9)
    tiny(x[:4], y[:4] % 64).backward()
    tiny_opt.step()
    x.grad = None
    del tiny, tiny_opt
    base = rss_status("VmRSS")
    reset_peak()
    module = build(impl, args, gen)
    # SGD with momentum, no weight decay: torch's SGD adds weight decay out of
    # place, a C x D temporary for either implementation.
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = module(x, y)
        loss.backward()
        opt.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = rss_status("VmHWM") - base
    world = dist.get_world_size() if dist.is_initialized() else 1
    return dict(impl=impl, rank=rank, world=world, classes=args.classes, dim=args.dim, batch=args.batch,
                sample_rate=args.sample_rate, samples_per_s=world * args.batch / (sum(times) / len(times)),
                peak_bytes=peak, loss=float(loss.detach()))


# ----------------------------------------------------------------------------- memory model

def model_bytes(impl: str, classes: int, dim: int, batch_total: int, sample_rate: float, workspace: int = 64 * 2**20):
    """Bytes one rank holds at its peak, by implementation. Both hold fp32
    weights, SGD momentum and a dense weight gradient (3 C x D); then:

    ours: + the sampled rows' gradient K x D from the kernel, the B x D
      embeddings' copies, and the kernel's fixed workspace;
    insightface-style: + the sampled weight copy, its normalized copy and their
      gradients (4 K x D), and the full B x K logits about 6 times (linear
      output, clamp, scale, exp, probabilities, and the gradient).
    """
    per_row = dim * 4
    k = max(math.ceil(sample_rate * classes), 1)
    dense = 3 * classes * per_row  # weight, momentum, weight.grad
    if impl == "ours":
        return dense + k * per_row + 6 * batch_total * per_row + workspace
    return dense + 4 * k * per_row + 6 * batch_total * k * 4 + 6 * batch_total * per_row


def max_classes(impl: str, budget: float, dim: int, batch_total: int, sample_rate: float) -> int:
    lo, hi = 1, 1 << 36
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if model_bytes(impl, mid, dim, batch_total, sample_rate) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def model_report(args) -> None:
    rows = []
    for classes in args.check_classes:
        for impl in ("insightface", "ours"):
            cmd = [sys.executable, __file__, "--impl", impl, "--classes", str(classes), "--dim", str(args.dim),
                   "--batch", str(args.batch), "--sample-rate", str(args.sample_rate), "--steps", "2", "--warmup", "1",
                   "--json-line"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
            measured = json.loads(out)["peak_bytes"]
            predicted = model_bytes(impl, classes, args.dim, args.batch, args.sample_rate)
            rows.append((impl, classes, measured, predicted))
    print(f"memory model vs measured peak on this CPU (D={args.dim}, B={args.batch}, sample_rate={args.sample_rate})")
    print(f"{'implementation':<14} {'classes':>10} {'measured MiB':>13} {'model MiB':>10} {'model/measured':>15}")
    for impl, c, meas, pred in rows:
        print(f"{impl:<14} {c:>10,} {meas / 2**20:>13,.0f} {pred / 2**20:>10,.0f} {pred / meas:>15.2f}")
    budget = 80e9 * 0.95  # leave 5% for the CUDA context and the allocator's slack
    print("\nmost identities on one 80 GB GPU (model; D=512, B=512, fp32 weights, SGD momentum, 95% usable):")
    print(f"{'sample_rate':>11} {'insightface-style':>18} {'ours':>14} {'ratio':>6}")
    for rate in (1.0, 0.3, 0.1):
        a = max_classes("insightface", budget, 512, 512, rate)
        b = max_classes("ours", budget, 512, 512, rate)
        print(f"{rate:>11} {a:>18,} {b:>14,} {b / a:>6.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", choices=["ours", "insightface", "both"], default="both")
    p.add_argument("--classes", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=256, help="rows per rank")
    p.add_argument("--sample-rate", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--model", action="store_true", help="print the memory model, checked against measurements")
    p.add_argument("--check-classes", type=int, nargs="+", default=[50_000, 200_000])
    p.add_argument("--json-line", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.model:
        return model_report(args)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    impls = ["insightface", "ours"] if args.impl == "both" else [args.impl]
    results = []
    for impl in impls:
        if args.impl == "both" and not args.json_line:  # a fresh process each, so peaks are their own
            cmd = [sys.executable, __file__, "--impl", impl, "--json-line"] + sys.argv[1:]
            if dist.is_initialized():
                # One process per rank for both: the second implementation reuses
                # the first's freed heap, so its resident-set peak means nothing.
                result = measure(impl, args)
                if results:
                    result["peak_bytes"] = None
                results.append(result)
                continue
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
            results.append(json.loads(out))
        else:
            results.append(measure(impl, args))
    if args.json_line:
        print(json.dumps(results[-1]))
        return
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        r0 = results[0]
        print(f"PartialFC: C={args.classes:,} D={args.dim} B={args.batch}/rank x {r0['world']} ranks, "
              f"sample_rate={args.sample_rate}, SGD momentum (rank 0's peak)")
        print(f"{'implementation':<14} {'samples/s':>10} {'peak MiB':>10} {'speed':>7} {'memory':>7}")
        base = results[0]
        for r in results:
            peak, ratio = "n/a", "n/a"
            if r["peak_bytes"] is not None and base["peak_bytes"]:
                peak, ratio = f"{r['peak_bytes'] / 2**20:,.0f}", f"{r['peak_bytes'] / base['peak_bytes']:.2f}x"
            print(f"{r['impl']:<14} {r['samples_per_s']:>10,.0f} {peak:>10} "
                  f"{r['samples_per_s'] / base['samples_per_s']:>6.2f}x {ratio:>7}")
        if any(r["peak_bytes"] is None for r in results):
            print("n/a: under torchrun both implementations share each rank's process; run --impl ours and "
                  "--impl insightface separately for their peaks.")
    if dist.is_initialized():
        dist.barrier()  # tear gloo down only once no peer has traffic in flight
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
