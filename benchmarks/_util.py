"""Helpers shared by the benchmark scripts.

* :func:`machine` / :func:`preamble`: what ran where (CPU model, cores, torch
  threads, versions) and the exact command, printed above every table;
* :func:`measure`: wall time of a callable, untimed warm-up calls then the
  median of several repeats;
* :func:`table`: a markdown table from rows of cells;
* :func:`launch` / :func:`rank_result`: start ``M`` rank processes of a script
  with the environment torchrun would give them (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and
  collect one JSON result per rank.

A rank process knows it is one because ``ASYNCDIFF_BENCH_OUT`` is set: the
folder where :func:`rank_result` writes ``rank<r>.json``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

OUT_ENV = "ASYNCDIFF_BENCH_OUT"
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cores() -> tuple[int, int]:
    """(logical CPUs of the machine, CPUs this process may run on)."""
    total = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = total
    return total, usable


def machine(threads: str | int | None = None) -> str:
    """One line saying what ran the benchmark."""
    import torch

    total, usable = cores()
    parts = [f"CPU: {cpu_model()}", f"{total} logical cores ({usable} usable)"]
    parts.append(f"torch threads: {threads if threads is not None else torch.get_num_threads()}")
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        parts.append(f"load average: {load}")
    except OSError:  # pragma: no cover
        pass
    versions = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        import diffusers

        versions.append(f"diffusers {diffusers.__version__}")
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        versions.append(f"GPU: {torch.cuda.get_device_name(0)}")
    return "; ".join(parts) + "; " + ", ".join(versions)


def command() -> str:
    """The command line that started this script, ready to paste."""
    script = sys.argv[0]
    try:
        script = os.path.relpath(script, ROOT)
    except ValueError:  # pragma: no cover - another drive
        pass
    return shlex.join(["python", script, *sys.argv[1:]])


def preamble(title: str, threads: str | int | None = None, notes: list[str] | None = None) -> None:
    print(f"## {title}\n")
    print(f"- machine: {machine(threads)}")
    print(f"- command: `{command()}`  (from the repository root)")
    for note in notes or []:
        print(f"- {note}")
    print(flush=True)


# ------------------------------------------------------------------ timing
def measure(fn, repeat: int = 5, warmup: int = 1, clock=time.perf_counter) -> dict:
    """Call ``fn`` ``warmup`` times untimed, then ``repeat`` times timed.

    Returns ``{"median", "min", "max", "times"}`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeat)):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return summary(times)


def summary(times) -> dict:
    times = [float(t) for t in times]
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "times": times}


def set_threads(n: int) -> None:
    """Use ``n`` intra-op threads in this process (torch and OpenMP)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already started
        pass


# ------------------------------------------------------------------ output
def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A markdown table.  ``align``: one letter per column, ``l`` or ``r``
    (default: right for numbers, left otherwise, judged on the first row)."""
    cells = [[_cell(c) for c in row] for row in rows]
    if align is None:
        first = rows[0] if rows else [""] * len(headers)
        align = "".join("r" if isinstance(c, (int, float)) and not isinstance(c, bool) else "l" for c in first)
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))

    def line(items):
        out = []
        for i, c in enumerate(items):
            out.append(c.rjust(widths[i]) if align[i] == "r" else c.ljust(widths[i]))
        return "| " + " | ".join(out) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(headers), rule] + [line(r) for r in cells])


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if math.isinf(value):
            return "inf"
        mag = abs(value)
        if mag >= 100:
            return f"{value:,.0f}"
        if mag >= 10:
            return f"{value:.1f}"
        if mag >= 0.01 or value == 0:
            return f"{value:.2f}"
        return f"{value:.2e}"
    return str(value)


def nbytes_h(n: float) -> str:
    """Bytes in a short human form (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def parse_size(text: str) -> int:
    """``64K``, ``1M``, ``16m``, ``4096`` -> bytes (binary multiples)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split()]


# --------------------------------------------------------------- launching
def is_rank() -> bool:
    """True inside a process started by :func:`launch`."""
    return OUT_ENV in os.environ


def rank_result(obj) -> None:
    """Inside a rank process: hand ``obj`` (JSON-serialisable) back to :func:`launch`."""
    rank = int(os.environ.get("RANK", "0"))
    path = Path(os.environ[OUT_ENV]) / f"rank{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


class LaunchError(RuntimeError):
    pass


def launch(script, args: list[str], world: int, threads: int = 1, silence: float = 1800.0,
           torchrun_env: bool = True, extra_env: dict | None = None) -> list:
    """Run ``python script *args`` as ``world`` processes; return their results.

    With ``torchrun_env`` each process gets the variables torchrun would set
    (``asyncdiff.testing.ranks``: one host, ``LOCAL_WORLD_SIZE == WORLD_SIZE``);
    without it (a plain single-process run) none of them.  Every process runs
    with ``threads`` OpenMP/torch threads.  Each must call :func:`rank_result`
    once; the results come back in rank order.  A failing rank, or a launch
    silent for ``silence`` seconds, raises :class:`LaunchError` with the tail
    of every rank's log."""
    from asyncdiff.testing import ranks

    outdir = Path(tempfile.mkdtemp(prefix="asyncdiff-bench-"))
    env = {OUT_ENV: str(outdir), "ASYNCDIFF_BENCH_THREADS": str(threads), **(extra_env or {})}
    try:
        done = ranks.run([script, *args], world, threads=threads, silence=silence, env=env, cwd=ROOT,
                         torchrun=torchrun_env)
        results, problems = [], []
        for r in done:
            path = outdir / f"rank{r.rank}.json"
            if r.returncode != 0 or not path.is_file():
                why = "no progress, stopped" if r.returncode is None else f"exit code {r.returncode}"
                problems.append(f"--- rank {r.rank} ({why}) ---\n{r.output[-3000:]}")
            else:
                results.append(json.loads(path.read_text()))
        if problems:
            raise LaunchError(f"{Path(script).name} with {world} process(es) failed:\n" + "\n".join(problems))
        return results
    finally:
        for f in outdir.iterdir():
            f.unlink()
        outdir.rmdir()
