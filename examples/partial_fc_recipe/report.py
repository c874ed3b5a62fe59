"""What a run shows: a progress line, and the figure of loss and verification."""
from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress bar on a terminal, a line per tenth of the run otherwise."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total, self.start, self.enabled = total, start, enabled
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, lr: float) -> None:
        if not self.enabled:
            return
        done = step - self.start
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        bar = "#" * (30 * step // self.total)
        line = (f"[{bar:<30}] step {step}/{self.total}  loss {loss:7.3f}  lr {lr:.4f}  "
                f"{rate:5.1f} steps/s  eta {eta:4.0f} s")
        if self.tty:
            sys.stderr.write("\r" + line)
            if step == self.total:
                sys.stderr.write("\n")
        elif step == self.total or (step * 10) // self.total != ((step - 1) * 10) // self.total:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(("\n" if self.tty else "") + text + "\n")


def plot(runs: dict[str, dict], path: str) -> None:
    """Loss and verification against steps, one line per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib)", file=sys.stderr)
        return
    fig, (ax_loss, ax_acc, ax_roc) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, history in runs.items():
        ax_loss.plot(range(1, len(history["loss"]) + 1), history["loss"], label=name, linewidth=0.8)
        evals = history["evals"]
        if evals:
            steps = [e["step"] for e in evals]
            line, = ax_acc.plot(steps, [e["accuracy"] for e in evals], marker="o", label=f"{name}: accuracy")
            if "tar@far=0.001" in evals[-1]:
                ax_acc.plot(steps, [e.get("tar@far=0.001", float("nan")) for e in evals], marker="x",
                            linestyle="--", color=line.get_color(), label=f"{name}: TAR@FAR=1e-3")
            roc = evals[-1]["roc"]
            ax_roc.plot([p[0] for p in roc], [p[1] for p in roc], label=name)
    ax_loss.set(xlabel="step", ylabel="training loss", title="PartialFC loss (global batch)")
    ax_acc.set(xlabel="step", ylabel="held-out identities", title="1:1 verification", ylim=(0, 1.02))
    ax_roc.set(xscale="log", xlabel="FAR", ylabel="TAR", title="ROC at the end", xlim=(1e-4, 1), ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc, ax_roc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
