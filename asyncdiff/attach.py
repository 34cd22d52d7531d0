"""``AsyncDiff``: attach asynchronous denoising to a diffusers pipeline, and detach it.

``AsyncDiff(pipe, model_n, stride, warm_up, time_shift)`` validates its
options (``AsyncDiffConfig``), recognises the denoiser (``arch``), resolves
the split (``splits``), chooses how to run (emulation in one process, or one
rank of a torchrun launch with a transport), and registers two diffusers
hooks (``hooks``): one on the denoiser, one on each block of the split.  The
pipeline's ``__call__`` is untouched.  ``remove()`` takes exactly those hooks
away and undoes every device move it made.  See docs/design.md §6.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections import Counter

import torch
from diffusers.utils.torch_utils import unwrap_module

from . import _core, arch, cfg, encoders, hooks, launch, shard, splits
from .config import AsyncDiffConfig
from .emulate import Emulation
from .threads import Threads
from .exchange import ExchangePlan
from .probe import probe
from .step import Loop

log = logging.getLogger("asyncdiff")


def _denoiser_of(pipeline) -> torch.nn.Module:
    for name in ("unet", "transformer"):
        module = getattr(pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            return unwrap_module(module)  # torch.compile's wrapper calls the real module's forward
    raise TypeError(f"pipeline: {type(pipeline).__name__} has no `unet` or `transformer` module; "
                    "AsyncDiff needs a diffusers pipeline")


class _Changes:
    """What attaching changed on the pipeline beyond hooks, undone by ``undo``:
    components moved to the rank's device, rank > 0's progress bar turned off."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.moved: dict = {}  # pipeline component -> the device it was on
        self.progress: dict | None = None

    def move(self, device, placers: dict | None = None) -> None:
        """Move every component to ``device``; ``placers``: component -> a
        function that moves it instead (the denoiser of a sharded rank moves
        only what the rank keeps)."""
        placers = placers or {}
        for component in getattr(self.pipeline, "components", {}).values():
            if isinstance(component, torch.nn.Module):
                before = launch.device_of(component)
                if before != device:
                    self.moved[component] = before
                    placers.get(component, lambda d, c=component: c.to(d))(device)

    def quiet(self) -> None:
        self.progress = {"had": hasattr(self.pipeline, "_progress_bar_config"),
                         "config": copy.copy(getattr(self.pipeline, "_progress_bar_config", {}))}
        self.pipeline.set_progress_bar_config(disable=True)

    def undo(self) -> None:
        for component, device in self.moved.items():
            shard.move_real(component, device)  # other ranks' blocks stay on the meta device
        self.moved.clear()
        if self.progress is not None:
            self.pipeline._progress_bar_config = self.progress["config"]
            if not self.progress["had"]:
                del self.pipeline._progress_bar_config
            self.progress = None


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
        ``"auto"`` (balanced on FLOPs), ``"time"`` (balanced on each unit's
        measured time), ``"memory"`` (balanced on weight bytes: the least
        memory per rank), ``"paper"``, or an explicit split (``"conv_in d0 | ..."``
        or a list of lists of unit names).
    transport: ``"auto"`` (emulation without torchrun; under torchrun NCCL
        when every rank has a GPU and NCCL loads, else shared memory),
        ``"emulate"``, ``"shm"`` or ``"nccl"``.  Under torchrun with CUDA
        available, a pipeline still on the CPU is moved to ``cuda:LOCAL_RANK``
        (and moved back by ``remove()``).
    timeout: seconds of silence any wait for another rank may last before it raises.
    devices: one device per rank, all driven by this process, one thread
        each (``["cpu", "cpu"]``: the speed-up without torchrun, e.g. in Jupyter).
    keep_weights: under torchrun, keep the whole denoiser on every rank.  By
        default each rank keeps only the blocks of its own component and the
        glue, and moves the others' weights to the meta device (1/N of the
        denoiser per device); ``remove()`` then leaves a pipeline that must
        be reloaded.  Emulation and ``devices=`` keep every weight (one
        process plays every rank).
    encoders: ``"all"`` (every rank runs the text encoders) or ``"rank0"``:
        under torchrun only rank 0 runs ``encode_prompt`` and the others
        receive its embeddings and free their text encoders (the outputs do
        not change; ranks other than 0 must reload the pipeline after
        ``remove()``).  No effect in one process.
    cfg_parallel: split the classifier-free-guidance batch in its two halves
        (unconditional, conditional), each on its own group of
        ``model_n + stride - 1`` ranks running the asynchronous schedule;
        the halves are joined after every denoiser call, so a launch has
        ``2 * (model_n + stride - 1)`` ranks.  In emulation the two groups
        are played in turn; with ``devices=`` (twice as many devices) they
        run at the same time.  Every call must use guidance (a batch of two
        halves); Flux (distilled guidance) is refused.
    """

    def __init__(self, pipeline, model_n: int = 2, stride: int = 1, warm_up: int = 1,
                 time_shift: bool = False, *, split=None, transport: str = "auto", timeout: float = 300.0,
                 devices=None, keep_weights: bool = False, encoders: str = "all", cfg_parallel: bool = False):
        # Under torchrun the ranks meet before anything is checked, so that an
        # error on one rank (a bad argument included) reaches the others at
        # once instead of leaving them waiting (docs/design.md §8).
        board = launch.board_if_launched(transport, timeout)
        try:
            self._attach(pipeline, AsyncDiffConfig(model_n, stride, warm_up, time_shift, split, transport, timeout,
                                                   devices, keep_weights, encoders, cfg_parallel), board)
        except BaseException as exc:
            if board is not None:
                board.fail(exc)
            raise

    def _attach(self, pipeline, config: AsyncDiffConfig, board):
        self.config = config
        model_n = config.model_n
        denoiser = _denoiser_of(pipeline)
        if not hasattr(getattr(pipeline, "scheduler", None), "timesteps"):
            raise TypeError(f"pipeline: {type(pipeline).__name__} has no scheduler with timesteps")
        if hooks.attached_hook(denoiser) is not None:
            raise RuntimeError("pipeline: AsyncDiff is already attached to this pipeline's denoiser; call "
                               "remove() on that AsyncDiff first (e.g. `ad.remove()` before re-running the cell)")
        shard.check_real(denoiser)
        if config.cfg_parallel:
            cfg.refuse(denoiser)
        self.pipeline = pipeline
        self.denoiser = denoiser
        self.layout = arch.describe(denoiser)
        n_fine = len(self.layout.fine_units())
        if model_n > n_fine:
            raise ValueError(f"model_n: {model_n} components but the denoiser has only {n_fine} units to share")
        self.split = splits.resolve_static(self.layout, model_n, self.config.split, denoiser)
        self.counts: Counter = Counter()  # (rank, unit) -> executions in the asynchronous phase
        self._state = hooks.BlockState()
        self._hooked: list = []  # (module, hook name, registry made for it)
        self._changes = _Changes(pipeline)
        if self.config.transport == "nccl":  # say at once when NCCL cannot run here at all
            from .transport import nccl

            nccl.check(None)
        rank = launch.rank_if_launched(self.config)
        # under a launch a rank keeps only its own blocks (docs/design.md §6.5)
        self.sharded = rank is not None and not self.config.keep_weights
        self.freed = 0  # bytes of other ranks' weights moved to the meta device
        self._device = None  # a rank's device (set when its transport opens)
        if rank is not None and self.config.devices is not None:
            raise ValueError("devices: under torchrun each process drives one device (cuda:LOCAL_RANK); "
                             "drop devices=, or run without torchrun to drive them all from one process")
        group = self.config.group_size
        self._base = 0  # cfg_parallel: the first rank of this process's group
        devices = self.config.devices
        if devices is not None:
            # with cfg_parallel the first group has the first half of the devices, and the CPU ranks of
            # both groups share the cores
            sharing = sum(torch.device(d).type == "cpu" for d in devices) if self.config.cfg_parallel else None
            self._mode = Threads(group, {}, devices[:group], sharing=sharing)
            first = torch.device(self.config.devices[0])
            if first.type != "cpu" and launch.device_of(denoiser) != first:
                self._changes.move(first)  # rank 0 runs the pipeline's own denoiser there
        elif rank is None:
            self._mode = Emulation(group, {})
        else:
            from .transport import join

            self._mode = self._open_rank(board if board is not None else join(self.config.timeout))
        # the groups this process plays (docs/design.md §6.7): its own, or with cfg_parallel in one
        # process both, the second with a mode of its own sharing the first's split
        self._modes = [self._mode]
        if self.config.cfg_parallel and rank is None:
            self._modes.append(Emulation(group, self._mode.units_of) if devices is None else
                               Threads(group, self._mode.units_of, devices[group:], home=devices[0], sharing=sharing))
        first = self._base // group
        loops = [(first + i, Loop(self.config, pipeline, denoiser, self._state, self._prepare, mode, self.counts,
                                  rank_base=self._base + i * group))
                 for i, mode in enumerate(self._modes)]
        self._loop = loops[0][1]
        self._loops = [loop for _, loop in loops]
        body = self._loop
        if self.config.cfg_parallel:
            body = cfg.Halves(loops, pipeline, self._loop.signature, next(iter(self._loop.signature.parameters)),
                              together=devices is not None)
        self._hook(denoiser, hooks.DenoiserHook(body), hooks.DENOISER_HOOK)
        if self.split is not None:
            self._hook_blocks()
            self._shard()
        self._prompts = None
        if rank is not None and self.config.encoders == "rank0":
            self._prompts = encoders.PromptRelay(pipeline, self._mode.board, self._device)

    # ---------------------------------------------------------------- public
    @property
    def rank(self) -> int:
        return self._base + self._mode.rank

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def mode(self) -> str:
        """"emulate", "threads" (devices= in one process), or the transport of a multi-process run
        ("shm", "nccl")."""
        return self._mode.kind

    @property
    def model_n(self) -> int:
        return self.config.model_n

    @property
    def stride(self) -> int:
        return self.config.stride

    @property
    def warm_up(self) -> int:
        return self._loop.config.warm_up

    @property
    def time_shift(self) -> bool:
        return self.config.time_shift

    @property
    def stats(self) -> dict:
        """Where the denoiser calls' time went, per phase ("warm-up", "async"):
        ``calls`` and milliseconds per call: ``compute`` (the forwards without
        the warm-up's events; on a GPU the time to issue them), ``exchange``
        (transport events, a sharded warm-up's included; on shared
        memory split into ``publish``, copying in, and ``fetch``, waiting for
        the owners and copying out), ``bookkeeping`` (hooks, schedule and
        exchange plan outside the forwards and the events), and the bytes
        sent and received per call; with ``cfg_parallel`` ``join`` is the
        part of ``exchange`` spent swapping halves with the twin.  The first
        call is left out."""
        out = {}
        for phase, c in self._loop.stats.items():
            n = c["calls"]
            relay = c.get("relay", 0.0)  # events during the forwards, and after them
            after = c.get("exchange", 0.0) + c.get("join", 0.0)
            ms = {"compute": 1e3 * (c["compute"] - relay) / n}
            if "relay" in c or "exchange" in c or "join" in c:
                ms["exchange"] = 1e3 * (relay + after) / n
            ms.update({key: 1e3 * c[key] / n for key in ("join", "publish", "fetch") if key in c})
            ms["bookkeeping"] = 1e3 * (c["begin"] + c["finish"] - after) / n
            out[phase] = {"calls": n, "ms per call": ms,
                          "bytes per call": {k: c[k] / n for k in ("bytes sent", "bytes received") if k in c},
                          "events per call": c.get("events", 0) / n}
        return out

    def reset_state(self, warm_up: int | None = None):
        """Start the next denoiser call as the first of a pipeline call.

        Never required (state resets by itself at each pipeline call); kept
        for scripts written for the original code."""
        if warm_up is not None:
            config = dataclasses.replace(self._loop.config, warm_up=warm_up)  # validated again
            for loop in self._loops:
                loop.config = config
        for loop in self._loops:
            loop.reset()

    def remove(self):
        """Detach: the pipeline behaves exactly as before AsyncDiff was attached.

        A sharded rank (``keep_weights=False`` under torchrun) no longer holds
        the other ranks' blocks: its denoiser is left with a hook that makes
        every call raise a RuntimeError saying so; reload the pipeline."""
        for module, name, created in reversed(self._hooked):
            hooks.unregister(module, name, created)
        self._hooked.clear()
        for mode in self._modes:
            mode.close(failed=False)
        if self._prompts is not None:
            self._prompts.remove()
        self._changes.undo()
        if shard.meta_names(self.denoiser) and hooks.attached_hook(self.denoiser, shard.GUARD_HOOK) is None:
            hooks.register(self.denoiser, shard.Guard(self.rank, self._component()), shard.GUARD_HOOK)

    # ----------------------------------------------------------------- setup
    def _hook(self, module, hook, name):
        self._hooked.append((module, name, hooks.register(module, hook, name)))

    def _hook_blocks(self):
        units_of = {c: frozenset(comp) for c, comp in enumerate(self.split.components)}
        self._mode.units_of.update(units_of)
        for unit in self.split.owner:
            self._hook(self.layout.module(unit, self.denoiser), hooks.BlockHook(unit, self._state), hooks.BLOCK_HOOK)
        for mode in self._modes:  # the other devices' copies of their components
            if isinstance(mode, Threads):
                mode.attach_split(self.denoiser, self.layout, self.split, self._state, self._component)

    def _component(self, rank: int | None = None) -> int:
        """The component this process (rank ``rank``) computes after warm-up."""
        c = self.config
        schedule = _core.Schedule(c.model_n, c.stride, c.warm_up, int(c.time_shift), 1)
        return schedule.component_of((self.rank if rank is None else rank) % c.group_size)

    def _shard(self, device=None):
        """A sharded rank, once the split is known: the other components'
        weights go to the meta device, its own blocks to ``device`` (None:
        where they are; docs/design.md §6.5)."""
        if self.sharded:
            self.freed += shard.place(self.denoiser, self.layout, self.split.owner, self._held(), device)

    def _held(self, rank: int | None = None) -> frozenset:
        """The units a rank keeps: those of the component it computes after warm-up."""
        return shard.held_units(self.split.components, self._component(rank))

    def _prepare(self, forward, bound):
        """At the first denoiser call: the automatic split (it needs the real
        input shapes) and, for a rank, the exchange plan."""
        if self.split is None:
            if self.config.split == "time":
                order, costs = self._measured_costs(forward, bound)
            else:
                order, costs = splits.count_costs(self.layout, self.denoiser, bound.args, bound.kwargs,
                                                  forward=forward)
            self.split = splits.auto(self.layout, self.config.model_n, order, costs,
                                     source="time" if self.config.split == "time" else "auto")
            self._hook_blocks()
            self._shard(self._device)  # the blocks it keeps join the glue on the rank's device
        if self._mode.kind not in ("emulate", "threads"):
            self._mode.plan = ExchangePlan.trace(self.config, self.layout, self.split, self.denoiser,
                                                 bound.args, bound.kwargs, forward=forward)
            if self.sharded and self.config.group_size > 1:  # (one rank per group holds every block)
                layout, denoiser = self.layout, self.denoiser
                self._mode.expect = lambda b: probe(layout, denoiser, b.args, b.kwargs, forward)

    def _measured_costs(self, forward, bound):
        """``split="time"``: every fine unit timed on this device for these
        inputs (threads: each worker's share in the threads mode).  Under a
        launch every rank measures at the same time, on its own device and
        with its peers busy as they will be, and each unit's cost is the mean
        over the ranks, from the same gathered figures on every rank, so
        every rank derives the same split (docs/design.md §2)."""
        order, costs = splits.count_times(self.layout, self.denoiser, bound.args, bound.kwargs, forward=forward,
                                          threads=getattr(self._mode, "intra_op", None))
        board = getattr(self._mode, "board", None)
        if board is None:
            return order, costs
        every = launch.gather(board, "split-time", {"order": list(order), "costs": list(costs)})
        if any(e["order"] != every[0]["order"] for e in every):
            raise RuntimeError("split: the ranks' denoisers ran their units in different orders; every rank "
                               "must run the same model")
        return every[0]["order"], [math.fsum(e["costs"][i] for e in every) / len(every) for i in range(len(order))]

    def _open_rank(self, board):
        """This process is rank ``board.rank``: its device, the transport, one progress bar."""
        from . import transport
        from .rank import RankStep

        device = self._device = launch.device_of(self.denoiser)
        if device.type == "cpu" and torch.cuda.is_available():
            # one GPU per rank: cuda:LOCAL_RANK, unless the user placed the pipeline already
            device = self._device = launch.rank_device()
            torch.cuda.set_device(device)
            placers = None
            if self.sharded:  # only the glue and this rank's blocks (all blocks: at the first call)
                held = None if self.split is None else self._held(board.rank)
                units = self.layout.top if self.split is None else self.split.owner
                if self.split is None and self.config.split == "time":
                    held = frozenset(units)  # timed on this device at the first call, then sharded
                placers = {self.denoiser: lambda d: shard.place(self.denoiser, self.layout, units, held, d)}
            self._changes.move(device, placers)
        facts = {**self.config.summary(), "denoiser": f"{type(self.denoiser).__name__}/{self.layout.family}/"
                                                      f"{len(self.layout.fine_units())} units"}
        rank = board.rank
        group = None
        if self.config.cfg_parallel:
            group = (rank // self.config.group_size, self.config.group_size)
            self._base = group[0] * group[1]
        try:
            link = transport.open_transport(self.config.transport, board, device=device, facts=facts)
        except BaseException:
            self._changes.undo()
            raise
        if rank != 0:
            self._changes.quiet()
        log.info("rank %d of %d: %s transport, denoiser on %s", rank, self.config.world_size, link.kind, device)
        return RankStep(rank - self._base, {}, link, board, device=device, group=group)
