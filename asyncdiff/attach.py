"""Attach AsyncDiff to a diffusers pipeline.

``AsyncDiff(pipe, model_n, stride, warm_up, time_shift)`` wraps the forward of
the pipeline's denoiser and of the blocks of the chosen split; ``remove()``
puts the original forwards back.  The pipeline's ``__call__`` is untouched.

Per denoiser call the C schedule (``asyncdiff._core.Schedule``) says what this
rank does; this module carries it out:

* the denoiser wrapper counts calls, swaps the timestep argument, syncs the
  cached block outputs before the forward and exchanges the result after it;
* a block wrapper either runs the block (and stores its output) or replays
  its cached output.

Without torchrun (no ``WORLD_SIZE``) one process plays every rank in turn
(emulation).  Under torchrun each process is one rank and the C transport
moves the outputs between them.
"""

from __future__ import annotations

import inspect
import itertools
import os
from collections import Counter
from dataclasses import dataclass, field

import torch

from . import _core, arch, splits, traffic
from .outputs import flatten, unflatten

_ALIGN = 64


@dataclass
class _Pass:
    """What the blocks do during one forward of one rank."""

    rank: int
    compute_all: bool
    compute: frozenset  # units computed (ignored when compute_all)
    store: bool
    cache: dict  # unit -> (spec, tensors) replayed when not computed
    count: bool  # count unit executions (async phase)
    stores: dict = field(default_factory=dict)


@dataclass
class _Call:
    """State of one pipeline call (one denoising loop)."""

    source: object  # the scheduler's timesteps tensor this call came from
    timesteps: torch.Tensor  # T: what the pipeline passes at call k
    schedule: object  # _core.Schedule for this call's length
    k: int = 0

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def _check_int(name, value, low=None, choices=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if choices is not None and value not in choices:
        raise ValueError(f"{name}: must be one of {', '.join(map(str, choices))}, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name}: must be >= {low}, got {value}")
    return value


_instances = itertools.count()


def _device_of(module: torch.nn.Module) -> torch.device:
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


class AsyncDiff:
    """Asynchronous denoising over ``model_n`` components (AsyncDiff, NeurIPS 2024).

    Parameters
    ----------
    pipeline: a diffusers pipeline with a ``unet`` or ``transformer``.
    model_n: number of components the denoiser is cut into.
    stride: 1, or 2 (one extra rank; each parallel round covers two steps).
    warm_up: denoiser calls computed whole on every rank before going asynchronous.
    time_shift: give each component the previous step's timestep.
    split: None (paper preset when the architecture has one, else auto),
        ``"auto"``, ``"paper"``, or an explicit split (``"conv_in d0 | ..."``
        or a list of lists of unit names).
    transport: ``"auto"`` (emulation without torchrun; under torchrun NCCL
        when every rank has a GPU and NCCL loads, else shared memory),
        ``"emulate"``, ``"shm"`` or ``"nccl"``.  Under torchrun with CUDA
        available, a pipeline still on the CPU is moved to ``cuda:LOCAL_RANK``.
    timeout: seconds any wait for another rank may take before it raises.
    """

    def __init__(
        self,
        pipeline,
        model_n: int = 2,
        stride: int = 1,
        warm_up: int = 1,
        time_shift: bool = False,
        *,
        split=None,
        transport: str = "auto",
        timeout: float = 300.0,
    ):
        self.model_n = _check_int("model_n", model_n, low=1)
        self.stride = _check_int("stride", stride, choices=(1, 2))
        self.warm_up = _check_int("warm_up", warm_up, low=1)
        if not isinstance(time_shift, bool):
            raise TypeError(f"time_shift: expected a bool, got {type(time_shift).__name__}")
        self.time_shift = time_shift
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.world_size = self.model_n + self.stride - 1
        denoiser = getattr(pipeline, "unet", None)
        if not isinstance(denoiser, torch.nn.Module):
            denoiser = getattr(pipeline, "transformer", None)
        if not isinstance(denoiser, torch.nn.Module):
            raise TypeError(
                f"pipeline: {type(pipeline).__name__} has no `unet` or `transformer` module; "
                "AsyncDiff needs a diffusers pipeline"
            )
        if not hasattr(getattr(pipeline, "scheduler", None), "timesteps"):
            raise TypeError(f"pipeline: {type(pipeline).__name__} has no scheduler with timesteps")
        self.pipeline = pipeline
        self.denoiser = denoiser
        self.layout = arch.describe(denoiser)
        n_fine = len(self.layout.fine_units())
        if self.model_n > n_fine:
            raise ValueError(f"model_n: {self.model_n} components but the denoiser has only {n_fine} units to share")
        self.split = splits.resolve_static(self.layout, self.model_n, split)
        self.mode, self.rank = self._choose_mode(transport)
        self.counts: Counter = Counter()  # (rank, unit) -> executions in the async phase
        self._instance = next(_instances)
        self._transport = None
        self._failed = False
        self._call: _Call | None = None
        self._pass: _Pass | None = None
        self._published: dict = {}  # emulation: unit -> (spec, tensors) of its owner's last store
        self._cache: dict = {}  # multi-process: this rank's cached outputs
        self._slots: dict | None = None
        self._layout_key = None
        self._seq = 0  # transport events so far (alike on every rank)
        self._synced_seq = -1  # the event that last delivered the owners' outputs
        self._block_forwards: dict = {}
        self._needs: dict | None = None  # rank -> units it receives (multi-process)
        if self.mode != "emulate":
            from .transport import open_transport

            device = _device_of(denoiser)
            if device.type == "cpu" and torch.cuda.is_available():
                # one GPU per rank: cuda:LOCAL_RANK, unless the user placed the pipeline already
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(device)
                pipeline.to(device)
            self._transport = open_transport(self.mode, self.rank, self.world_size, self._instance, self.timeout,
                                             device=device)
            self.mode = self._transport.kind  # "auto" resolved to "nccl" or "shm", alike on every rank
        self._orig_forward = denoiser.__dict__.get("forward")
        self._sig = inspect.signature(denoiser.forward)
        params = list(self._sig.parameters)
        self._t_name = "timestep" if "timestep" in params else params[1]
        denoiser.forward = self._denoise
        if self.split is not None:
            self._hook_blocks()

    # ------------------------------------------------------------------ setup
    def _choose_mode(self, transport):
        if transport not in ("auto", "emulate", "shm", "nccl"):
            raise ValueError(f"transport: expected 'auto', 'emulate', 'shm' or 'nccl', got {transport!r}")
        if transport == "nccl":  # say at once when NCCL cannot serve this denoiser here
            from .transport import check_transport

            check_transport("nccl", _device_of(self.denoiser))
        env_world = os.environ.get("WORLD_SIZE")
        if transport == "emulate" or (transport == "auto" and env_world is None):
            return "emulate", 0
        if env_world is None:
            raise ValueError(f"transport: {transport!r} needs a torchrun launch (WORLD_SIZE, RANK are not set)")
        world, rank = int(env_world), int(os.environ.get("RANK", "0"))
        if world != self.world_size:
            raise ValueError(
                f"world size: torchrun started {world} processes but model_n + stride - 1 = "
                f"{self.model_n} + {self.stride} - 1 = {self.world_size}; launch with "
                f"--nproc_per_node={self.world_size}"
            )
        return transport, rank  # "auto" is settled by open_transport, collectively

    def _hook_blocks(self):
        self._units_of = {c: frozenset(comp) for c, comp in enumerate(self.split.components)}
        for unit in self.split.owner:
            mod = self.layout.module(unit, self.denoiser)
            self._block_forwards[unit] = (mod, mod.__dict__.get("forward"))
            mod.forward = self._block_wrapper(unit, mod.forward)

    def _block_wrapper(self, unit, orig):
        def forward(*args, **kwargs):
            p = self._pass
            if p is None:
                return orig(*args, **kwargs)
            if p.compute_all or unit in p.compute:
                out = orig(*args, **kwargs)
                if p.count:
                    self.counts[(p.rank, unit)] += 1
                if p.store:
                    p.stores[unit] = flatten(out)
                return out
            spec, tensors = p.cache[unit]
            return unflatten(spec, tensors)

        return forward

    def remove(self):
        """Detach: the pipeline behaves exactly as before AsyncDiff was attached."""
        for mod, saved in self._block_forwards.values():
            if saved is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = saved
        self._block_forwards.clear()
        if self._orig_forward is None:
            self.denoiser.__dict__.pop("forward", None)
        else:
            self.denoiser.forward = self._orig_forward
        self._published.clear()
        self._cache.clear()
        if self._transport is not None:
            self._transport.close(failed=False)
            self._transport = None

    def reset_state(self, warm_up: int | None = None):
        """Start the next denoiser call as the first of a pipeline call.

        Never required (state resets by itself at each pipeline call); kept
        for scripts written for the original code.
        """
        if warm_up is not None:
            self.warm_up = _check_int("warm_up", warm_up, low=1)
        self._call = None

    # -------------------------------------------------------------- the step
    def _denoise(self, *args, **kwargs):
        if self._failed:
            raise RuntimeError("AsyncDiff: an earlier error left the ranks out of step; create a new AsyncDiff")
        try:
            return self._step(args, kwargs)
        except BaseException:
            self._call = None
            self._pass = None
            if self._transport is not None:
                self._failed = True
                self._transport.close(failed=True)
                self._transport = None
            raise

    def _begin_call(self, source, t):
        sched = self.pipeline.scheduler
        full = source
        begin = getattr(sched, "begin_index", None)
        t0 = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)
        # Most pipelines pass the scheduler's timesteps as they are; flow-matching
        # transformers such as Flux pass them divided by 1000, in the latents' dtype.
        as_passed = t.dtype if isinstance(t, torch.Tensor) and t.is_floating_point() else None
        for divisor in (1, 1000):
            scaled = full / divisor if divisor != 1 else full  # the same float division the pipeline does
            if as_passed is not None:
                scaled = scaled.to(as_passed)
            if isinstance(begin, int) and 0 <= begin < len(full) and float(scaled[begin]) == t0:
                break
            matches = (scaled.float().cpu() == t0).nonzero()
            if len(matches):
                begin = int(matches[0])
                break
        else:
            raise RuntimeError(f"AsyncDiff: the denoiser's first timestep {t0} is not in the scheduler's timesteps")
        timesteps = scaled[begin:]
        schedule = _core.Schedule(self.model_n, self.stride, self.warm_up, int(self.time_shift), len(timesteps))
        self._call = _Call(source, timesteps, schedule)

    def _step(self, args, kwargs):
        bound = self._sig.bind(*args, **kwargs)
        t = bound.arguments[self._t_name]
        source = getattr(self.pipeline.scheduler, "timesteps", None)
        call = self._call
        if call is None or source is not call.source or call.k >= call.steps:
            self._begin_call(source, t)
            call = self._call
        k = call.k
        # A pipeline calling the denoiser twice per step shows at the latest at
        # call 1; reading a GPU timestep costs a device sync, so only then.
        if k <= 1 or not (isinstance(t, torch.Tensor) and t.device.type != "cpu"):
            got = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)
            if got != float(call.timesteps[k]):
                raise RuntimeError(
                    f"AsyncDiff: denoiser call {k} got timestep {got} but the schedule's step {k} is "
                    f"{float(call.timesteps[k])}; pipelines that call the denoiser more than once per step "
                    "are not supported"
                )
        if self.split is None:
            order, costs = splits.count_costs(
                self.layout, self.denoiser, bound.args, bound.kwargs, forward=self._original_forward
            )
            self.split = splits.auto(self.layout, self.model_n, order, costs)
            self._hook_blocks()
        if self.mode != "emulate" and self._needs is None:
            self._plan_traffic(bound)
        if self.mode == "emulate":
            out = self._emulated(bound, call, k)
        else:
            out = self._as_rank(bound, call, k)
        call.k += 1
        return out

    def _original_forward(self, *args, **kwargs):
        return type(self.denoiser).forward(self.denoiser, *args, **kwargs) if self._orig_forward is None \
            else self._orig_forward(*args, **kwargs)

    def _run(self, bound, p: _Pass, call: _Call, tidx: int):
        args, kwargs = bound.args, bound.kwargs
        if tidx != call.k:
            t = bound.arguments[self._t_name]
            new_t = call.timesteps[tidx]
            if isinstance(t, torch.Tensor):
                new_t = new_t.to(device=t.device, dtype=t.dtype).expand(t.shape)
            else:
                new_t = type(t)(new_t.item())
            b = self._sig.bind(*args, **kwargs)
            b.arguments[self._t_name] = new_t
            args, kwargs = b.args, b.kwargs
        self._pass = p
        try:
            return self._original_forward(*args, **kwargs)
        finally:
            self._pass = None

    # ------------------------------------------------------------- emulation
    def _emulated(self, bound, call: _Call, k: int):
        sched = call.schedule
        first = sched.plan(0, k)
        if first.warmup:
            p = _Pass(0, True, frozenset(), first.store, {}, False)
            out = self._run(bound, p, call, first.timestep_index)
            if first.store:
                self._published = p.stores
            return out
        plans = [sched.plan(r, k) for r in range(self.world_size)]
        if all(pl.compute_component < 0 for pl in plans):
            # sync call: every rank replays the owners' last outputs alike
            return self._run(bound, _Pass(0, False, frozenset(), False, self._published, False), call,
                             plans[0].timestep_index)
        outs, staged = {}, {}
        for r, pl in enumerate(plans):
            if pl.compute_component < 0:
                continue
            p = _Pass(r, False, self._units_of[pl.compute_component], pl.store, self._published, True)
            outs[r] = self._run(bound, p, call, pl.timestep_index)
            staged.update(p.stores)
        self._published.update(staged)
        return outs[plans[0].result_rank]

    # ---------------------------------------------------------- multi-process
    def _as_rank(self, bound, call: _Call, k: int):
        plan = call.schedule.plan(self.rank, k)
        if plan.sync and self._synced_seq != self._seq:
            # the owners' outputs arrive at the exchange that ends the call before a sync
            raise RuntimeError("AsyncDiff: a sync with nothing exchanged before it (schedule out of step)")
        if plan.warmup:
            p = _Pass(self.rank, True, frozenset(), plan.store, {}, False)
        else:
            c = plan.compute_component
            p = _Pass(self.rank, False, self._units_of[c] if c >= 0 else frozenset(), plan.store, self._cache, True)
        out = self._run(bound, p, call, plan.timestep_index)
        if plan.store:
            stored = {u: (spec, [t.contiguous() for t in ts]) for u, (spec, ts) in p.stores.items()}
            if plan.warmup:
                self._cache = stored
                self._plan_slots(out)
            else:
                self._cache.update(stored)
        if plan.exchange:
            out = self._exchange(plan, call, k, out)
        return out

    def _plan_traffic(self, bound):
        """Who reads which unit: each rank receives only the outputs that reach
        the blocks it computes (traced once on a meta copy, see traffic.py)."""
        self._needs = traffic.needs(self.layout, self.denoiser, bound.args, bound.kwargs, self.split,
                                    self.model_n, self.stride, forward=self._original_forward)
        self._readers = {u: frozenset(r for r, units in self._needs.items() if u in units) for u in self.split.owner}

    def _plan_slots(self, out):
        """Byte offsets of every unit's tensors and of the result, alike on all ranks."""
        spec, tensors = flatten(out)
        key = tuple((u, tuple((tuple(t.shape), t.dtype) for t in self._cache[u][1])) for u in sorted(self._cache))
        key += (("<result>", ((tuple(tensors[0].shape), tensors[0].dtype),)),)
        if key == self._layout_key:
            return
        offset, slots = 0, {}
        for unit, shapes in key:
            offs = []
            for shape, dtype in shapes:
                offs.append(offset)
                nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
                offset += (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
            slots[unit] = offs
        self._transport.reserve(max(offset, _ALIGN))
        self._slots, self._layout_key = slots, key

    def _exchange(self, plan, call: _Call, k: int, out):
        """One transport event: owners send the outputs they just stored to
        the ranks that read them at the next (sync) call, and the result rank
        sends the denoiser output to everyone."""
        self._seq += 1
        owner, slots, rank = self.split.owner, self._slots, self.rank
        sends, recvs, fresh = [], [], {}
        if plan.publish:
            for unit in sorted(self._units_of[rank]):
                if self._readers[unit]:
                    sends.extend((self._readers[unit], off, t) for off, t in zip(slots[unit], self._cache[unit][1]))
        spec, tensors = flatten(out)
        everyone_else = frozenset(r for r in range(self.world_size) if r != rank)
        if plan.result_rank == rank:
            sends.append((everyone_else, slots["<result>"][0], tensors[0].contiguous()))
        if call.schedule.plan(0, k).publish:  # the owners publish at this event
            self._synced_seq = self._seq
            for unit in self._needs[rank]:
                cached_spec, old = self._cache[unit]
                new = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in old]
                recvs.extend((owner[unit], off, t) for off, t in zip(slots[unit], new))
                fresh[unit] = (cached_spec, new)
        if plan.result_rank >= 0 and plan.result_rank != rank:
            result = torch.empty_like(tensors[0], memory_format=torch.contiguous_format)
            recvs.append((plan.result_rank, slots["<result>"][0], result))
            out = unflatten(spec, [result, *tensors[1:]])
        self._transport.exchange(self._seq, sends, recvs)
        self._cache.update(fresh)
        return out
