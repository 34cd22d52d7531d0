"""Build of the C extension asyncdiff._core.

Project metadata lives in pyproject.toml; this file only describes the
extension, and it is the one place that says how C in csrc/ is compiled:
the C tests (tests/cbuild.py) read CORE_SOURCES, COMPILE_ARGS and the rest
from here.  Importing or running it with another __name__ builds nothing;
setuptools' build backend runs it as __main__.

Add a new C file of the module to CORE_SOURCES and its header to
CORE_HEADERS (headers are listed so that they land in the sdist and a change
to one rebuilds the module).
"""
import sys

import numpy
from setuptools import Extension, setup

# Every C file compiled into asyncdiff._core.  The _*.c files are the
# binding (the only ones that include Python.h); the others are plain C (see
# csrc/status.h).
CORE_SOURCES = [
    "csrc/_coremodule.c",
    "csrc/_convert.c",
    "csrc/_schedule_type.c",
    "csrc/_shm_type.c",
    "csrc/_nccl_type.c",
    "csrc/partition.c",
    "csrc/schedule.c",
    "csrc/shm.c",
    "csrc/shm_data.c",
    "csrc/shm_live.c",
    "csrc/gpu.c",
    "csrc/nccl.c",
]

CORE_HEADERS = [
    "csrc/_coremodule.h",
    "csrc/status.h",
    "csrc/partition.h",
    "csrc/schedule.h",
    "csrc/shm.h",
    "csrc/shm_internal.h",
    "csrc/gpu.h",
    "csrc/nccl.h",
]

INCLUDE_DIRS = ["csrc", numpy.get_include()]

# The flags of every C build: the module and the C test programs alike
# (tests add sanitizers or -Werror on top).
COMPILE_ARGS = ["-O2", "-std=c11", "-Wall", "-Wextra"]

LIBRARIES = []
if sys.platform.startswith("linux"):
    # dl: GPU libraries (NCCL, CUDA runtime) are opened at run time with
    # dlopen.  rt: shm_open and friends on glibc older than 2.34.
    LIBRARIES += ["dl", "rt"]


def core_extension() -> Extension:
    return Extension(
        "asyncdiff._core",
        sources=CORE_SOURCES,
        depends=CORE_HEADERS,
        include_dirs=INCLUDE_DIRS,
        extra_compile_args=COMPILE_ARGS,
        libraries=LIBRARIES,
    )


if __name__ == "__main__":
    setup(ext_modules=[core_extension()])
