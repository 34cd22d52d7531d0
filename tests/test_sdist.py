"""The source distribution is complete: a wheel built from it alone, in a clean
folder, imports and runs the C core.

The sdist and the wheel are made through setuptools' PEP 517 hooks (what
``python -m build`` and ``pip install asyncdiff-*.tar.gz`` call), without
build isolation: this machine's setuptools and NumPy are the build
requirements."""

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def hook(name: str, outdir: Path, cwd: Path) -> Path:
    """Run a PEP 517 hook of setuptools' backend in ``cwd``; the file it made."""
    code = (f"import setuptools.build_meta as b, sys; "
            f"print(b.{name}(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", code, str(outdir)], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return outdir / proc.stdout.strip().splitlines()[-1]


def test_sdist_builds_a_wheel_that_imports(tmp_path):
    sdist = hook("build_sdist", tmp_path / "dist", ROOT)
    with tarfile.open(sdist) as tar:
        names = {Path(*Path(n).parts[1:]).as_posix() for n in tar.getnames()}
        tar.extractall(tmp_path / "src", filter="data")
    headers = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").glob("*.h")}
    assert headers <= names, headers - names
    for needed in ("LICENSE", "CHANGELOG.md", "README.md", "docs/design.md", "tests/conftest.py",
                   "tests/cbuild.py", "tests/mp.py", "tests/mp_worker.py", "csrc/tests/check.h"):
        assert needed in names, needed

    unpacked = next((tmp_path / "src").iterdir())
    wheel = hook("build_wheel", tmp_path / "wheel", unpacked)
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as whl:
        whl.extractall(site)
        metadata = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        meta = whl.read(metadata).decode()
        assert any(n.endswith("licenses/LICENSE") for n in whl.namelist())
    assert "License-Expression: Apache-2.0" in meta
    assert "Project-URL:" in meta and "Classifier:" in meta

    check = ("import asyncdiff, asyncdiff._core as c; "
             "print(asyncdiff.__file__); print(c.Schedule(2, 1, 1, 0, 4).world_size)")
    proc = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, world = proc.stdout.split()
    assert Path(where).is_relative_to(site) and world == "2"
