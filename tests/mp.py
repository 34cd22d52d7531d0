"""Start real rank processes for the tests, the way torchrun would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "mp_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, configs: list[dict], outdir: Path, timeout: float = 300.0, script: Path = WORKER):
    """Run `script` as `world` ranks; return [(returncode, output)] per rank."""
    outdir.mkdir(parents=True, exist_ok=True)
    cfg_file = outdir / "configs.json"
    cfg_file.write_text(json.dumps(configs))
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        log = open(outdir / f"rank{rank}.log", "w+")
        procs.append((subprocess.Popen([sys.executable, str(script), str(cfg_file), str(outdir)],
                                       env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout
    results = []
    for proc, log in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            proc.wait()
        log.seek(0)
        results.append((proc.returncode, log.read()))
        log.close()
    return results
