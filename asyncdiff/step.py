"""One denoiser call: the state of a pipeline call and the loop every call goes through.

The denoiser hook hands each call to ``Loop``.  It keeps the state of the
pipeline call in progress (``Call``: the list of timesteps T the scheduler
set, the C schedule for its length, the index k of this denoiser call),
checks the call fits the schedule, and asks the execution mode (``Emulation``
or ``RankStep``) to carry out what the C schedule says for call k.  A mode
runs forwards through ``Loop.run`` with a ``Pass`` that tells every block
hook whether to compute or replay.  See docs/design.md §3 and §6.

Nothing here knows a schedule rule: it reads ``_core.Schedule.plan``.
"""

from __future__ import annotations

import inspect
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from . import _core


@dataclass
class Pass:
    """What the block hooks do during one forward of one rank.

    compute: the units computed, or None for every unit (warm-up); the others
    replay ``cache``.  store: computed units record their outputs in
    ``stores``.  count: the units that ran are counted (asynchronous phase).
    tidx: the forward's timestep argument is T[tidx].  relay: a warm-up pass
    of a rank that holds only its own blocks (docs/design.md §6.5):
    ``relay(unit, out)`` sends a unit this rank computed to the others, and
    ``relay(unit, None)`` returns a unit it does not compute, received from
    its owner."""

    rank: int
    compute: frozenset | None
    store: bool
    cache: dict
    count: bool
    tidx: int  # the timestep argument is T[tidx]
    stores: dict = field(default_factory=dict)
    ran: list = field(default_factory=list)
    relay: object = None


@dataclass
class Call:
    """One pipeline call (one denoising loop)."""

    source: object  # the scheduler's timesteps tensor this call came from
    timesteps: torch.Tensor  # T, as the pipeline passes them
    schedule: object  # _core.Schedule for len(T)
    inputs: tuple  # shapes and dtypes of the first call's tensor inputs
    config: object = None  # the AsyncDiffConfig this call runs with (reset_state may change warm_up)
    k: int = 0
    bound: object = None  # the arguments of the denoiser call in progress (inspect.BoundArguments)

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def timestep_name(denoiser: torch.nn.Module) -> tuple[inspect.Signature, str]:
    """The signature of the denoiser's own forward and its timestep parameter
    (read from the class, so wrappers such as torch.compile's do not hide it)."""
    sig = inspect.signature(type(denoiser).forward)
    params = [p for p in sig.parameters if p != "self"]
    sig = sig.replace(parameters=[sig.parameters[p] for p in params])
    if "timestep" in params:
        return sig, "timestep"
    if len(params) < 2:
        raise TypeError(f"denoiser: {type(denoiser).__name__}.forward takes no timestep argument")
    return sig, params[1]


def _first(t) -> float:
    return float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)


def locate_timesteps(scheduler, t) -> torch.Tensor:
    """T for this pipeline call: the scheduler's timesteps from the one the
    denoiser got first (img2img with strength < 1 starts late), in the form the
    pipeline passes them (flow-matching transformers such as Flux divide by
    1000 in the latents' dtype)."""
    full = scheduler.timesteps
    begin = getattr(scheduler, "begin_index", None)
    t0 = _first(t)
    as_passed = t.dtype if isinstance(t, torch.Tensor) and t.is_floating_point() else None
    for divisor in (1, 1000):
        scaled = full / divisor if divisor != 1 else full  # the same float division the pipeline does
        if as_passed is not None:
            scaled = scaled.to(as_passed)
        if isinstance(begin, int) and 0 <= begin < len(full) and float(scaled[begin]) == t0:
            return scaled[begin:]
        matches = (scaled.float().cpu() == t0).nonzero()
        if len(matches):
            return scaled[int(matches[0]):]
    raise RuntimeError(f"AsyncDiff: the denoiser's first timestep {t0} is not in the scheduler's timesteps")


def _shapes(bound: inspect.BoundArguments, skip: str) -> tuple:
    """Shapes and dtypes of the tensors a call passes (the timestep aside)."""
    out = []
    for name, value in bound.arguments.items():
        if name == skip:
            continue
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for key, v in items:
            if isinstance(v, torch.Tensor):
                out.append((name, key, tuple(v.shape), v.dtype))
    return tuple(out)


def run_in_turn(forward, runs: list, state) -> list:
    """Run the forwards of ``runs`` ((pass, args, kwargs)) one after another in
    this thread, each with its pass visible to the block hooks."""
    outs = []
    for p, a, kw in runs:
        state.current = p
        try:
            outs.append(forward(*a, **kw))
        finally:
            state.current = None
    return outs


class Loop:
    """The body of the denoiser hook (see the module docstring).

    mode: ``Emulation`` or ``RankStep``.  ``begin(call, k)`` gives the passes
    of call k (one forward each), ``finish(call, k, passes, outputs)`` the
    denoiser output after them.  ``prepare(forward, bound)`` runs once, at
    the first call, when the inputs' shapes are known (the automatic split,
    the exchange plan).

    Under ``torch.compile`` only the denoiser's own forward is compiled: this
    frame is skipped, and the bookkeeping before and after the forwards
    (``_begin``, ``_finish``) is never traced."""

    def __init__(self, config, pipeline, denoiser, state, prepare, mode, counts, rank_base: int = 0):
        self.config = config
        self.pipeline = pipeline
        self.signature, self.t_name = timestep_name(denoiser)
        self.state = state
        self.prepare = prepare
        self.mode = mode
        self.counts = counts  # collections.Counter of (rank, unit)
        self.rank_base = rank_base  # cfg_parallel: the mode's ranks are rank_base + its own numbers
        self.call: Call | None = None
        self.stats: dict = {}  # phase ("warm-up", "async") -> Counter of seconds (see _time)
        self.prepared = False

    def reset(self):
        self.call = None

    @torch.compiler.disable(recursive=False)
    def __call__(self, forward, args, kwargs):
        mode = self.mode
        mode.busy(True)
        try:
            t0 = time.perf_counter()
            call, k, runs = self._begin(forward, args, kwargs)
            t1 = time.perf_counter()
            outs = mode.run(forward, runs, self.state)
            t2 = time.perf_counter()
            out = self._finish(call, k, [p for p, _, _ in runs], outs)
            self._time(runs, t0, t1, t2, time.perf_counter())
            return out
        except BaseException as exc:
            mode.fail(exc)  # the other ranks learn it now, not after `timeout` (docs/design.md §8)
            self.call = None
            raise
        finally:
            mode.busy(False)

    def _time(self, runs, t0, t1, t2, t3):
        """Where a denoiser call's time went (``AsyncDiff.stats``): the forwards
        (``compute``: on a GPU the time to issue them), the bookkeeping before
        and after them, and what the mode reports in ``took`` (its transport
        events).  The first call (it also resolves the split) is left out."""
        if self.prepared:
            phase = self.stats.setdefault("async" if any(p.count for p, _, _ in runs) else "warm-up", Counter())
            phase.update(calls=1, begin=t1 - t0, compute=t2 - t1, finish=t3 - t2)
            phase.update(getattr(self.mode, "took", None) or {})
        self.prepared = True
        took = getattr(self.mode, "took", None)
        if took is not None:
            took.clear()

    @torch.compiler.disable
    def _begin(self, forward, args, kwargs):
        """The call's state, k, and the forwards to run: (pass, args, kwargs)."""
        bound = self.signature.bind(*args, **kwargs)
        t = bound.arguments[self.t_name]
        source = getattr(self.pipeline.scheduler, "timesteps", None)
        call = self.call
        if call is None or source is not call.source or call.k >= call.steps:
            timesteps = locate_timesteps(self.pipeline.scheduler, t)
            schedule = _core.Schedule(self.config.model_n, self.config.stride, self.config.warm_up,
                                      int(self.config.time_shift), len(timesteps))
            call = self.call = Call(source, timesteps, schedule, _shapes(bound, self.t_name), self.config)
        k = call.k
        call.bound = bound
        self._check(call, k, t, bound)
        if k == 0:
            self.mode.start(call)
        if self.prepare is not None:
            self.prepare(forward, bound)
            self.prepare = None
        return call, k, [(p, *self._arguments(bound, call, k, p.tidx)) for p in self.mode.begin(call, k)]

    @torch.compiler.disable
    def _finish(self, call: Call, k: int, passes: list, outs: list):
        for p in passes:
            if p.count:
                for unit in p.ran:
                    self.counts[(self.rank_base + p.rank, unit)] += 1
        out = self.mode.finish(call, k, passes, outs)
        call.k += 1
        call.bound = None
        return out

    def _check(self, call: Call, k: int, t, bound):
        # A pipeline calling the denoiser twice per step shows at the latest at
        # call 1; reading a GPU timestep costs a device sync, so only then.
        if k <= 1 or not (isinstance(t, torch.Tensor) and t.device.type != "cpu"):
            got = _first(t)
            if got != float(call.timesteps[k]):
                raise RuntimeError(
                    f"AsyncDiff: denoiser call {k} got timestep {got} but the schedule's step {k} is "
                    f"{float(call.timesteps[k])}; pipelines that call the denoiser more than once per step "
                    "are not supported"
                )
        if k and _shapes(bound, self.t_name) != call.inputs:
            now = {(n, key): (s, d) for n, key, s, d in _shapes(bound, self.t_name)}
            changed = [f"{n}{'' if key is None else '[' + repr(key) + ']'}: {s} -> {now.get((n, key), ('gone',))[0]}"
                       for n, key, s, d in call.inputs if now.get((n, key)) != (s, d)]
            raise ValueError(
                f"AsyncDiff: the denoiser's inputs changed shape at step {k} of this pipeline call "
                f"({'; '.join(changed) or 'new inputs'}); AsyncDiff replays block outputs cached with the "
                "first step's shapes, so a call's batch must stay the same from its first step to its last "
                "(a callback_on_step_end that drops the unconditional half, as in diffusers' dynamic "
                "classifier-free-guidance recipe, cannot be combined with AsyncDiff)"
            )

    def _arguments(self, bound, call: Call, k: int, tidx: int):
        """The forward's (args, kwargs) with the timestep argument T[tidx]."""
        if tidx == k:
            return bound.args, bound.kwargs
        t = bound.arguments[self.t_name]
        new_t = call.timesteps[tidx]
        if isinstance(t, torch.Tensor):
            new_t = new_t.to(device=t.device, dtype=t.dtype).expand(t.shape)
        else:
            new_t = type(t)(new_t.item())
        b = self.signature.bind(*bound.args, **bound.kwargs)
        b.arguments[self.t_name] = new_t
        return b.args, b.kwargs
