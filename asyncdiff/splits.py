"""Which units each component owns: the paper's presets, explicit splits, auto.

A split is a list of ``model_n`` components, each a list of unit names (see
``asyncdiff.arch``).  Component ``r`` runs on rank ``r``.  The automatic split
counts every fine unit's FLOPs on the real input shapes (on the ``meta``
device, so nothing is computed) and asks the C partitioner for the contiguous
split in execution order that minimises the largest component.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from . import _core
from .arch import Layout

# The original AsyncDiff splits (SPEC section 4), keyed by (family, model_n).
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
        raise TypeError(f"split: expected 'auto', 'paper', a string or a list of components, got {type(split).__name__}")
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
    source: str  # "paper", "auto" or "explicit"
    costs: dict[str, float] | None = None  # fine-unit FLOPs when known

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


def _meta_copy(denoiser: torch.nn.Module) -> torch.nn.Module:
    """The denoiser rebuilt from its config on the meta device, every tensor
    in the dtype it has in the real model (fp16 models keep some fp32 parts)."""
    config = dict(denoiser.config)
    with torch.device("meta"):
        model = type(denoiser).from_config(config)
    real = dict(denoiser.named_parameters())
    real.update(denoiser.named_buffers())
    # a few modules build tensors outside the device context (e.g. SVD's mix factors)
    model = model.to("meta")
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        src = real.get(name)
        if src is not None and src.dtype != tensor.dtype:
            tensor.data = torch.empty_like(tensor, dtype=src.dtype)
    return model


def _to_meta(obj):
    if isinstance(obj, torch.Tensor):
        return torch.empty_like(obj, device="meta")
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_meta(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_meta(v) for k, v in obj.items()}
    return obj


_COST_CACHE: dict = {}


def _cost_key(denoiser, args, kwargs):
    """Same class, same config, same input shapes: same FLOPs."""
    def sig(obj):
        if isinstance(obj, torch.Tensor):
            return ("T", tuple(obj.shape), str(obj.dtype))
        if isinstance(obj, (list, tuple)):
            return tuple(sig(o) for o in obj)
        if isinstance(obj, dict):
            return tuple(sorted((k, sig(v)) for k, v in obj.items()))
        return repr(obj) if obj is None or isinstance(obj, (bool, int, float, str)) else type(obj).__name__

    try:
        config = repr(sorted(dict(denoiser.config).items()))
    except Exception:  # noqa: BLE001 - no usable config: do not cache
        return None
    return (type(denoiser).__qualname__, config, sig(args), sig(kwargs))


def count_costs(
    layout: Layout, denoiser: torch.nn.Module, args: tuple, kwargs: dict, on_meta: bool = True, forward=None
) -> tuple[list[str], list[float]]:
    """FLOPs of every fine unit for these inputs, in the order the units run.

    The count runs on a ``meta`` copy built from the denoiser's config (no
    memory, no compute).  A denoiser that cannot be built that way is counted
    on itself with the real inputs once, through ``forward`` (its original
    forward when AsyncDiff has wrapped it).
    """
    from torch.utils.flop_counter import FlopCounterMode

    key = _cost_key(denoiser, args, kwargs)
    if key is not None and key in _COST_CACHE:
        return _COST_CACHE[key]
    fine = layout.fine_units()
    model, call_args, call_kwargs = denoiser, args, kwargs
    if on_meta:
        try:
            model = _meta_copy(denoiser)
            call_args, call_kwargs = _to_meta(args), _to_meta(kwargs)
        except Exception:  # noqa: BLE001 - any failure means: count on the real model
            model, call_args, call_kwargs = denoiser, args, kwargs
    counter = FlopCounterMode(display=False)
    order: list[str] = []
    start: dict[str, int] = {}
    costs: dict[str, float] = {}
    handles = []

    def pre(name):
        def hook(_mod, _args):
            if name not in start:
                order.append(name)
            start[name] = counter.get_total_flops()
        return hook

    def post(name):
        def hook(_mod, _args, _out):
            costs[name] = costs.get(name, 0.0) + float(counter.get_total_flops() - start[name])
        return hook

    failed = False
    try:
        for name in fine:
            mod = layout.module(name, model)
            handles.append(mod.register_forward_pre_hook(pre(name)))
            handles.append(mod.register_forward_hook(post(name)))
        with torch.no_grad(), counter:
            try:
                run = forward if (model is denoiser and forward is not None) else model
                run(*call_args, **call_kwargs)
            except Exception:
                if model is denoiser:
                    raise
                failed = True  # the meta copy could not run this forward
    finally:
        for h in handles:
            h.remove()
    if failed:
        return count_costs(layout, denoiser, args, kwargs, on_meta=False, forward=forward)
    missing = [u for u in fine if u not in costs]
    if missing:
        raise TypeError(f"denoiser: unit {missing[0]!r} did not run during a forward; AsyncDiff cannot split this model")
    result = (order, [costs[u] for u in order])
    if key is not None:
        _COST_CACHE[key] = result
    return result


def auto(layout: Layout, n: int, order: list[str], costs: list[float]) -> Split:
    """Optimal contiguous split of the fine units; whole blocks kept whole."""
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
    split = validate(layout, comps, n, "auto")
    split.costs = dict(zip(order, costs))
    return split


def resolve_static(layout: Layout, n: int, split) -> Split | None:
    """The split when it needs no cost count (paper preset or explicit), else None."""
    if split is None:
        text = preset(layout, n)
        return validate(layout, parse(text), n, "paper") if text else None
    if isinstance(split, str) and split in ("auto",):
        return None
    if isinstance(split, str) and split in ("paper", "preset"):
        text = preset(layout, n)
        if text is None:
            raise ValueError(
                f"split: no paper preset for a {layout.family} denoiser with model_n={n}; use split='auto'"
            )
        return validate(layout, parse(text), n, "paper")
    return validate(layout, parse(split), n, "explicit")
