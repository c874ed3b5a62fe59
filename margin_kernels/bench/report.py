"""Tables and plots of the measurements."""
from __future__ import annotations

import sys
import time

from .steps import weight_rows
from .worker import Result


class Progress:
    """A one-line progress bar on stderr (plain lines when not a terminal)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, label: str) -> None:
        self.done += 1
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        elapsed = time.perf_counter() - self.t0
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {elapsed:5.0f}s  {label}"
        sys.stderr.write(("\r" + line.ljust(100)) if self.tty else line + "\n")
        if self.tty and self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def useful_tflops(r: Result) -> float:
    """6 B D C useful FLOPs of a fwd+bwd (three B x D x C GEMMs) over the time;
    C counts weight rows (3 per class with sub-centers)."""
    c = r.case
    return 6 * c.batch * c.dim * weight_rows(c.margin, c.classes) / (r.time_ms * 1e-3) / 1e12


WIDE_SPREAD = 0.25  # (max - min) / median above which a row's timing is flagged


def spread(r: Result) -> float:
    """(max - min) / median of the timed repeats."""
    return (max(r.times_ms) - min(r.times_ms)) / r.time_ms if r.times_ms else 0.0


def format_table(results: list[Result], naive: str = "reference") -> str:
    """One row per (C, implementation): the median time with the min-max of the
    repeats, and ratios against the naive baseline of the same C. Rows whose
    repeats spread by more than 25% are marked '!'."""
    head = (f"{'classes':>10} {'implementation':<16} {'fwd+bwd ms':>11} {'(min-max)':>17} {'TFLOP/s':>8} "
            f"{'speedup':>8} {'workspace MiB':>14} {'/ naive':>8}")
    lines = [head, "-" * len(head)]
    by_c: dict[int, list[Result]] = {}
    for r in results:
        by_c.setdefault(r.case.classes, []).append(r)
    for c, rows in by_c.items():
        base = next((r for r in rows if r.case.impl == naive and r.status == "ok"), None)
        for r in rows:
            if r.status != "ok":
                lines.append(f"{c:>10,} {r.case.impl:<16} {r.status.upper():>11} {'':>17} {'':>8} {'':>8} {'':>14} "
                             f"{'':>8}  {r.message[:60]}")
                continue
            speed = f"{base.time_ms / r.time_ms:.2f}x" if base else "n/a"
            if r.workspace_bytes is None:
                mem, ratio = "-", ""
            else:
                mem = mib(r.workspace_bytes)
                ratio = f"{r.workspace_bytes / base.workspace_bytes:.3f}" if base and base.workspace_bytes else "n/a"
            span = f"({min(r.times_ms):,.1f}-{max(r.times_ms):,.1f})"
            flag = " !" if spread(r) > WIDE_SPREAD else ""
            lines.append(f"{c:>10,} {r.case.impl:<16} {r.time_ms:>11,.1f} {span:>17} {useful_tflops(r):>8.3f} "
                         f"{speed:>8} {mem:>14} {ratio:>8}{flag}")
    wide = [r for r in results if r.status == "ok" and spread(r) > WIDE_SPREAD]
    if wide:
        lines.append(f"! {len(wide)} row(s) spread by more than {WIDE_SPREAD:.0%} of their median: the machine was "
                     "busy or the repeats too few (--repeat); compare those rows with care.")
    return "\n".join(lines)


LEGEND = {
    "gemm-floor": "gemm-floor = the three bare B x D x C GEMMs an exact loss needs, in the input dtype at full size "
                  "(a floor for the loss at its own sizes, not a bound on ours: cpp runs its GEMMs on class blocks "
                  "in float32, whose blocking can beat one large GEMM on a CPU)",
    "cpp-gemms": "cpp-gemms = the GEMMs cpp runs here, at its block sizes, without its epilogues",
    "triton-split": "triton-split = triton with the split backward (a dW kernel without atomics and a dx kernel)",
    "insightface": "insightface = arcface_torch's recipe (logits, in-place margin, cross-entropy)",
    "cce": "cce = apple's cut-cross-entropy (its default gradient filtering)",
    "liger": "liger = Liger-Kernel's fused linear cross-entropy",
}


def format_legend(results: list[Result], naive: str) -> str:
    """What the columns and the implementations that ran mean."""
    ran = dict.fromkeys(r.case.impl for r in results)
    parts = [f"speedup = {naive} time / time", "TFLOP/s counts 6 B D C useful FLOPs (C: weight rows)",
             "workspace = peak memory beyond inputs and gradient outputs"]
    parts += [text for impl, text in LEGEND.items() if impl in ran]
    return "; ".join(parts) + "."


def format_conclusion(results: list[Result], naive: str) -> str:
    """One line per fused backend that ran: its time and workspace against the
    naive baseline at the largest C where both ran."""
    ok = {(r.case.impl, r.case.classes): r for r in results if r.status == "ok"}
    lines = []
    for impl in dict.fromkeys(r.case.impl for r in results):
        if impl not in ("cpp", "triton", "triton-split"):
            continue
        shared = [c for (i, c) in ok if i == impl and (naive, c) in ok]
        if not shared:
            continue
        c = max(shared)
        mine, base = ok[impl, c], ok[naive, c]
        mem = ""
        if mine.workspace_bytes is not None and base.workspace_bytes:
            mem = f", with {mine.workspace_bytes / base.workspace_bytes:.0%} of its workspace,"
        lines.append(f"{impl}: {base.time_ms / mine.time_ms:.1f}x faster than {naive}{mem} at {c:,} classes.")
    return "\n".join(lines)


def format_overheads(results: list[Result]) -> str:
    """Time of each fused backend over the bare GEMMs, per C: cpp and triton over
    the three-GEMM floor, and cpp over its own four block GEMMs (its epilogue cost)."""
    pairs = [("cpp", "gemm-floor"), ("cpp", "cpp-gemms"), ("triton", "gemm-floor"), ("triton-split", "gemm-floor")]
    ok = {(r.case.impl, r.case.classes): r.time_ms for r in results if r.status == "ok"}
    lines = []
    for c in dict.fromkeys(r.case.classes for r in results):
        ratios = [f"{a} / {b} = {ok[a, c] / ok[b, c]:.2f}x" for a, b in pairs if (a, c) in ok and (b, c) in ok]
        if ratios:
            lines.append(f"  C={c:,}: " + ", ".join(ratios))
    return "time over bare GEMMs:\n" + "\n".join(lines) if lines else ""


def plot(results: list[Result], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: bash scripts/install.sh demo (or pip install matplotlib)") from exc
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    impls = list(dict.fromkeys(r.case.impl for r in results))
    for impl in impls:
        rows = sorted((r for r in results if r.case.impl == impl), key=lambda r: r.case.classes)
        ok = [r for r in rows if r.status == "ok"]
        failed = [r for r in rows if r.status == "oom"]
        (line,) = ax_t.plot([r.case.classes for r in ok], [r.time_ms for r in ok], marker="o", label=impl)
        mem = [r for r in ok if r.workspace_bytes]
        if mem:
            ax_m.plot([r.case.classes for r in mem], [r.workspace_bytes / 2**20 for r in mem], marker="o",
                      color=line.get_color(), label=impl)
        for ax in (ax_t, ax_m):
            for r in failed:
                ax.axvline(r.case.classes, color=line.get_color(), ls=":", lw=1)
                ax.annotate(f"{impl} OOM", (r.case.classes, 0.95), xycoords=("data", "axes fraction"),
                            rotation=90, fontsize=7, color=line.get_color(), va="top")
    for ax, label in ((ax_t, "fwd+bwd time (ms)"), (ax_m, "peak workspace (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of classes C")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def format_scale(found, budget_gib: float, naive: str = "reference") -> str:
    base = next((c for impl, c, _ in found if impl == naive), 0)
    head = f"{'implementation':<16} {'max classes':>14} {'/ naive':>8}   (budget {budget_gib:g} GiB)"
    lines = [head, "-" * len(head)]
    for impl, c, _ in found:
        ratio = f"{c / base:.1f}x" if base else "n/a"
        lines.append(f"{impl:<16} {c:>14,} {ratio:>8}")
    return "\n".join(lines)
