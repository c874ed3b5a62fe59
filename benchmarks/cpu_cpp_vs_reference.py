"""The C++ backend against the naive reference on this CPU (RESULTS.md §1).

B=512, D=256, float32, ArcFace, C in {50k, 200k, 1M}: fwd+bwd time and peak
workspace side by side in one run, with the three bare GEMMs as the time floor.

    python3 benchmarks/cpu_cpp_vs_reference.py [extra margin_kernels.bench flags]
"""
import sys

from margin_kernels.bench import main

if __name__ == "__main__":
    sys.exit(main(["--size", "large", "--backends", "reference", "cpp", "gemm-floor", "--repeat", "2", *sys.argv[1:]]))
