"""Several devices in one process: one thread per component (docs/design.md §6.4).

``AsyncDiff(pipe, model_n, devices=["cpu", "cpu"])`` in a plain script or a
Jupyter kernel.  The schedule and the passes are exactly the emulation's
(``emulate.py``): at denoiser call k every rank that computes runs its
forward, reading what the owners stored at call k - 1 and storing its own
outputs.  Those forwards do not depend on each other, so here they run at the
same time, one worker thread per rank; outputs are handed over as tensors
(the in-process transport: a reference, no copy).  torch releases the GIL
inside its operators, so the threads overlap wherever the model's time is in
operators.  While the workers run, torch uses ``cores // ranks`` intra-op
threads (one process-wide setting), so the components do not oversubscribe
the cores; warm-up calls and the rest of the pipeline keep the caller's.  The result is bitwise the
emulation's when the emulation uses as many intra-op threads as each worker.

A worker that raises makes the call raise that exception after every worker
has finished (no partial output); the next pipeline call starts afresh.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .emulate import Emulation
from .step import run_in_turn


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Threads(Emulation):
    kind = "threads"

    def __init__(self, world: int, units_of: dict, devices: tuple):
        super().__init__(world, units_of)
        self.devices = devices
        self.intra_op = max(1, cores() // world)
        self._pool = ThreadPoolExecutor(max_workers=world, thread_name_prefix="asyncdiff")

    def run(self, forward, runs: list, state) -> list:
        if len(runs) == 1:  # a warm-up call, or one computing rank: nothing to overlap
            return run_in_turn(forward, runs, state)
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def one(p, a, kw):
            # grad and inference modes are per thread: take the caller's
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return run_in_turn(forward, [(p, a, kw)], state)[0]

        # torch's intra-op thread count is one setting for the whole process:
        # the workers' share while they run, the caller's again afterwards
        saved = torch.get_num_threads()
        torch.set_num_threads(self.intra_op)
        try:
            futures = [self._pool.submit(one, *run) for run in runs]
            errors = [f.exception() for f in futures]  # waits for every worker
        finally:
            torch.set_num_threads(saved)
        for error in errors:
            if error is not None:
                raise error
        return [f.result() for f in futures]

    def close(self, failed: bool = False):
        super().close(failed)
        self._pool.shutdown(wait=True)
