"""Which units each component owns: the paper's presets, explicit splits, auto.

A split is a list of ``model_n`` components, each a list of unit names (see
``asyncdiff.arch``).  Component ``r`` runs on rank ``r``.  The automatic split
takes every fine unit's FLOPs on the real input shapes (``asyncdiff.probe``:
on the ``meta`` device, nothing is computed) and asks the C partitioner for
the contiguous split in execution order that minimises the largest component.
``split="time"`` does the same with every fine unit's measured wall time
(``count_times``: real forwards of the denoiser on its own device).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from . import _core
from .arch import Layout
from .probe import _key, probe

# The original AsyncDiff splits (docs/design.md §2), keyed by (family, model_n).
# The x4-upscaler N=2 entry reads `u1.us` where the original wrote `u0.us`.
PRESETS: dict[tuple[str, int], str] = {
    ("sd2", 2): "conv_in d0-3 mid u0 u1.r0 u1.a0 u1.r1 u1.a1 u1.r2 | u1.a2 u1.us u2 u3 conv_norm_out conv_out",
    ("sd2", 3): "conv_in d0-3 | mid u0 u1 u2 | u3 conv_norm_out conv_out",
    ("sd2", 4): "conv_in d0 d1 | d2 d3 mid u0 u1 | u2 u3.r0 | u3.a0 u3.r1 u3.a1 u3.r2 u3.a2 conv_norm_out conv_out",
    ("sd1", 2): "conv_in d0-3 mid u0 u1.r0 u1.a0 u1.r1 | u1.a1 u1.r2 u1.a2 u1.us u2 u3 conv_norm_out conv_out",
    ("sd1", 3): "conv_in d0-3 | mid u0 u1 u2.r0 u2.a0 u2.r1 u2.a1 u2.r2 | u2.a2 u2.us u3 conv_norm_out conv_out",
    ("sd1", 4): "conv_in d0 d1 | d2 d3 mid u0 u1.r0 u1.a0 u1.r1 | u1.a1 u1.r2 u1.a2 u1.us u2 | u3 conv_norm_out conv_out",
    ("sdxl", 2): "d2 mid u0.r0 u0.a0 u0.r1 u0.a1 | conv_in d0 d1 u1 u2 conv_norm_out conv_out u0.r2 u0.a2 u0.us",
    ("sdxl", 3): "d2 mid u0.r0 | u0.a0 u0.r1 u0.a1 u0.r2 u0.a2 u0.us | conv_in d0 d1 u1 u2 conv_norm_out conv_out",
    ("sdxl", 4): "d1.a0 d1.r1 d1.a1 d1.ds d2 | mid u0.r0 u0.a0 | u0.r1 u0.a1 u0.r2 u0.a2 u0.us "
    "| conv_in d0 d1.r0 u1 u2 conv_norm_out conv_out",
    ("svd", 2): "conv_in d0-3 mid u0 u1 | u2 u3 conv_norm_out conv_out",
    ("svd", 3): "conv_in d0 d1 d2 | d3 mid u0 u1 u2 | u3 conv_norm_out conv_out",
    ("svd", 4): "d1.r0 d1.a0 conv_in d0 | d1.r1 d1.a1 d1.ds d2 d3 mid u0 u1 | u2 u3.r0 u3.a0 "
    "| u3.r1 u3.a1 u3.r2 u3.a2 conv_norm_out conv_out",
    ("animatediff", 2): "conv_in d0-3 mid u0 u1 | u2 u3 conv_norm_out conv_out",
    ("animatediff", 3): "conv_in d0-3 | mid u0 u1 u2 | u3 conv_norm_out conv_out",
    ("x4", 2): "conv_in d0-3 mid u0 u1.a0 u1.r0 u1.a1 u1.r1 | u1.a2 u1.r2 u1.us u2 u3 conv_norm_out conv_out",
    ("x4", 3): "conv_in d0-3 | mid u0 u1 u2.a0 u2.r0 u2.a1 | u2.r1 u2.a2 u2.r2 u2.us u3 conv_norm_out conv_out",
    ("x4", 4): "conv_in d0 d1 d2 | d3 mid u0 u1 | u2 | u3 conv_norm_out conv_out",
}

# SD3: the 24 joint blocks in N equal runs, the output layers with the last.
for _n in (2, 3, 4):
    _runs = [" ".join(f"b{j}" for j in range(i * 24 // _n, (i + 1) * 24 // _n)) for i in range(_n)]
    PRESETS[("sd3", _n)] = " | ".join(_runs) + " norm_out proj_out"

_RANGE = re.compile(r"^([a-z]+)(\d+)-(\d+)$")


def _expand(token: str) -> list[str]:
    m = _RANGE.match(token)
    if not m:
        return [token]
    head, lo, hi = m.group(1), int(m.group(2)), int(m.group(3))
    if hi < lo:
        raise ValueError(f"split: bad range {token!r}")
    return [f"{head}{i}" for i in range(lo, hi + 1)]


def parse(split) -> list[list[str]]:
    """Turn ``"a b | c"`` or ``[["a", "b"], "c"]`` into a list of components."""
    if isinstance(split, str):
        parts = split.split("|")
    elif isinstance(split, (list, tuple)):
        parts = list(split)
    else:
        raise TypeError(f"split: expected 'auto', 'time', 'paper', a string or a list of components, "
                        f"got {type(split).__name__}")
    comps: list[list[str]] = []
    for part in parts:
        if isinstance(part, str):
            tokens = part.split()
        elif isinstance(part, (list, tuple)) and all(isinstance(t, str) for t in part):
            tokens = [w for t in part for w in t.split()]
        else:
            raise TypeError(f"split: a component must be a string or a list of unit names, got {part!r}")
        comps.append([name for tok in tokens for name in _expand(tok)])
    return comps


@dataclass
class Split:
    """A validated split: ``components[r]`` lists the units rank ``r`` owns."""

    components: list[list[str]]
    source: str  # "paper", "auto" (FLOPs), "time" (measured seconds) or "explicit"
    costs: dict[str, float] | None = None  # fine-unit costs when known: FLOPs ("auto") or seconds ("time")

    @property
    def owner(self) -> dict[str, int]:
        return {u: r for r, comp in enumerate(self.components) for u in comp}

    def __str__(self) -> str:
        return " | ".join(" ".join(c) for c in self.components)


def validate(layout: Layout, comps: list[list[str]], n: int, source: str) -> Split:
    """Check a split against the model; raise ValueError naming ``split``."""
    if len(comps) != n:
        raise ValueError(f"split: has {len(comps)} components but model_n is {n}")
    seen: dict[str, int] = {}
    for r, comp in enumerate(comps):
        if not comp:
            raise ValueError(f"split: component {r} is empty")
        for u in comp:
            if u not in layout.paths:
                raise ValueError(f"split: the denoiser has no unit {u!r} (known: {' '.join(layout.top)} and their sub-units)")
            if u in seen:
                raise ValueError(f"split: unit {u!r} appears twice")
            seen[u] = r
    for t in layout.top:
        subs = layout.subs.get(t, [])
        whole = t in seen
        parts = [s for s in subs if s in seen]
        if whole and parts:
            raise ValueError(f"split: {t!r} is listed together with its part {parts[0]!r}")
        if not whole and len(parts) != len(subs):
            missing = [s for s in subs if s not in seen] if subs else [t]
            raise ValueError(f"split: no component owns {missing[0]!r}")
    if seen[layout.final] != n - 1:
        raise ValueError(
            f"split: the final unit {layout.final!r} must be in the last component (model_n - 1 = {n - 1}), "
            f"it is in component {seen[layout.final]}"
        )
    # The C core checks the assignment once more (every component non-empty, ids in range).
    _core.validate_assignment(np.fromiter(seen.values(), dtype=np.int32, count=len(seen)), n)
    return Split([list(c) for c in comps], source)


def preset(layout: Layout, n: int) -> str | None:
    return PRESETS.get((layout.family, n))


def count_costs(layout: Layout, denoiser: torch.nn.Module, args: tuple, kwargs: dict, forward=None):
    """FLOPs of every fine unit for these inputs, in the order the units run
    (one traced forward on the meta device, see ``probe``)."""
    p = probe(layout, denoiser, args, kwargs, forward)
    return list(p.order), [p.flops[u] for u in p.order]


_TIMES: dict = {}


def count_times(layout: Layout, denoiser: torch.nn.Module, args: tuple, kwargs: dict, forward=None, *,
                threads: int | None = None, repeat: int = 2):
    """Measured wall time (seconds) of every fine unit for these inputs, in
    the order the units run: ``(order, costs)`` like ``count_costs``.

    Runs ``repeat`` real forwards under ``torch.no_grad()`` on the denoiser's
    own device (``forward(*args, **kwargs)`` when given: the original forward
    under AsyncDiff's hooks; else ``denoiser(*args, **kwargs)``), timing each
    fine unit between a forward pre-hook and a forward hook with
    ``time.perf_counter`` (on an accelerator the device is synchronised at
    each hook), and keeps each unit's fastest forward.  ``threads``: the
    intra-op threads to measure with (restored afterwards); None measures
    with the current count.

    Nothing is kept on the model: the hooks are removed whatever happens and
    the random number generators are restored.  The result is cached per
    class, config, dtypes, device, threads and input shapes; the cached pair
    is returned as is, do not modify it."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"count_times: threads must be a positive int or None, got {threads!r}")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"count_times: repeat must be a positive int, got {repeat!r}")
    device = _device(denoiser, args, kwargs)
    if device.type == "meta":
        raise ValueError("split: 'time' measures real forwards, but the denoiser is on the meta device")
    measured_with = threads if threads is not None else torch.get_num_threads()
    base = _key(denoiser, args, kwargs)
    key = None if base is None else (base, str(device), measured_with)
    if key is not None and key in _TIMES:
        return _TIMES[key]
    saved = torch.get_num_threads()
    try:
        if measured_with != saved:
            torch.set_num_threads(measured_with)
        order, best = _measure(layout, denoiser, args, kwargs, forward, device, repeat)
    finally:
        if torch.get_num_threads() != saved:
            torch.set_num_threads(saved)
    result = (order, [best[u] for u in order])
    if key is not None:
        _TIMES[key] = result
    return result


def _device(denoiser: torch.nn.Module, args, kwargs) -> torch.device:
    """The denoiser's device: its first parameter's (or buffer's); a denoiser
    kept on the CPU but fed accelerator tensors (offloading) computes there."""
    own = torch.device("cpu")
    for tensor in (*denoiser.parameters(), *denoiser.buffers()):
        own = tensor.device
        break
    if own.type == "cpu":
        for leaf in tree_flatten((args, kwargs))[0]:
            if isinstance(leaf, torch.Tensor) and leaf.device.type not in ("cpu", "meta"):
                return leaf.device
    return own


def _synchronizer(device: torch.device):
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    backend = getattr(torch, device.type, None)
    sync = getattr(backend, "synchronize", None)
    return sync if callable(sync) else None


def _measure(layout: Layout, denoiser, args, kwargs, forward, device: torch.device, repeat: int):
    """(order of the first forward, {fine unit: its fastest time over ``repeat`` forwards})."""
    sync = _synchronizer(device)
    clock = time.perf_counter
    fine = layout.fine_units()
    order: list[str] = []
    seen: set[str] = set()
    started: dict[str, float] = {}
    spent: dict[str, float] = {}
    best: dict[str, float] = {}

    def enter(name):
        def hook(_m, _a):
            if sync is not None:
                sync()
            if name not in seen:
                seen.add(name)
                order.append(name)
            started[name] = clock()
        return hook

    def leave(name):
        def hook(_m, _a, _out):
            if sync is not None:
                sync()
            spent[name] = spent.get(name, 0.0) + clock() - started.pop(name)
        return hook

    handles = []
    rng_devices = [device] if device.type == "cuda" else []
    try:
        for name in fine:
            mod = layout.module(name, denoiser)
            handles.append(mod.register_forward_pre_hook(enter(name)))
            handles.append(mod.register_forward_hook(leave(name)))
        run = forward if forward is not None else denoiser
        with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
            for _ in range(repeat):
                spent.clear()
                started.clear()
                run(*args, **kwargs)
                missing = [u for u in fine if u not in spent]
                if missing:
                    raise TypeError(f"denoiser: unit {missing[0]!r} did not run during a forward; "
                                    "AsyncDiff cannot split this model")
                for u in fine:
                    best[u] = min(best.get(u, float("inf")), spent[u])
    finally:
        for h in handles:
            h.remove()
    return order, best


def auto(layout: Layout, n: int, order: list[str], costs: list[float], *, source: str = "auto") -> Split:
    """Optimal contiguous split of the fine units; whole blocks kept whole.

    ``costs``: one per unit of ``order`` (FLOPs from ``count_costs``, seconds
    from ``count_times``); ``source`` names the basis in ``Split.source``."""
    if n > len(order):
        raise ValueError(f"model_n: {n} components but the denoiser has only {len(order)} units to share")
    assign = _core.partition(np.asarray(costs, dtype=np.float64), n)
    comps: list[list[str]] = [[] for _ in range(n)]
    owner = {u: int(c) for u, c in zip(order, assign)}
    # A block whose parts all landed in one component is assigned whole (fewer hooks).
    for t in layout.top:
        parts = layout.subs.get(t)
        if parts and len({owner[p] for p in parts}) == 1:
            c = owner[parts[0]]
            for p in parts:
                del owner[p]
            owner[t] = c
    position = {u: i for i, u in enumerate(order)}
    for t in layout.top:  # a whole block sits where its first part ran
        if t in owner:
            position[t] = min(position[p] for p in layout.subs.get(t) or [t])
    for u in sorted(owner, key=position.__getitem__):
        comps[owner[u]].append(u)
    split = validate(layout, comps, n, source)
    split.costs = dict(zip(order, costs))
    return split


def component_costs(layout: Layout, split: Split, order: list[str], costs: list[float]) -> list[float]:
    """Each component's cost, for fine-unit costs in execution order (the C
    core's ``cost_summary``, the sums the partitioner minimises)."""
    owner = split.owner
    assign = np.fromiter((owner[u] if u in owner else owner[layout.parent(u)] for u in order), dtype=np.int32,
                         count=len(order))
    per, _, _ = _core.cost_summary(np.asarray(costs, dtype=np.float64), assign, len(split.components))
    return [float(c) for c in per]


def count_bytes(layout: Layout, denoiser: torch.nn.Module):
    """Bytes of every fine unit's parameters and buffers, fine units in layout
    order (blocks in the order they run, each block's parts as they run)."""
    from .shard import tensor_units

    order = layout.fine_units()
    sizes = dict.fromkeys(order, 0)
    tensors = dict([*denoiser.named_parameters(), *denoiser.named_buffers()])
    for name, unit in tensor_units(layout, order, denoiser).items():
        if unit is not None:
            sizes[unit] += tensors[name].numel() * tensors[name].element_size()
    return order, [float(sizes[u]) for u in order]


def resolve_static(layout: Layout, n: int, split, denoiser: torch.nn.Module | None = None) -> Split | None:
    """The split when it needs no input shapes (paper preset, explicit, or
    "memory" -- balanced on weight bytes, which needs ``denoiser``), else None
    ("auto" and "time" are decided at the first denoiser call)."""
    if split == "memory":
        if denoiser is None:
            raise TypeError("split: 'memory' needs the denoiser to count its bytes")
        order, costs = count_bytes(layout, denoiser)
        return auto(layout, n, order, costs, source="memory")
    if split is None:
        text = preset(layout, n)
        return validate(layout, parse(text), n, "paper") if text else None
    if isinstance(split, str) and split in ("auto", "time"):
        return None
    if isinstance(split, str) and split in ("paper", "preset"):
        text = preset(layout, n)
        if text is None:
            raise ValueError(
                f"split: no paper preset for a {layout.family} denoiser with model_n={n}; use split='auto'"
            )
        return validate(layout, parse(text), n, "paper")
    if isinstance(split, str) and "|" not in split and len(split.split()) == 1:
        word = split.strip()
        if word not in layout.paths and not _RANGE.match(word):  # a misspelt option, not a unit
            raise ValueError(f"split: unknown value {split!r}; expected None, 'auto', 'time', 'memory', 'paper' or an "
                             "explicit split such as 'conv_in d0-3 mid | u0 u1 u2 u3 conv_norm_out conv_out'")
    return validate(layout, parse(split), n, "explicit")
