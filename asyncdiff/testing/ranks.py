"""Start the rank processes of a local launch, the way torchrun does, for tests and benchmarks.

``run(argv, world)`` starts ``python *argv`` ``world`` times with the
variables torchrun gives its workers (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; no
agent store, like a bare launch by a user's own launcher or a scheduler),
waits for all of them and returns each one's exit code and output.

The wait is bounded by progress, not by the clock: a launch is stopped only
when no rank has written a byte of output for ``silence`` seconds, so a slow,
shared machine never fails a healthy run.  Every process is reaped before
``run`` returns.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT", "GROUP_RANK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int | None, threads: int = 1, extra: dict | None = None) -> dict:
    """The environment of rank ``rank``: this process's, without any launch
    variable it may have, plus those of the new launch (none when ``port`` is
    None: a plain process) and ``threads`` intra-op threads."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    if port is not None:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


@dataclass
class RankResult:
    rank: int
    returncode: int | None  # None: stopped for lack of progress
    output: str
    pid: int  # the process's id (shared-memory segment names carry their creator's)


def run(argv: list, world: int, *, threads: int = 1, silence: float = 600.0, env: dict | None = None,
        cwd=None, logdir=None, torchrun: bool = True) -> list[RankResult]:
    """Run ``python *argv`` as ``world`` ranks (see the module docstring).

    ``env``: extra variables for every rank.  ``logdir``: where each rank's
    output is kept as ``rank<r>.log`` (a temporary folder when None).
    ``torchrun=False``: one plain process, without launch variables."""
    if not torchrun and world != 1:
        raise ValueError("world: a run without the launch variables has one process")
    port = free_port() if torchrun else None
    folder = Path(logdir) if logdir is not None else Path(tempfile.mkdtemp(prefix="asyncdiff-ranks-"))
    folder.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    try:
        for rank in range(world):
            log = open(folder / f"rank{rank}.log", "w+", encoding="utf-8", errors="replace")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, *map(str, argv)], env=rank_env(rank, world, port, threads, env),
                                          cwd=cwd, stdout=log, stderr=subprocess.STDOUT))
        stopped = _wait(procs, logs, silence)
        results = []
        for rank, (proc, log) in enumerate(zip(procs, logs)):
            log.seek(0)
            results.append(RankResult(rank, None if stopped and proc.returncode in (None, -9) else proc.returncode,
                                      log.read(), proc.pid))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for log in logs:
            log.close()
        if logdir is None:
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()


def _wait(procs, logs, silence: float) -> bool:
    """Wait until every process has exited; True if they were stopped because
    no output appeared anywhere for ``silence`` seconds."""
    sizes = [-1] * len(logs)
    last = time.monotonic()
    while any(p.poll() is None for p in procs):
        now = [os.fstat(log.fileno()).st_size for log in logs]
        if now != sizes:
            sizes, last = now, time.monotonic()
        elif time.monotonic() - last > silence:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            return True
        time.sleep(0.2)
    return False
