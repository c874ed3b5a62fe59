"""Builds margin_kernels._C from csrc/: the CPU kernels always, the CUDA kernels
where torch was built with CUDA and nvcc is found.

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch
that is already installed instead of fetching another one into an isolated
build environment.
"""
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - the message is the point
    raise SystemExit(
        "margin_kernels builds against an installed torch. Install torch first "
        "(on a CPU-only machine: pip install torch==2.13.0), then run "
        "pip install --no-build-isolation -e ."
    ) from exc

ROOT = Path(__file__).parent

cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math"]
sources = ["csrc/bindings.cpp", "csrc/cpu/margin_ce_cpu.cpp", "csrc/cpu/row_epilogue.cpp"]

# CUDA kernels only where torch itself was built with CUDA and nvcc is found;
# MARGIN_KERNELS_NO_CUDA=1 forces a CPU-only build.
with_cuda = (
    torch.version.cuda is not None
    and (CUDA_HOME is not None or shutil.which("nvcc") is not None)
    and os.environ.get("MARGIN_KERNELS_NO_CUDA", "0") != "1"
)
if with_cuda:
    arch_flags = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    extension = CUDAExtension(
        name="margin_kernels._C",
        sources=sources + ["csrc/cuda/margin_ce_cuda.cpp", "csrc/cuda/epilogue.cu"],
        define_macros=[("MK_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", *arch_flags]},
        extra_link_args=["-fopenmp"],
    )
else:
    extension = CppExtension(
        name="margin_kernels._C",
        sources=sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
ext_modules = [extension]

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
