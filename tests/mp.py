"""Start real rank processes for the tests (``asyncdiff.testing.ranks``, the way torchrun would)."""

from __future__ import annotations

import json
from pathlib import Path

from asyncdiff.testing import ranks

HERE = Path(__file__).resolve().parent
WORKER = HERE / "mp_worker.py"


def launch(world: int, configs: list[dict], outdir: Path, script: Path = WORKER, silence: float = 600.0,
           pids: list | None = None):
    """Run ``script`` as ``world`` ranks over ``configs``; [(returncode, output)] per rank
    (and their process ids appended to ``pids`` when given).

    A launch stops only when no rank printed anything for ``silence`` seconds
    (each worker prints a line per configuration), never because the machine
    is slow."""
    outdir.mkdir(parents=True, exist_ok=True)
    cfg_file = outdir / "configs.json"
    cfg_file.write_text(json.dumps(configs))
    results = ranks.run([script, cfg_file, outdir], world, threads=1, silence=silence, logdir=outdir)
    if pids is not None:
        pids.extend(r.pid for r in results)
    return [(r.returncode, r.output) for r in results]
