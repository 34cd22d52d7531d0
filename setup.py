"""Build of the C extension asyncdiff._core.

Project metadata lives in pyproject.toml; this file only describes the
extension.  Add new C files to CORE_SOURCES (one list, nothing else to edit).
"""
import sys

import numpy
from setuptools import Extension, setup

# Every C file compiled into asyncdiff._core.  _coremodule.c is the only one
# that includes Python.h; the others are plain C (see csrc/status.h).
CORE_SOURCES = [
    "csrc/_coremodule.c",
    "csrc/partition.c",
    "csrc/schedule.c",
    "csrc/shm.c",
    "csrc/gpu.c",
    "csrc/nccl.c",
]

extra_compile_args = ["-O2", "-std=c11", "-Wall", "-Wextra"]
libraries = []
if sys.platform.startswith("linux"):
    # dl: GPU libraries (NCCL, CUDA runtime) are opened at run time with
    # dlopen.  rt: shm_open and friends on glibc older than 2.34.
    libraries += ["dl", "rt"]

core = Extension(
    "asyncdiff._core",
    sources=CORE_SOURCES,
    include_dirs=["csrc", numpy.get_include()],
    extra_compile_args=extra_compile_args,
    libraries=libraries,
)

setup(ext_modules=[core])
