"""Building and running the C core's own test programs (shared by the C tests).

One place for the compiler lookup, the sanitizer flags and environment, the
probe that tells whether sanitized programs can run on this machine, and the
markers of a sanitizer report.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
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
