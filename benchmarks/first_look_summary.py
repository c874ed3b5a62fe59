"""One screen of a gpu_run.sh first-look: the machine, the build, the large-C
check, both benchmark tables and the test counts, as markdown.

    python3 benchmarks/first_look_summary.py gpu_results > summary.md
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _table(path: Path) -> str:
    """The table lines of a bench text output (from its title to the legend);
    for a run cut off before its table, the rows it finished (its progress
    lines). The autotuner's choices are left in the text file."""
    if not path.exists():
        return "(not run)"
    text = _read(path)
    if not text.strip():
        return "(cut off or failed before its first row: see its step above)"
    lines = [line for line in text.splitlines() if not line.startswith("  [")]  # autotuner lines
    if not any(line.startswith("speedup =") for line in lines):
        done = [line for line in lines if line.startswith("[")]
        return "\n".join(["(cut off before its table: the rows it finished)"] + done[-40:])
    keep = [line for line in lines if not line.startswith(("measurements written", "plot written", "["))]
    return "\n".join(keep[-40:])


def summarize(out: Path) -> str:
    lines = ["# first look", "", "```", _read(out / "gpu.txt").strip(), "```", ""]
    steps = _read(out / "steps.txt").strip()
    cut = [line.split("] ", 1)[-1].split(":")[0] for line in steps.splitlines() if "CUT OFF" in line]
    lines += ["## Steps", "", "```", steps or "(none ran)", "```", "",
              f"Cut off by their budgets: {', '.join(cut)}." if cut else "No step was cut off.", ""]
    lines += ["## Large-C check (fused loss against a float32 oracle)", ""]
    large = out / "large_c.json"
    if large.exists():
        data = json.loads(large.read_text())
        lines.append(f"B={data['batch']} D={data['dim']} C={data['classes']:,} {data['dtype']} on {data['device']}, "
                     f"tolerance {data['tolerance']:g}" + ("" if data.get("complete", True) else
                                                          " (cut off: the backends it finished)"))
        lines += ["", "| backend | verdict | loss | dx | dW | seconds |", "|---|---|---|---|---|---|"]
        for r in data["rows"]:
            if "loss" in r:
                lines.append(f"| {r['backend']} | {'PASS' if r['ok'] else 'FAIL'} | {r['loss']:.1e} | {r['dx']:.1e} | "
                             f"{r['dW']:.1e} | {r['seconds']} |")
            else:
                lines.append(f"| {r['backend']} | FAIL | {r.get('error', '')} | | | |")
    else:
        lines.append("(no backend finished: see large_c.txt)" if (out / "large_c.txt").exists() else "(not run)")
    for name, title in (("bench_margin", "ArcFace fwd+bwd"), ("bench_plain", "Plain linear cross-entropy (peers)")):
        lines += ["", f"## {title}", "", "```", _table(out / f"{name}.txt"), "```"]
    tests = _read(out / "tests.txt")
    if tests:  # (PHASE=tests, a call of its own)
        counts = re.findall(r"^(?:=+ )?(\d+ (?:passed|failed|tests collected).*?)(?: in [\d.]+s.*)?$", tests, re.M)
        lines += ["", "## Tests", "", counts[-1] if counts else "(no result; see tests.txt)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_results")), end="")
