"""The benchmark behind ``python -m margin_kernels.bench``: see cli.py for the
command line, worker.py for how one measurement is taken."""
from .cli import SIZES, available_impls, main, parse_args
from .memory import mem_available, reset_peak, rss_status
from .report import format_overheads, format_scale, format_table, plot, useful_tflops
from .steps import BASELINES, CPP_GEMMS, FLOOR, FLOORS, make_step
from .worker import Case, Result, run_case, spawn

__all__ = [
    "BASELINES", "CPP_GEMMS", "Case", "FLOOR", "FLOORS", "Result", "SIZES", "available_impls", "format_overheads",
    "format_scale", "format_table", "main",
    "make_step", "mem_available", "parse_args", "plot", "reset_peak", "rss_status", "run_case", "spawn",
    "useful_tflops",
]
