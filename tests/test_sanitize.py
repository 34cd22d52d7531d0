"""Build the plain-C test program of the core with AddressSanitizer and
UndefinedBehaviorSanitizer and run it; check the shape of csrc/.

The core C files never include Python.h, so they can be linked into a small
standalone program (csrc/tests/test_core.c) without the interpreter.  To cover
a new C file of the core (a transport, say), add it to CORE_C_SOURCES and any
library it needs to LINK_LIBS; that is the only place to edit.
"""
import os
import re
import subprocess

from cbuild import (CORE_HEADERS, CORE_SOURCES, CSRC, ROOT, SANITIZE_ENV, SANITIZE_FLAGS, build, compiler,
                    require_sanitizers, sanitizer_report)

# Core C files linked into the test program (never _coremodule.c).
CORE_C_SOURCES = [
    "csrc/partition.c",
    "csrc/schedule.c",
]
TEST_PROGRAM = ["csrc/tests/test_core.c", "csrc/tests/check.c"]
LINK_LIBS = ["-lm"]


def test_core_under_sanitizers(tmp_path):
    cc = compiler()
    require_sanitizers(cc, tmp_path)

    exe = build(cc, [*TEST_PROGRAM, *CORE_C_SOURCES], tmp_path / "test_core", extra=SANITIZE_FLAGS,
                libs=LINK_LIBS)

    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **SANITIZE_ENV}, cwd=tmp_path)
    report = f"stdout:\n{ran.stdout}\nstderr:\n{ran.stderr}"
    assert ran.returncode == 0, report
    assert not sanitizer_report(ran.stderr), report
    last = ran.stdout.strip().splitlines()[-1]
    assert last.endswith("passed, 0 failed"), report
    assert int(last.split()[0]) > 0, report


def test_setup_lists_every_c_file_of_the_module():
    """setup.py's lists are complete: every C file of csrc/ is compiled and
    every header is a dependency (and so lands in the sdist)."""
    assert sorted(CORE_SOURCES) == sorted(f"csrc/{p.name}" for p in CSRC.glob("*.c"))
    assert sorted(CORE_HEADERS) == sorted(f"csrc/{p.name}" for p in CSRC.glob("*.h"))
    assert all((ROOT / f).is_file() for f in CORE_SOURCES + CORE_HEADERS)


def test_only_the_binding_includes_python():
    """The plain-C core (partition, schedule, transports) never includes
    Python.h; the binding is the files whose name starts with '_'."""
    include = re.compile(r'^\s*#\s*include\s*[<"](Python\.h|_coremodule\.h|numpy/)', re.M)
    for path in CSRC.glob("*.[ch]"):
        uses_python = bool(include.search(path.read_text()))
        assert uses_python == path.name.startswith("_"), path.name


def test_c_files_stay_readable():
    """No C file of csrc/ (test programs included) is over 700 lines."""
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for p in sorted(CSRC.rglob("*.[ch]"))}
    assert max(sizes.values()) <= 700, {f: n for f, n in sizes.items() if n > 700}
