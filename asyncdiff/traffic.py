"""Which cached outputs each rank must receive (SPEC section 5).

Rank ``r`` replays the units it does not own.  A replayed output matters
only if it reaches one of the units rank ``r`` computes, directly or through
the glue code between blocks (a concatenation, a skip connection, ...).  The
others can keep stale values: they have the right shapes, and what they feed
is replayed too or replaced by the exchanged result.

The dependencies come from one traced forward of a ``meta`` copy of the
denoiser (``asyncdiff.probe``: no memory, no compute), shared with the
automatic split.
"""

from __future__ import annotations

import warnings

from .arch import Layout
from .probe import Probe, probe


def everything_else(split, world: int, model_n: int) -> dict[int, list[str]]:
    """The conservative answer: every unit a rank does not own."""
    owner = split.owner
    return {r: sorted(u for u in owner if r >= model_n or owner[u] != r) for r in range(world)}


def needs(layout: Layout, denoiser, args, kwargs, split, model_n: int, stride: int, forward=None):
    """For each rank, the sorted units whose owners' outputs it must receive."""
    world = model_n + stride - 1
    try:
        p = probe(layout, denoiser, args, kwargs, forward)
    except Exception as exc:  # noqa: BLE001 - a model the trace cannot run: send everything
        warnings.warn(f"AsyncDiff: could not trace {type(denoiser).__name__} ({exc!r}); "
                      "every rank receives every output it does not own", RuntimeWarning, stacklevel=2)
        return everything_else(split, world, model_n)
    return from_probe(p, layout, split, model_n, stride)


def from_probe(p: Probe, layout: Layout, split, model_n: int, stride: int) -> dict[int, list[str]]:
    units = frozenset(split.owner)
    result: dict[int, list[str]] = {}
    for rank in range(model_n + stride - 1):
        # the extra rank of stride 2 computes the last component
        computed = frozenset(split.components[min(rank, model_n - 1)])
        # A replayed unit matters when its output reaches a computed unit through
        # glue alone; what reaches it through another computed unit is that
        # unit's own input, counted there.
        wanted = set().union(*(p.inputs_of(u, units) for u in computed)) - computed
        if stride == 2 and split.owner[layout.final] != rank:
            wanted.add(layout.final)  # a sync call's output is the replayed final unit
        mine = frozenset(split.components[rank]) if rank < model_n else frozenset()
        result[rank] = sorted(wanted - mine)
    return result
