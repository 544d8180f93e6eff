"""Build of the C extension ``llmwire._native`` (everything else is in setup.cfg)."""

import os
import sys

from setuptools import Extension, setup

extra_compile_args = []
if sys.platform != "win32":
    # -ffp-contract=off: no fused multiply-add, so the kernels round exactly as
    # the NumPy reference does (bit-for-bit agreement is tested).
    extra_compile_args = ["-O3", "-std=c11", "-ffp-contract=off", "-fno-math-errno",
                          "-Wall", "-Wextra", "-Wno-unused-parameter"]

native = Extension(
    "llmwire._native",
    sources=[os.path.join("csrc", name) for name in ("module.c", "kernels.c", "kernels_x86.c")],
    depends=[os.path.join("csrc", "kernels.h")],
    extra_compile_args=extra_compile_args,
)

setup(ext_modules=[native])
