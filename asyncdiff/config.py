"""AsyncDiff's options: one frozen, validated record, and the command-line flags for it.

``AsyncDiffConfig`` holds what ``AsyncDiff(pipe, model_n, stride, warm_up,
time_shift, split=..., transport=..., timeout=...)`` was given, checked once
(every rank checks its own, with the ranges the C core accepts) and then
never changed.  Under torchrun the ranks compare their configs once, at the
rendezvous (``transport/__init__.py``); ``summary()`` is what they compare.

``add_arguments`` / ``from_args`` give scripts the original project's flags
(``--model_n --stride --warm_up --time_shift``) with real booleans and the
same checks, so a bad flag fails before any model is loaded.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch

from . import _core

# Limits the C core accepts (csrc/schedule.c takes C ints; waits are capped).
MAX_INT = 2**31 - 2
MAX_TIMEOUT = 1e9
TRANSPORTS = ("auto", "emulate", "shm", "nccl")


def check_int(name: str, value, low: int = 1, high: int = MAX_INT, choices: tuple | None = None) -> int:
    """``value`` as an int in [low, high] (or one of ``choices``), else a
    TypeError/ValueError naming ``name``.  bool is not an int here."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if choices is not None and value not in choices:
        raise ValueError(f"{name}: must be one of {', '.join(map(str, choices))}, got {value}")
    if not low <= value <= high:
        shown = value if abs(value) < 10**12 else f"{'-' if value < 0 else ''}a {len(str(abs(value)))}-digit number"
        raise ValueError(f"{name}: must be in [{low}, {high}], got {shown}")
    return value


def check_timeout(value) -> float:
    """A positive, finite number of seconds up to the C core's cap."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"timeout: expected a number of seconds, got {type(value).__name__}")
    if math.isnan(value) or not 0 < value <= MAX_TIMEOUT:
        raise ValueError(f"timeout: must be a number of seconds in (0, {MAX_TIMEOUT:.0e}] (every wait for "
                         f"another rank is bounded; there is no 'wait forever'), got {value!r}")
    return float(value)


def _normalise_split(split):
    """None, "auto", "time", "paper" or an explicit split as a string or a tuple of
    tuples of unit names (hashable, so the config can be frozen)."""
    if split is None or isinstance(split, str):
        return split
    if isinstance(split, (list, tuple)):
        comps = []
        for part in split:
            if isinstance(part, str):
                comps.append(part)
            elif isinstance(part, (list, tuple)) and all(isinstance(u, str) for u in part):
                comps.append(tuple(part))
            else:
                raise TypeError(f"split: a component must be a string or a list of unit names, got {part!r}")
        return tuple(comps)
    raise TypeError(f"split: expected None, 'auto', 'time', 'memory', 'paper', a string or a list of components, "
                    f"got {type(split).__name__}")


def _normalise_devices(devices, world: int):
    """None, or a tuple of ``world`` device names, all of one type.  ``"auto"``:
    the first ``world`` visible GPUs."""
    if devices is None:
        return None
    if isinstance(devices, str):
        if devices != "auto":
            raise ValueError(f"devices: expected a list of devices, e.g. ['cuda:0', 'cuda:1'], or 'auto', "
                             f"got {devices!r}")
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible < world:
            raise ValueError(f"devices='auto': {visible} GPU(s) visible, {world} needed (one per rank); "
                             f"give the devices, e.g. devices={['cpu'] * world!r}")
        return tuple(f"cuda:{i}" for i in range(world))
    if not isinstance(devices, (list, tuple)) or not devices:
        raise TypeError(f"devices: expected a non-empty list of devices, got {type(devices).__name__}")
    parsed = []
    for d in devices:
        try:
            parsed.append(torch.device(d))
        except (RuntimeError, TypeError):
            raise ValueError(f"devices: {d!r} is not a device") from None
    kinds = {dev.type for dev in parsed}
    if len(kinds) > 1:
        raise ValueError(f"devices: mixed device types {sorted(kinds)}; give devices of one type")
    names = []
    for given, dev in zip(devices, parsed):
        if dev.type == "cuda":
            visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = 0 if dev.index is None else dev.index
            if index >= visible:
                raise ValueError(f"devices: {given!r} does not exist ({visible} CUDA device(s) visible)")
            dev = torch.device("cuda", index)
        elif dev.type != "cpu":
            raise ValueError(f"devices: {given!r}: only CPU and CUDA devices are supported")
        names.append(str(dev))
    return tuple(names)


@dataclass(frozen=True)
class AsyncDiffConfig:
    """What AsyncDiff runs with; validated when made.

    model_n: components the denoiser is cut into (>= 1).
    stride: 1, or 2 (one extra rank; each parallel round covers two steps).
    warm_up: denoiser calls computed whole before going asynchronous (>= 1).
    time_shift: give each component the previous step's timestep.
    split: None (the paper's preset when the architecture has one, else
        "auto"), "auto", "paper", or an explicit split.
    transport: "auto", "emulate", "shm" or "nccl".
    timeout: seconds of silence any wait for another rank may last, in (0, 1e9].
    devices: None, or one device per rank (model_n + stride - 1) driven by
        this one process, one thread each (``["cpu", "cpu"]``,
        ``["cuda:0", "cuda:1"]``), or ``"auto"`` (the first visible GPUs).
    keep_weights: under a launch, keep the whole denoiser on every rank
        (False: each rank keeps its own blocks and the glue, the rest goes to
        the meta device; docs/design.md §6.5).
    encoders: "all" (every rank runs the text encoders) or "rank0" (under a
        launch only rank 0 does; the others receive the embeddings and free
        their text encoders; docs/design.md §6.6).
    cfg_parallel: split the classifier-free-guidance batch: two groups of
        ``group_size`` ranks, one per half, each running the schedule on its
        half; the halves are joined after every denoiser call
        (docs/design.md §6.7).
    """

    model_n: int = 2
    stride: int = 1
    warm_up: int = 1
    time_shift: bool = False
    split: object = field(default=None)
    transport: str = "auto"
    timeout: float = 300.0
    devices: tuple | None = None
    keep_weights: bool = False
    encoders: str = "all"
    cfg_parallel: bool = False

    def __post_init__(self):
        check_int("model_n", self.model_n)
        check_int("stride", self.stride, choices=(1, 2))
        check_int("warm_up", self.warm_up)
        if not isinstance(self.time_shift, bool):
            raise TypeError(f"time_shift: expected a bool, got {type(self.time_shift).__name__}")
        object.__setattr__(self, "split", _normalise_split(self.split))
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport: expected one of {', '.join(map(repr, TRANSPORTS))}, got {self.transport!r}")
        object.__setattr__(self, "timeout", check_timeout(self.timeout))
        if not isinstance(self.cfg_parallel, bool):
            raise TypeError(f"cfg_parallel: expected a bool, got {type(self.cfg_parallel).__name__}")
        object.__setattr__(self, "devices", _normalise_devices(self.devices, self.world_size))
        if not isinstance(self.keep_weights, bool):
            raise TypeError(f"keep_weights: expected a bool, got {type(self.keep_weights).__name__}")
        if self.encoders not in ("all", "rank0"):
            raise ValueError(f"encoders: expected 'all' (every rank encodes its prompt) or 'rank0' (rank 0 "
                             f"encodes, the others receive the embeddings), got {self.encoders!r}")
        if self.devices is not None:
            if len(self.devices) != self.world_size:
                raise ValueError(f"devices: {len(self.devices)} given, but {self.ranks_needed()} = {self.world_size} "
                                 "ranks need one each")
            if self.transport not in ("auto", "emulate"):
                raise ValueError(f"devices: one process drives every device; transport={self.transport!r} is for "
                                 "a launch with one process per rank")

    @property
    def group_size(self) -> int:
        """Ranks one schedule runs on (model_n + stride - 1; the C schedule says)."""
        return _core.Schedule(self.model_n, self.stride, self.warm_up, int(self.time_shift), 1).world_size

    @property
    def world_size(self) -> int:
        """Ranks a multi-process run needs: one group, or two with ``cfg_parallel``."""
        return self.group_size * (2 if self.cfg_parallel else 1)

    def ranks_needed(self) -> str:
        """How ``world_size`` comes about, for messages."""
        inner = "model_n + stride - 1"
        return f"2 * ({inner})" if self.cfg_parallel else inner

    def summary(self) -> dict:
        """What every rank must agree on, as plain JSON-able values."""
        split = self.split if self.split is None or isinstance(self.split, str) else \
            [p if isinstance(p, str) else list(p) for p in self.split]
        return {"model_n": self.model_n, "stride": self.stride, "warm_up": self.warm_up,
                "time_shift": self.time_shift, "split": split, "transport": self.transport,
                "keep_weights": self.keep_weights, "encoders": self.encoders, "cfg_parallel": self.cfg_parallel}


_TRUE = ("1", "true", "t", "yes", "y", "on")
_FALSE = ("0", "false", "f", "no", "n", "off")


def str2bool(text) -> bool:
    """``"true"/"false"``, ``"1"/"0"``, ``"yes"/"no"`` (any case) to a bool.

    Anything else is an ``argparse.ArgumentTypeError``: a typo is a
    command-line error, not a silent True (``type=bool`` makes every
    non-empty string True, ``"False"`` included)."""
    if isinstance(text, bool):
        return text
    word = str(text).strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, 1/0, yes/no), got {text!r}")


def int_at_least(low: int):
    """An argparse type: an integer >= low."""
    def convert(text) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return convert


def add_arguments(parser: argparse.ArgumentParser, *, warm_up: int = 1) -> argparse.ArgumentParser:
    """Add the original project's flags and ours, in a group "AsyncDiff"."""
    a = parser.add_argument_group("AsyncDiff")
    a.add_argument("--model_n", type=int_at_least(1), default=2, help="components the denoiser is cut into")
    a.add_argument("--stride", type=int, choices=(1, 2), default=1, help="steps per parallel round")
    a.add_argument("--warm_up", type=int_at_least(1), default=warm_up,
                   help="steps run whole before going asynchronous")
    a.add_argument("--time_shift", type=str2bool, default=False, metavar="BOOL",
                   help="give each component the previous step's timestep (true/false)")
    a.add_argument("--split", default=None,
                   help="'auto', 'paper', or explicit, e.g. 'conv_in d0-3 mid | u0 u1 u2 u3 conv_norm_out conv_out' "
                        "(default: the paper's preset, else auto)")
    a.add_argument("--transport", choices=TRANSPORTS, default="auto", help="auto, emulate, shm or nccl")
    a.add_argument("--timeout", type=float, default=300.0, help="seconds a rank may wait for another")
    a.add_argument("--keep_weights", type=str2bool, default=False, metavar="BOOL",
                   help="keep the whole denoiser on every rank (default: each rank keeps its own blocks)")
    a.add_argument("--encoders", choices=("all", "rank0"), default="all",
                   help="rank0: only rank 0 runs the text encoders, the others receive the embeddings")
    a.add_argument("--cfg_parallel", type=str2bool, default=False, metavar="BOOL",
                   help="the two halves of the classifier-free-guidance batch on two groups of ranks "
                        "(2 * (model_n + stride - 1) ranks)")
    return parser


def from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> AsyncDiffConfig:
    """The config the parsed flags describe; a bad combination, or a torchrun
    launch of the wrong size for it, is a command-line error
    (``parser.error``), before any work is done."""
    from . import launch

    try:
        config = AsyncDiffConfig(model_n=args.model_n, stride=args.stride, warm_up=args.warm_up,
                                 time_shift=args.time_shift, split=args.split, transport=args.transport,
                                 timeout=args.timeout, keep_weights=args.keep_weights, encoders=args.encoders,
                                 cfg_parallel=getattr(args, "cfg_parallel", False))
        launch.rank_if_launched(config)  # a launch of the wrong size, before any model is loaded
        return config
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
        raise  # parser.error exits; this keeps type checkers informed
