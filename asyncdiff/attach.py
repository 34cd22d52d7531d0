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
from collections import Counter

import torch
from diffusers.utils.torch_utils import unwrap_module

from . import arch, hooks, launch, splits
from .config import AsyncDiffConfig
from .emulate import Emulation
from .threads import Threads
from .exchange import ExchangePlan
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

    def move(self, device) -> None:
        for component in getattr(self.pipeline, "components", {}).values():
            if isinstance(component, torch.nn.Module):
                before = launch.device_of(component)
                if before != device:
                    self.moved[component] = before
                    component.to(device)

    def quiet(self) -> None:
        self.progress = {"had": hasattr(self.pipeline, "_progress_bar_config"),
                         "config": copy.copy(getattr(self.pipeline, "_progress_bar_config", {}))}
        self.pipeline.set_progress_bar_config(disable=True)

    def undo(self) -> None:
        for component, device in self.moved.items():
            component.to(device)
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
        ``"auto"``, ``"paper"``, or an explicit split (``"conv_in d0 | ..."``
        or a list of lists of unit names).
    transport: ``"auto"`` (emulation without torchrun; under torchrun NCCL
        when every rank has a GPU and NCCL loads, else shared memory),
        ``"emulate"``, ``"shm"`` or ``"nccl"``.  Under torchrun with CUDA
        available, a pipeline still on the CPU is moved to ``cuda:LOCAL_RANK``
        (and moved back by ``remove()``).
    timeout: seconds of silence any wait for another rank may last before it raises.
    devices: one device per rank, all driven by this process, one thread
        each (``["cpu", "cpu"]``: the speed-up without torchrun, e.g. in Jupyter).
    """

    def __init__(self, pipeline, model_n: int = 2, stride: int = 1, warm_up: int = 1,
                 time_shift: bool = False, *, split=None, transport: str = "auto", timeout: float = 300.0,
                 devices=None):
        # Under torchrun the ranks meet before anything is checked, so that an
        # error on one rank (a bad argument included) reaches the others at
        # once instead of leaving them waiting (docs/design.md §8).
        board = launch.board_if_launched(transport, timeout)
        try:
            self._attach(pipeline, AsyncDiffConfig(model_n, stride, warm_up, time_shift, split, transport, timeout,
                                                   devices), board)
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
        self.pipeline = pipeline
        self.denoiser = denoiser
        self.layout = arch.describe(denoiser)
        n_fine = len(self.layout.fine_units())
        if model_n > n_fine:
            raise ValueError(f"model_n: {model_n} components but the denoiser has only {n_fine} units to share")
        self.split = splits.resolve_static(self.layout, model_n, self.config.split)
        self.counts: Counter = Counter()  # (rank, unit) -> executions in the asynchronous phase
        self._state = hooks.BlockState()
        self._hooked: list = []  # (module, hook name, registry made for it)
        self._changes = _Changes(pipeline)
        if self.config.transport == "nccl":  # say at once when NCCL cannot run here at all
            from .transport import nccl

            nccl.check(None)
        rank = launch.rank_if_launched(self.config)
        if rank is not None and self.config.devices is not None:
            raise ValueError("devices: under torchrun each process drives one device (cuda:LOCAL_RANK); "
                             "drop devices=, or run without torchrun to drive them all from one process")
        if self.config.devices is not None:
            self._mode = Threads(self.config.world_size, {}, self.config.devices)
        elif rank is None:
            self._mode = Emulation(self.config.world_size, {})
        else:
            from .transport import join

            self._mode = self._open_rank(board if board is not None else join(self.config.timeout))
        self._loop = Loop(self.config, pipeline, denoiser, self._state, self._prepare, self._mode, self.counts)
        self._hook(denoiser, hooks.DenoiserHook(self._loop), hooks.DENOISER_HOOK)
        if self.split is not None:
            self._hook_blocks()

    # ---------------------------------------------------------------- public
    @property
    def rank(self) -> int:
        return self._mode.rank

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

    def reset_state(self, warm_up: int | None = None):
        """Start the next denoiser call as the first of a pipeline call.

        Never required (state resets by itself at each pipeline call); kept
        for scripts written for the original code."""
        if warm_up is not None:
            self._loop.config = dataclasses.replace(self._loop.config, warm_up=warm_up)  # validated again
        self._loop.reset()

    def remove(self):
        """Detach: the pipeline behaves exactly as before AsyncDiff was attached."""
        for module, name, created in reversed(self._hooked):
            hooks.unregister(module, name, created)
        self._hooked.clear()
        self._mode.close(failed=False)
        self._changes.undo()

    # ----------------------------------------------------------------- setup
    def _hook(self, module, hook, name):
        self._hooked.append((module, name, hooks.register(module, hook, name)))

    def _hook_blocks(self):
        units_of = {c: frozenset(comp) for c, comp in enumerate(self.split.components)}
        self._mode.units_of.update(units_of)
        for unit in self.split.owner:
            self._hook(self.layout.module(unit, self.denoiser), hooks.BlockHook(unit, self._state), hooks.BLOCK_HOOK)

    def _prepare(self, forward, bound):
        """At the first denoiser call: the automatic split (it needs the real
        input shapes) and, for a rank, the exchange plan."""
        if self.split is None:
            order, costs = splits.count_costs(self.layout, self.denoiser, bound.args, bound.kwargs, forward=forward)
            self.split = splits.auto(self.layout, self.config.model_n, order, costs)
            self._hook_blocks()
        if self._mode.kind != "emulate":
            self._mode.plan = ExchangePlan.trace(self.config, self.layout, self.split, self.denoiser,
                                                 bound.args, bound.kwargs, forward=forward)

    def _open_rank(self, board):
        """This process is rank ``board.rank``: its device, the transport, one progress bar."""
        from . import transport
        from .rank import RankStep

        device = launch.device_of(self.denoiser)
        if device.type == "cpu" and torch.cuda.is_available():
            # one GPU per rank: cuda:LOCAL_RANK, unless the user placed the pipeline already
            device = launch.rank_device()
            torch.cuda.set_device(device)
            self._changes.move(device)
        facts = {**self.config.summary(), "denoiser": f"{type(self.denoiser).__name__}/{self.layout.family}/"
                                                      f"{len(self.layout.fine_units())} units"}
        rank = board.rank
        try:
            link = transport.open_transport(self.config.transport, board, device=device, facts=facts)
        except BaseException:
            self._changes.undo()
            raise
        if rank != 0:
            self._changes.quiet()
        log.info("rank %d of %d: %s transport, denoiser on %s", rank, self.config.world_size, link.kind, device)
        return RankStep(rank, {}, link, board)
