"""Build and run the C test program of the shared-memory transport.

csrc/shm.c is plain C (no Python.h), so it links with csrc/tests/test_shm.c
into a standalone program that forks its own ranks.  The program checks
byte-for-byte exchange between 2, 3 and 5 processes, timeouts, peers that
exit, are SIGKILLed or detach, argument checks, and that no segment is left
in /dev/shm; it ends with "N passed, M failed".

Two builds: one under AddressSanitizer + UndefinedBehaviorSanitizer (skipped,
with the reason, only where the compiler or the host cannot run sanitized
programs), and a plain -O2 build that also runs the benchmark briefly.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["csrc/shm.c", "csrc/tests/test_shm.c"]
LIBS = ["-lm", "-lrt"]  # -lrt: shm_open lives there on glibc < 2.34
C_FLAGS = ["-std=c11", "-Wall", "-Wextra", "-I", str(ROOT / "csrc")]
SANITIZE_FLAGS = ["-O1", "-g", "-fsanitize=address,undefined",
                  "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
PLAIN_FLAGS = ["-O2", "-g", "-Werror"]
SANITIZE_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1:abort_on_error=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}
SANITIZER_MARKERS = ("AddressSanitizer", "LeakSanitizer", "runtime error:",
                     "UndefinedBehaviorSanitizer")

pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir(),
                                reason="no /dev/shm on this host")


def _compiler():
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler found (set CC)")
    return cc


def _build(cc, flags, out):
    cmd = [cc, *C_FLAGS, *flags, *[str(ROOT / s) for s in SOURCES],
           "-o", str(out), *LIBS]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert built.returncode == 0, f"build failed:\n{' '.join(cmd)}\n{built.stderr}"
    return out


def _sanitizer_problem(cc, workdir):
    """None if sanitized programs build and run here, else the reason."""
    src = workdir / "probe.c"
    exe = workdir / "probe"
    src.write_text("#include <stdlib.h>\n#include <unistd.h>\n"
                   "int main(void){char *p = malloc(8); p[0] = 0;"
                   " int r = p[0]; free(p); return r + (fork() < 0);}\n")
    try:
        built = subprocess.run([cc, *SANITIZE_FLAGS, str(src), "-o", str(exe)],
                               capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {cc}: {exc}"
    if built.returncode != 0:
        return (f"{cc} cannot build with -fsanitize=address,undefined: "
                f"{built.stderr.strip()[:300]}")
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **SANITIZE_ENV})
    if ran.returncode != 0:
        return f"sanitized programs do not run here: {ran.stderr.strip()[:300]}"
    return None


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
    cc = _compiler()
    why = _sanitizer_problem(cc, tmp_path)
    if why is not None:
        pytest.skip(why)
    exe = _build(cc, SANITIZE_FLAGS, tmp_path / "test_shm_asan")
    rc, out, err, report = _run(exe, env=SANITIZE_ENV)
    assert not any(m in err or m in out for m in SANITIZER_MARKERS), report
    _check_tests(rc, out, report)


def test_shm_plain_build_and_bench(tmp_path):
    cc = _compiler()
    exe = _build(cc, PLAIN_FLAGS, tmp_path / "test_shm")
    rc, out, err, report = _run(exe)
    _check_tests(rc, out, report)
    rc, out, err, report = _run(exe, "bench", "quick")
    assert rc == 0, report
    assert "bench ok" in out, report
    assert out.count("GB/s") == 8, report  # 4 memcpy + 4 shm lines
