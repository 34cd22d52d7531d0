"""Build the plain-C test program of the core with AddressSanitizer and
UndefinedBehaviorSanitizer and run it.

The core C files never include Python.h, so they can be linked into a small
standalone program (csrc/tests/test_core.c) without the interpreter.  To cover
a new C file of the core (a transport, say), add it to CORE_C_SOURCES and any
library it needs to LINK_LIBS; that is the only place to edit.
"""
import os
import subprocess

from cbuild import SANITIZE_ENV, SANITIZE_FLAGS, build, compiler, require_sanitizers, sanitizer_report

# Core C files linked into the test program (never _coremodule.c).
CORE_C_SOURCES = [
    "csrc/partition.c",
    "csrc/schedule.c",
]
TEST_PROGRAM = "csrc/tests/test_core.c"
LINK_LIBS = ["-lm"]


def test_core_under_sanitizers(tmp_path):
    cc = compiler()
    require_sanitizers(cc, tmp_path)

    exe = build(cc, [TEST_PROGRAM, *CORE_C_SOURCES], tmp_path / "test_core", extra=SANITIZE_FLAGS,
                libs=LINK_LIBS)

    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **SANITIZE_ENV}, cwd=tmp_path)
    report = f"stdout:\n{ran.stdout}\nstderr:\n{ran.stderr}"
    assert ran.returncode == 0, report
    assert not sanitizer_report(ran.stderr), report
    last = ran.stdout.strip().splitlines()[-1]
    assert last.endswith("passed, 0 failed"), report
    assert int(last.split()[0]) > 0, report
