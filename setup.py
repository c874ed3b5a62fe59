"""Builds margin_kernels._C from csrc/ (CPU always).

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch
that is already installed instead of fetching another one into an isolated
build environment.
"""
from pathlib import Path

from setuptools import find_packages, setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as exc:  # pragma: no cover - the message is the point
    raise SystemExit(
        "margin_kernels builds against an installed torch. Install torch first "
        "(on a CPU-only machine: pip install torch==2.13.0), then run "
        "pip install --no-build-isolation -e ."
    ) from exc

ROOT = Path(__file__).parent

cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math"]

ext_modules = [
    CppExtension(
        name="margin_kernels._C",
        sources=[
            "csrc/bindings.cpp",
            "csrc/cpu/margin_ce_cpu.cpp",
            "csrc/cpu/row_epilogue.cpp",
        ],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
]

setup(
    name="margin_kernels",
    version="0.1.0",
    description="Fused margin-softmax losses (ArcFace, CosFace, ElasticFace) that never build the logits matrix",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["margin_kernels", "margin_kernels.*"]),
    # torch is deliberately absent: listing it lets pip replace a CPU or
    # site-specific build with the registry's CUDA wheel. setup.py imports it.
    install_requires=["numpy"],
    extras_require={
        "test": ["pytest", "triton"],
        "demo": ["scikit-learn", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
