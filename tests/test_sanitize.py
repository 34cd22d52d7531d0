"""Build the plain-C test program of the core with AddressSanitizer and
UndefinedBehaviorSanitizer and run it.

The core C files never include Python.h, so they can be linked into a small
standalone program (csrc/tests/test_core.c) without the interpreter.  To cover
a new C file of the core (a transport, say), add it to CORE_C_SOURCES and any
library it needs to LINK_LIBS; that is the only place to edit.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Core C files linked into the test program (never _coremodule.c).
CORE_C_SOURCES = [
    "csrc/partition.c",
    "csrc/schedule.c",
]
TEST_PROGRAM = "csrc/tests/test_core.c"
LINK_LIBS = ["-lm"]

SANITIZE_FLAGS = [
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",  # any UB report makes the run fail
    "-fno-omit-frame-pointer",
    "-g",
    "-O1",
]
C_FLAGS = ["-std=c11", "-Wall", "-Wextra"]

RUN_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1:abort_on_error=0:exitcode=99",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}

SANITIZER_MARKERS = ("AddressSanitizer", "LeakSanitizer", "runtime error:",
                     "UndefinedBehaviorSanitizer")


def _compiler():
    return shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")


def _env():
    env = dict(os.environ)
    env.update(RUN_ENV)
    return env


def _probe(cc, workdir):
    """None if this compiler can build and run a sanitized program, else why not."""
    src = workdir / "probe.c"
    exe = workdir / "probe"
    src.write_text("#include <stdlib.h>\n"
                   "int main(void){char *p = malloc(4); p[0] = 1; int r = p[0] - 1;"
                   " free(p); return r;}\n")
    try:
        built = subprocess.run([cc, *SANITIZE_FLAGS, str(src), "-o", str(exe)],
                               capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run the compiler {cc}: {exc}"
    if built.returncode != 0:
        return f"{cc} cannot build with -fsanitize=address,undefined: {built.stderr.strip()[:500]}"
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, env=_env())
    if ran.returncode != 0:
        return f"sanitized programs do not run here: {ran.stderr.strip()[:500]}"
    return None


def test_core_under_sanitizers(tmp_path):
    cc = _compiler()
    if cc is None:
        pytest.skip("no C compiler found (set CC)")
    why = _probe(cc, tmp_path)
    if why is not None:
        pytest.skip(why)

    exe = tmp_path / "test_core"
    cmd = [cc, *C_FLAGS, *SANITIZE_FLAGS, "-I", str(ROOT / "csrc"),
           str(ROOT / TEST_PROGRAM), *[str(ROOT / s) for s in CORE_C_SOURCES],
           "-o", str(exe), *LINK_LIBS]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, f"build failed:\n{' '.join(cmd)}\n{built.stderr}"

    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300,
                         env=_env(), cwd=tmp_path)
    report = f"stdout:\n{ran.stdout}\nstderr:\n{ran.stderr}"
    assert ran.returncode == 0, report
    assert not any(m in ran.stderr for m in SANITIZER_MARKERS), report
    last = ran.stdout.strip().splitlines()[-1]
    assert last.endswith("passed, 0 failed"), report
    assert int(last.split()[0]) > 0, report
