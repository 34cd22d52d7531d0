"""Several devices in one process: one thread per component (docs/design.md §6.4).

``AsyncDiff(pipe, model_n, devices=["cpu", "cpu"])`` (or ``["cuda:0",
"cuda:1"]``, or ``"auto"``) in a plain script or a Jupyter kernel.  The
schedule and the passes are exactly the emulation's (``emulate.py``): at
denoiser call k every rank that computes runs its forward, reading what the
owners stored at call k - 1 and storing its own outputs.  Those forwards do
not depend on each other, so here they run at the same time, one worker
thread per rank.

On one device (the CPU) every rank runs the pipeline's own denoiser and the
outputs are handed over as tensors (a reference, no copy).  torch releases the
GIL inside its operators, so the threads overlap wherever the model's time is
in operators.  While the workers run, torch uses ``cores // ranks`` intra-op
threads (one process-wide setting), so the components do not oversubscribe
the cores; warm-up calls and the rest of the pipeline keep the caller's.  The
result is bitwise the emulation's when the emulation uses as many intra-op
threads as each worker.

On several devices rank 0 runs the pipeline's denoiser on ``devices[0]`` (it
also runs the warm-up calls, whole) and every other rank a *replica* on its
own device that holds only the glue and its component's blocks
(``shard.replica``).  A worker copies the call's inputs to its device and
runs there; the outputs a rank stores are copied to the other devices once
the call is over (torch orders a copy between devices after the work that
made its source), which is the in-process transport; the result goes back to
``devices[0]``.

A worker that raises makes the call raise that exception after every worker
has finished (no partial output); the next pipeline call starts afresh.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from . import hooks, shard
from .emulate import Emulation
from .outputs import flatten, unflatten
from .step import run_in_turn


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _to(obj, device: torch.device):
    """``obj`` with every tensor in it on ``device`` (tensors, sequences, dicts
    and diffusers outputs followed; anything else as it is)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True) if obj.device != device else obj
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        try:
            spec, tensors = flatten(obj)  # diffusers outputs are dicts with their own constructor
        except TypeError:  # something flatten does not know: a plain dict is followed, the rest kept
            return {k: _to(v, device) for k, v in obj.items()} if type(obj) is dict else obj
        return unflatten(spec, [_to(t, device) for t in tensors])
    return obj


class Threads(Emulation):
    kind = "threads"

    def __init__(self, world: int, units_of: dict, devices: tuple, *, home=None, sharing: int | None = None):
        super().__init__(world, units_of)
        self.devices = tuple(torch.device(d) for d in devices)
        # cfg_parallel (docs/design.md §6.7): the second group's mode has devices of its own; its rank 0
        # runs the warm-up whole, so it gets a whole replica unless its device is ``home``, the one the
        # pipeline's denoiser is on.  ``sharing``: CPU ranks of every group (they split the cores)
        self.second = home is not None
        self.home = self.devices[0] if home is None else torch.device(home)
        # one replica per rank whose device differs from rank 0's; ASYNCDIFF_REPLICAS=1 makes
        # them on one device too (the tests check the replica path on the CPU that way)
        self.replicate = len(set(self.devices)) > 1 or os.environ.get("ASYNCDIFF_REPLICAS") == "1"
        # ASYNCDIFF_ONE_HOST_THREAD=1: issue every rank's work from the caller's thread, one rank after
        # the other (on GPUs the kernels still overlap: launches do not wait); for measuring which is faster
        self.one_host_thread = os.environ.get("ASYNCDIFF_ONE_HOST_THREAD") == "1"
        self.replicas: dict = {}  # rank -> its denoiser (glue + its blocks), rank 0 excluded
        self._hooked: list = []  # (module, hook name, registry made for it) on the replicas
        self.views: dict = {}  # device -> {unit: (spec, tensors on that device)}
        cpu_ranks = sum(d.type == "cpu" for d in self.devices) if sharing is None else sharing
        self.intra_op = max(1, cores() // max(1, cpu_ranks))
        self._pool = ThreadPoolExecutor(max_workers=max(world, sharing or 0), thread_name_prefix="asyncdiff")

    # ---------------------------------------------------------- replicas
    def attach_split(self, denoiser, layout, split, state, component_of) -> None:
        """Once the split is known: a replica for every rank but 0 (when replicating)."""
        ranks = list(range(1, self.world)) if self.replicate else []
        if self.second and (self.replicate or self.devices[0] != self.home):
            ranks.insert(0, 0)  # the second group's rank 0 runs the warm-up whole: a replica of every unit
        for rank in ranks:
            held = frozenset(split.owner) if rank == 0 else shard.held_units(split.components, component_of(rank))
            copy = shard.replica(denoiser, layout, split.owner, held, self.devices[rank])
            for unit in split.owner:
                module = layout.module(unit, copy)
                self._hooked.append((module, hooks.BLOCK_HOOK,
                                     hooks.register(module, hooks.BlockHook(unit, state), hooks.BLOCK_HOOK)))
            self.replicas[rank] = copy

    def _view(self, device: torch.device) -> dict:
        """What the owners published, on ``device``."""
        view = self.views.setdefault(device, {})
        for unit, (spec, tensors) in self.published.items():
            have = view.get(unit)
            if have is None or have[2] is not tensors[0]:  # new since the last copy
                view[unit] = (spec, [_to(t, device) for t in tensors], tensors[0])
        return {u: (spec, ts) for u, (spec, ts, _) in view.items()}

    def begin(self, call, k: int) -> list:
        passes = super().begin(call, k)
        if self.replicas:
            for p in passes:
                p.cache = self._view(self.devices[p.rank])
        return passes

    def finish(self, call, k: int, passes: list, outs: list):
        out = super().finish(call, k, passes, outs)
        return _to(out, self.devices[0]) if self.replicas else out

    # --------------------------------------------------------------- run
    def run(self, forward, runs: list, state) -> list:
        if len(runs) == 1 and runs[0][0].rank not in self.replicas:
            return run_in_turn(forward, runs, state)  # a warm-up call, or rank 0 alone: nothing to overlap
        return run_all([(self, run) for run in runs], forward, state)

    def worker(self, forward, state, grad: bool, inference: bool):
        """What one worker thread does with a (pass, args, kwargs) of this mode."""
        def one(p, a, kw):
            device = self.devices[p.rank]
            # (a second group whose ranks share one device all run its rank 0's whole replica)
            copy = self.replicas.get(p.rank, self.replicas.get(0))
            fn = copy.forward if copy is not None else forward
            if copy is not None:
                a, kw = _to(a, device), _to(kw, device)
            # grad and inference modes are per thread: take the caller's
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                if device.type == "cuda":
                    with torch.cuda.device(device):
                        return run_in_turn(fn, [(p, a, kw)], state)[0]
                return run_in_turn(fn, [(p, a, kw)], state)[0]
        return one

    def fail(self, exc: BaseException) -> None:
        super().fail(exc)
        self.views = {}

    def close(self, failed: bool = False):
        super().close(failed)
        for module, name, created in reversed(self._hooked):
            hooks.unregister(module, name, created)
        self._hooked.clear()
        self.replicas, self.views = {}, {}
        self._pool.shutdown(wait=True)


def run_all(jobs: list, forward, state) -> list:
    """Run every (mode, (pass, args, kwargs)) of ``jobs`` at the same time, one
    worker thread each, on the first mode's pool and with its intra-op thread
    count (cfg_parallel hands both groups' forwards here at once); the
    outputs in order.  A worker that raises makes this raise once all are done."""
    first = jobs[0][0]
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    work = [(mode.worker(forward, state, grad, inference), run) for mode, run in jobs]
    if first.one_host_thread:
        return [one(*run) for one, run in work]
    # torch's intra-op thread count is one setting for the whole process:
    # the workers' share while they run, the caller's again afterwards
    saved = torch.get_num_threads()
    torch.set_num_threads(first.intra_op)
    try:
        futures = [first._pool.submit(one, *run) for one, run in work]
        errors = [f.exception() for f in futures]  # waits for every worker
    finally:
        torch.set_num_threads(saved)
    for error in errors:
        if error is not None:
            raise error
    return [f.result() for f in futures]
