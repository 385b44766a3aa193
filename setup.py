#!/usr/bin/env python
"""
Build and install wsis_d2 with its C++/CUDA extension ``wsis_d2._C``.

Install with ``pip install --no-build-isolation -e .`` so that the extension compiles against the
torch of the current environment (build isolation would fetch another torch).

The CUDA kernels are compiled when a GPU and a CUDA toolkit are visible, or when ``FORCE_CUDA=1``
(compile-only machines: set ``TORCH_CUDA_ARCH_LIST`` and ``CUDA_HOME`` too; see the Makefile).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_include_dirs():
    # pip's CUDA 13 wheels carry the runtime headers that nvcc needs next to torch
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))


def get_extensions():
    csrc = os.path.join("wsis_d2", "layers", "csrc")
    sources = [os.path.join(csrc, "vision.cpp")] + sorted(
        glob.glob(os.path.join(csrc, "*", "*.cpp"))
    )
    cuda_sources = sorted(glob.glob(os.path.join(csrc, "*", "*.cu")))
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    use_cuda = force_cuda or (torch.cuda.is_available() and CUDA_HOME is not None)

    extension = CppExtension
    define_macros = []
    extra_compile_args = {"cxx": ["-O3", "-fopenmp"]}
    include_dirs = [os.path.join(HERE, csrc)]
    if use_cuda:
        if CUDA_HOME is None:
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
        extension = CUDAExtension
        sources += cuda_sources
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
        include_dirs += _cuda_include_dirs()
        print(f"wsis_d2: building CUDA kernels (TORCH_CUDA_ARCH_LIST="
              f"{os.environ.get('TORCH_CUDA_ARCH_LIST', 'auto')})")
    else:
        print("wsis_d2: building CPU kernels only (set FORCE_CUDA=1 to compile the CUDA ones)")

    return [
        extension(
            "wsis_d2._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    name="wsis_d2",
    version="0.1.0",
    description="Weakly supervised counting and instance segmentation for Detectron2 "
    "(LC/ILC, density-map counting, CCGR)",
    packages=find_packages(exclude=("configs", "tests*", "tools*")),
    python_requires=">=3.10",
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)},
)
