"""csrc/gpu.h against the real CUDA and NCCL headers and libraries, without a GPU.

* ABI: ``csrc/tests/abi_check.c`` includes the real ``cuda_runtime_api.h``
  and ``nccl.h`` next to ``gpu.h`` and asserts (``_Static_assert``) every
  size, offset, enum value and constant gpu.h declares, and each of the
  table's functions against the real declaration; ``abi_check.cc`` compares
  each parameter's size and kind (where a C++ compiler exists).  It runs for
  every pair of header folders found: the pip wheels of the ``test`` extra
  (nvidia-nccl-cu13, nvidia-cuda-runtime, nvidia-cuda-crt, nvidia-cuda-cccl),
  a CUDA toolkit (``$CUDA_HOME``, ``/usr/local/cuda``, ``nvcc`` on the
  PATH), and the pairs named in ``ASYNCDIFF_ABI_HEADERS``
  (``NCCL_INCLUDE=CUDA_INCLUDE[:CUDA_INCLUDE...]``, pairs separated by
  ``;``: how other NCCL/CUDA versions are checked).  Changing a declaration
  of gpu.h makes it fail (checked here on a copy).
* The real libraries: ``csrc/tests/real_libs.c`` loads the wheels' NCCL and
  CUDA runtime through ``csrc/gpu.c`` and calls every entry point whose
  answer needs no GPU; ``asyncdiff._core.gpu_status()`` names both files and
  versions, and on a machine without a driver says so.
* The other side of it: the extension itself is built without any CUDA or
  NCCL header and links neither library (everything goes through dlsym).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from asyncdiff import _core
from cbuild import CSRC, build, compiler, cxx_args, cxx_compiler, try_build

TESTS_C = CSRC / "tests"
GPU_SOURCES = [CSRC / "gpu.c", CSRC / "nccl.c"]
ABI_C, ABI_CXX = TESTS_C / "abi_check.c", TESTS_C / "abi_check.cc"
WERROR = ["-Werror"]
INSTALL_HINT = ("pip install -e '.[test]' installs them (nvidia-nccl-cu13, nvidia-cuda-runtime, "
                "nvidia-cuda-crt, nvidia-cuda-cccl)")


def _python_dirs() -> list[Path]:
    seen, out = set(), []
    for entry in sys.path:
        path = Path(entry or ".").resolve()
        if path.is_dir() and path not in seen:
            seen.add(path)
            out.append(path)
    return out


def _define(header: Path, name: str) -> int | None:
    found = re.search(rf"^#define\s+{name}\s+(\d+)", header.read_text(errors="replace"), re.M)
    return int(found.group(1)) if found else None


def nccl_version(include: Path) -> tuple[int, int, int]:
    h = include / "nccl.h"
    return _define(h, "NCCL_MAJOR"), _define(h, "NCCL_MINOR"), _define(h, "NCCL_PATCH")


def cuda_version(includes: list[Path]) -> str:
    code = _define(includes[0] / "cuda_runtime_api.h", "CUDART_VERSION") or 0
    return f"{code // 1000}.{code % 1000 // 10}"


def nccl_wheels() -> list[tuple[Path, Path]]:
    """(site folder, include folder) of every nvidia-nccl wheel on sys.path."""
    return [(d, d / "nvidia/nccl/include") for d in _python_dirs() if (d / "nvidia/nccl/include/nccl.h").is_file()]


def cuda_include_sets() -> list[list[Path]]:
    """Folders that make cuda_runtime_api.h and cuda_fp16.h compile: the
    wheels' (CUDA 13: one folder; CUDA 12: runtime + nvcc's crt + cccl) and
    the toolkits'."""
    sets, seen = [], set()
    for d in _python_dirs():
        if (d / "nvidia/cu13/include/cuda_runtime_api.h").is_file():
            sets.append([d / "nvidia/cu13/include"])
        if (d / "nvidia/cuda_runtime/include/cuda_runtime_api.h").is_file():
            sets.append([p for p in (d / "nvidia/cuda_runtime/include", d / "nvidia/cuda_nvcc/include",
                                     d / "nvidia/cuda_cccl/include") if p.is_dir()])
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             str(Path(nvcc).resolve().parent.parent) if nvcc else None]
    for home in filter(None, homes):
        inc = Path(home) / "include"
        if (inc / "cuda_runtime_api.h").is_file() and inc.resolve() not in seen:
            seen.add(inc.resolve())
            sets.append([inc])
    return sets


def header_pairs() -> list[tuple[Path, list[Path]]]:
    """(NCCL include folder, CUDA include folders) to check."""
    pairs = [(inc, cuda) for _, inc in nccl_wheels() for cuda in cuda_include_sets()]
    for item in filter(None, os.environ.get("ASYNCDIFF_ABI_HEADERS", "").split(";")):
        nccl, _, cuda = item.partition("=")
        pairs.append((Path(nccl), [Path(p) for p in cuda.split(":") if p]))
    return pairs


PAIRS = header_pairs()
IDS = ["nccl{}.{}.{}-cuda{}".format(*nccl_version(n), cuda_version(c)) for n, c in PAIRS]


def _flags(nccl: Path, cuda: list[Path]) -> list[str]:
    return [*(f for d in cuda for f in ("-isystem", str(d))), f'-DAD_REAL_NCCL_H="{nccl / "nccl.h"}"']


def table_size() -> int:
    """Entries of AD_GPU_FUNCTIONS, counted in the header's text."""
    return len(re.findall(r"^\s*X\((?:CUDART|NCCL),", (CSRC / "gpu.h").read_text(), re.M))


def test_real_headers_found():
    assert PAIRS, f"no nccl.h / cuda_runtime_api.h found on sys.path or in a CUDA toolkit; {INSTALL_HINT}"


@pytest.mark.parametrize("nccl, cuda", PAIRS, ids=IDS)
def test_abi_c(tmp_path, nccl, cuda):
    exe = build(compiler(), [ABI_C], tmp_path / "abi_check", extra=[*WERROR, *_flags(nccl, cuda)])
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    major, minor, patch = nccl_version(nccl)
    assert ran.stdout.startswith(f"ABI ok: {table_size()} functions"), ran.stdout
    assert f"NCCL {major}.{minor}.{patch} headers" in ran.stdout and f"CUDA runtime {cuda_version(cuda)}" in ran.stdout
    print(ran.stdout.strip())


def _cxx_check(nccl, cuda, extra=()):
    cxx = cxx_compiler()
    if cxx is None:
        pytest.skip("no C++ compiler ($CXX, g++, c++, clang++): the per-parameter check needs one "
                    "(the C check ran)")
    cmd = [cxx, *cxx_args(), *WERROR, "-fsyntax-only", *extra, "-I", str(CSRC), *_flags(nccl, cuda), str(ABI_CXX)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("nccl, cuda", PAIRS, ids=IDS)
def test_abi_cxx_per_parameter(nccl, cuda):
    ran = _cxx_check(nccl, cuda)
    assert ran.returncode == 0, ran.stderr


# A declaration of gpu.h changed, and what the check must then say.
MUTATIONS = {
    "enum value": ("AD_NCCL_INVALID_USAGE = 5", "AD_NCCL_INVALID_USAGE = 6",
                   "AD_NCCL_INVALID_USAGE != ncclInvalidUsage", False),
    "CUDA error code": ("AD_CUDA_ERROR_NOT_READY = 600", "AD_CUDA_ERROR_NOT_READY = 601",
                        "AD_CUDA_ERROR_NOT_READY != cudaErrorNotReady", False),
    "flag constant": ("AD_CUDA_EVENT_DISABLE_TIMING 0x02u", "AD_CUDA_EVENT_DISABLE_TIMING 0x04u",
                      "AD_CUDA_EVENT_DISABLE_TIMING != cudaEventDisableTiming", False),
    "struct layout": ("int maxCTAs;", "int maxCTAs;\n    int extra;", "ncclConfig_t.netName offset or size", False),
    "parameter type": ("cudaSetDevice, (int device)", "cudaSetDevice, (long device)",
                       "cudaSetDevice: the signature in gpu.h differs", True),
    "parameter count": ("(ad_cuda_stream stream, ad_cuda_event event, unsigned int flags)",
                        "(ad_cuda_stream stream, ad_cuda_event event)",
                        "cudaStreamWaitEvent: the signature in gpu.h differs", True),
}


@pytest.mark.parametrize("what", list(MUTATIONS))
def test_abi_check_catches_a_changed_declaration(tmp_path, what):
    if not PAIRS:
        pytest.fail(f"no headers to check against; {INSTALL_HINT}")
    old, new, message, signature = MUTATIONS[what]
    text = (CSRC / "gpu.h").read_text()
    assert text.count(old) == 1, f"gpu.h no longer contains {old!r}: update the mutation"
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "gpu.h").write_text(text.replace(old, new))
    nccl, cuda = PAIRS[0]
    # -iquote: the changed gpu.h is found before csrc/'s (status.h still from csrc/)
    got = try_build(compiler(), [ABI_C], tmp_path / "abi_check", extra=["-iquote", str(changed), *_flags(nccl, cuda)])
    assert got.returncode != 0 and message in got.stderr, got.stderr[-3000:]
    if signature:  # the per-parameter check sees it too, on its own
        ran = _cxx_check(nccl, cuda, extra=["-iquote", str(changed)])
        assert ran.returncode != 0 and what.split()[-1] in ran.stderr, ran.stderr[-3000:]


# ------------------------------------------- the build: no GPU header, no link

def test_extension_does_not_link_cuda_or_nccl():
    so = Path(_core.__file__)
    readelf = shutil.which("readelf")
    nm = shutil.which("nm")
    if readelf is None or nm is None:
        pytest.skip("readelf/nm (binutils) not installed")
    dynamic = subprocess.run([readelf, "-d", str(so)], capture_output=True, text=True, check=True).stdout
    needed = [line for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert not any("cuda" in line or "nccl" in line for line in needed), needed
    undefined = subprocess.run([nm, "-D", "--undefined-only", str(so)], capture_output=True, text=True,
                               check=True).stdout.split()
    gpu = [s for s in undefined if re.match(r"(cuda|nccl|cu[A-Z])", s)]
    assert not gpu, f"linked against GPU symbols: {gpu}"
    assert "dlopen" in " ".join(undefined) and "dlsym" in " ".join(undefined)


def test_c_sources_need_no_gpu_headers():
    binding = sorted(CSRC.glob("_*.[ch]"))
    for src in [*GPU_SOURCES, CSRC / "gpu.h", CSRC / "nccl.h", *binding]:
        for line in src.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith("#include"):
                assert not any(h in stripped for h in ("cuda", "nccl.h>", "<nccl", "nvrtc")), f"{src.name}: {line}"


def test_gpu_sources_compile_alone(tmp_path):
    """gpu.c and nccl.c are plain C: -Werror -Wpedantic with only csrc/ on the include path."""
    cc = compiler()
    for src in GPU_SOURCES:
        build(cc, [src], tmp_path / (src.stem + ".o"), extra=[*WERROR, "-Wpedantic", "-c"])


# ------------------------------------------------------ the real libraries

def _wheel_with_libraries():
    for site, inc in nccl_wheels():
        if (site / "nvidia/nccl/lib/libnccl.so.2").is_file():
            return site, inc
    pytest.fail(f"no nvidia-nccl wheel with lib/libnccl.so.2 on sys.path; {INSTALL_HINT}")


def _driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def test_real_libraries_through_the_loader(tmp_path):
    site, inc = _wheel_with_libraries()
    major, minor, patch = nccl_version(inc)
    exe = build(compiler(), [TESTS_C / "real_libs.c", TESTS_C / "check.c", CSRC / "gpu.c"], tmp_path / "real_libs",
                extra=[*WERROR, "-g"], libs=["-ldl", "-pthread"])
    ran = subprocess.run([str(exe), str(site), str(major * 10000 + minor * 100 + patch)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "NCCL_DEBUG": "WARN"})
    report = ran.stdout + ran.stderr
    assert ran.returncode == 0 and ran.stdout.rstrip().endswith(" passed, 0 failed"), report
    called = int(re.search(r"(\d+) of the table's entry points called", ran.stdout).group(1))
    assert called >= 15, report
    print(report)


def test_gpu_status_names_the_real_libraries():
    """The done-when of the loader: a fresh process, nothing set, names both files and versions."""
    site, inc = _wheel_with_libraries()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCDIFF_")}
    ran = subprocess.run([sys.executable, "-c", "import asyncdiff._core as c; print(c.gpu_status())"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert ran.returncode == 0, ran.stderr
    status = ran.stdout.strip()
    found = re.search(r"NCCL (\d+\.\d+\.\d+) from (\S+) \(", status)
    assert found, status
    assert Path(found.group(2)).resolve() == (site / "nvidia/nccl/lib/libnccl.so.2").resolve(), status
    assert found.group(1) == "{}.{}.{}".format(*nccl_version(inc)), status
    assert re.search(r"CUDA runtime \d+\.\d+ from /\S+/libcudart\.so\.\d+", status), status
    if not _driver_present():
        assert "no NVIDIA driver (libcuda.so.1) found" in status and "insufficient" not in status, status
    print(status)


# ------------------------------------------- benchmarks/gpu_acceptance.py

NEEDS_GPU = ("loader", "shm-2proc", "multi-device", "nccl-self", "nccl-timeout", "nccl-inflight", "timing",
             "nccl-2gpu", "cfg-shm", "cfg-2gpu", "e2e-2gpu", "devices-2gpu")


def test_gpu_acceptance_script_on_cpu():
    """Without a GPU the acceptance script goes as far as it can, says per line what needs a GPU, exits 0.
    (abi is this file; emulation, which runs on the CPU instead, takes ~10 s more: both left out here.)"""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run benchmarks/gpu_acceptance.py itself (minutes)")
    script = CSRC.parent / "benchmarks" / "gpu_acceptance.py"
    ran = subprocess.run([sys.executable, str(script), "--skip", "abi,emulation"], capture_output=True,
                         text=True, timeout=600, cwd=CSRC.parent)
    report = ran.stdout + ran.stderr[-3000:]
    assert ran.returncode == 0, report
    lines = {m[1]: (m[0], m[2]) for m in re.findall(r"^(PASS|FAIL|SKIP) (\S+): (.*)$", ran.stdout, re.M)}
    assert set(lines) == set(NEEDS_GPU), report
    for name in NEEDS_GPU:
        assert lines[name][0] == "SKIP" and "needs a GPU" in lines[name][1], (name, lines[name])
    for name in ("nccl-self", "nccl-timeout", "nccl-inflight"):  # the real libraries were asked
        assert "the real libraries answer: no usable CUDA device" in lines[name][1], lines[name]
    assert re.search(r"found NCCL \d+\.\d+\.\d+ from /\S+libnccl\.so\.2", lines["loader"][1]), lines["loader"]
    table = ran.stdout[ran.stdout.index("| check"):]
    assert all(f"| {name} " in table for name in lines), table
