"""Build and run the C test program of the shared-memory transport.

csrc/shm.c and csrc/shm_data.c are plain C (no Python.h), so they link with
the test_shm program of csrc/tests (test_shm.c, test_shm_peers.c,
test_shm_bench.c, shm_test.c, check.c) into a standalone program that forks
its own ranks.  The program checks byte-for-byte exchange between 2, 3, 5
and 16 processes, timeouts, peers that exit, are SIGKILLed or detach,
argument checks, and that no segment is left in /dev/shm; it ends with
"N passed, M failed".

Two builds: one under AddressSanitizer + UndefinedBehaviorSanitizer (skipped,
with the reason, only where the compiler or the host cannot run sanitized
programs), and a plain build with setup.py's flags that also runs the
benchmark briefly.
"""
import os
import subprocess
from pathlib import Path

import pytest

from cbuild import SANITIZE_ENV, SANITIZE_FLAGS, build, compiler, require_sanitizers, sanitizer_report

SOURCES = ["csrc/shm.c", "csrc/shm_data.c", "csrc/shm_live.c", "csrc/tests/test_shm.c",
           "csrc/tests/test_shm_peers.c", "csrc/tests/test_shm_records.c", "csrc/tests/test_shm_bench.c",
           "csrc/tests/shm_test.c", "csrc/tests/check.c"]
# -lrt: shm_open lives there on glibc < 2.34; -pthread: the heartbeat thread.
LIBS = ["-lm", "-lrt", "-pthread"]
PLAIN_FLAGS = ["-g", "-Werror"]  # on top of setup.py's flags (-O2 among them)
pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir(),
                                reason="no /dev/shm on this host")


def _build(cc, flags, out):
    return build(cc, SOURCES, out, extra=flags, libs=LIBS)


def _ours(pid):
    """Entries of /dev/shm made by the test program with this pid."""
    prefix = f"asyncdiff-test-{pid}-"
    return sorted(p.name for p in Path("/dev/shm").iterdir()
                  if p.name.startswith(prefix))


def _run(exe, *args, env=None, timeout=120):
    proc = subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{exe.name} {' '.join(args)} hung\n{out}\n{err}")
    leftovers = _ours(proc.pid)
    for name in leftovers:  # clean up before failing
        try:
            os.unlink(Path("/dev/shm") / name)
        except OSError:
            pass
    report = f"stdout:\n{out}\nstderr:\n{err}"
    assert not leftovers, f"left in /dev/shm: {leftovers}\n{report}"
    return proc.returncode, out, err, report


def _check_tests(rc, out, report):
    assert rc == 0, report
    last = out.strip().splitlines()[-1]
    assert last.endswith(" passed, 0 failed"), report
    assert int(last.split()[0]) >= 10, report


def test_shm_under_sanitizers(tmp_path):
    cc = compiler()
    require_sanitizers(cc, tmp_path)
    exe = _build(cc, SANITIZE_FLAGS, tmp_path / "test_shm_asan")
    rc, out, err, report = _run(exe, env=SANITIZE_ENV)
    assert not sanitizer_report(err, out), report
    _check_tests(rc, out, report)


def test_shm_plain_build_and_bench(tmp_path):
    cc = compiler()
    exe = _build(cc, PLAIN_FLAGS, tmp_path / "test_shm")
    rc, out, err, report = _run(exe)
    _check_tests(rc, out, report)
    rc, out, err, report = _run(exe, "bench", "quick")
    assert rc == 0, report
    assert "bench ok" in out, report
    assert out.count("GB/s") == 8, report  # 4 memcpy + 4 shm lines
