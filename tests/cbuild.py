"""Building and running the C core's own test programs (shared by the C tests).

One place for the compiler lookup, the build command, the sanitizer flags
and environment, the probe that tells whether sanitized programs can run on
this machine, and the markers of a sanitizer report.  The compile flags are
setup.py's (COMPILE_ARGS): a test adds sanitizers or -Werror on top, never
its own copy of the base flags.
"""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

# setup.py builds nothing unless run as __main__.
_SETUP = runpy.run_path(str(ROOT / "setup.py"), run_name="asyncdiff_build_flags")
CORE_SOURCES: list[str] = list(_SETUP["CORE_SOURCES"])
CORE_HEADERS: list[str] = list(_SETUP["CORE_HEADERS"])
INCLUDE_DIRS: list[str] = [str(ROOT / d) if not os.path.isabs(d) else d for d in _SETUP["INCLUDE_DIRS"]]
COMPILE_ARGS: list[str] = list(_SETUP["COMPILE_ARGS"])
LIBRARIES: list[str] = list(_SETUP["LIBRARIES"])

SANITIZE_FLAGS = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                  "-fno-omit-frame-pointer"]
SANITIZE_ENV = {"ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1:abort_on_error=0",
                "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
SANITIZER_MARKERS = ("AddressSanitizer", "LeakSanitizer", "runtime error:", "UndefinedBehaviorSanitizer")


def compiler() -> str:
    """The C compiler ($CC, gcc or cc); skips the test when there is none."""
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler found (set CC)")
    return cc


def build(cc: str, sources, out: Path, *, extra=(), libs=(), timeout: int = 300) -> Path:
    """Compile and link `sources` (paths relative to the repository root, or
    absolute) into `out` with setup.py's flags, csrc/ on the include path,
    then `extra` flags; fails the test with the command and the compiler's
    output when the build fails."""
    cmd = [cc, *COMPILE_ARGS, "-I", str(CSRC), *extra, *[str(ROOT / s) for s in sources],
           "-o", str(out), *libs]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert built.returncode == 0, f"build failed:\n{' '.join(cmd)}\n{built.stderr}"
    return out


def build_extension(cc: str, name: str, sources, out_dir: Path, *, extra=()) -> Path:
    """A test-only extension module `name` built from `sources` the way
    setup.py builds asyncdiff._core (same flags, include dirs, libraries),
    into out_dir; import it with out_dir on sys.path."""
    out = out_dir / (name + sysconfig.get_config_var("EXT_SUFFIX"))
    includes = [f"-I{d}" for d in (sysconfig.get_paths()["include"], *INCLUDE_DIRS)]
    return build(cc, sources, out, extra=["-shared", "-fPIC", *includes, *extra],
                 libs=[f"-l{lib}" for lib in LIBRARIES])


def sanitizer_problem(cc: str, workdir: Path) -> str | None:
    """None if a sanitized program (one that allocates and forks) builds and
    runs here, else the reason it does not."""
    src, exe = workdir / "probe.c", workdir / "probe"
    src.write_text("#include <stdlib.h>\n#include <unistd.h>\n"
                   "int main(void){char *p = malloc(8); p[0] = 0; int r = p[0]; free(p);"
                   " return r + (fork() < 0);}\n")
    try:
        built = subprocess.run([cc, *SANITIZE_FLAGS, str(src), "-o", str(exe)], capture_output=True,
                               text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {cc}: {exc}"
    if built.returncode != 0:
        return f"{cc} cannot build with -fsanitize=address,undefined: {built.stderr.strip()[:300]}"
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **SANITIZE_ENV})
    if ran.returncode != 0:
        return f"sanitized programs do not run here: {ran.stderr.strip()[:300]}"
    return None


def require_sanitizers(cc: str, workdir: Path) -> None:
    why = sanitizer_problem(cc, workdir)
    if why is not None:
        pytest.skip(why)


def sanitizer_report(*texts: str) -> bool:
    return any(m in t for t in texts for m in SANITIZER_MARKERS)


def try_build(cc: str, sources, out: Path, *, extra=(), libs=(), timeout: int = 300) -> subprocess.CompletedProcess:
    """The build of :func:`build` (same command), returning the compiler's
    result instead of failing the test: for tests that expect a build to
    fail."""
    cmd = [cc, *COMPILE_ARGS, "-I", str(CSRC), *extra, *[str(ROOT / s) for s in sources],
           "-o", str(out), *libs]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def cxx_compiler() -> str | None:
    """The C++ compiler ($CXX, g++, c++ or clang++), None when there is none."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cxx_args() -> list[str]:
    """setup.py's flags for a C++ translation unit: its C standard becomes
    C++17, everything else is kept."""
    return [("-std=c++17" if a.startswith("-std=") else a) for a in COMPILE_ARGS]
