"""Which units each component owns: the paper's presets, explicit splits, auto.

A split is a list of ``model_n`` components, each a list of unit names (see
``asyncdiff.arch``).  Component ``r`` runs on rank ``r``.  The automatic split
takes every fine unit's FLOPs on the real input shapes (``asyncdiff.probe``:
on the ``meta`` device, nothing is computed) and asks the C partitioner for
the contiguous split in execution order that minimises the largest component.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from . import _core
from .arch import Layout
from .probe import probe

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


def count_costs(layout: Layout, denoiser: torch.nn.Module, args: tuple, kwargs: dict, forward=None):
    """FLOPs of every fine unit for these inputs, in the order the units run
    (one traced forward on the meta device, see ``probe``)."""
    p = probe(layout, denoiser, args, kwargs, forward)
    return list(p.order), [p.flops[u] for u in p.order]


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


def component_costs(layout: Layout, split: Split, order: list[str], costs: list[float]) -> list[float]:
    """Each component's cost, for fine-unit costs in execution order (the C
    core's ``cost_summary``, the sums the partitioner minimises)."""
    owner = split.owner
    assign = np.fromiter((owner[u] if u in owner else owner[layout.parent(u)] for u in order), dtype=np.int32,
                         count=len(order))
    per, _, _ = _core.cost_summary(np.asarray(costs, dtype=np.float64), assign, len(split.components))
    return [float(c) for c in per]


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
