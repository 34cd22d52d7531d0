"""Which cached outputs each rank must receive (SPEC section 5).

Rank ``r`` replays the units it does not own.  A replayed output matters
only if it reaches one of the units rank ``r`` computes, directly or through
the glue code between blocks (a concatenation, a skip connection, ...).  The
others can keep stale values: they have the right shapes, and what they feed
is replayed too or replaced by the exchanged result.

The dependencies are traced once, on a ``meta`` copy of the denoiser (no
memory, no compute): every replayed output gets a tag, a torch function mode
carries tags from the inputs of every operation to its outputs, and a hook on
each computed unit collects the tags that reach it.
"""

from __future__ import annotations

import warnings

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .arch import Layout
from .outputs import flatten, unflatten
from .splits import _meta_copy, _to_meta


class _Taint(TorchFunctionMode):
    """Propagate sets of unit names from the tensors an op reads to those it returns."""

    def __init__(self):
        super().__init__()
        self.tags: dict[int, tuple[torch.Tensor, frozenset]] = {}

    def tag(self, t: torch.Tensor, units: frozenset):
        held = self.tags.get(id(t))
        self.tags[id(t)] = (t, units | (held[1] if held and held[0] is t else frozenset()))

    def of(self, objs) -> frozenset:
        found = frozenset()
        for leaf in tree_flatten(objs)[0]:
            if isinstance(leaf, torch.Tensor):
                held = self.tags.get(id(leaf))
                if held is not None and held[0] is leaf:
                    found |= held[1]
        return found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        units = self.of((args, kwargs))
        if units:
            for leaf in tree_flatten(out)[0]:
                if isinstance(leaf, torch.Tensor):
                    self.tag(leaf, units)
        return out


def _owned_by(split, rank: int, model_n: int) -> frozenset:
    """Units rank ``rank`` computes in the async phase (the extra rank: the last component)."""
    comp = rank if rank < model_n else model_n - 1
    return frozenset(split.components[comp])


def everything_else(split, world: int, model_n: int) -> dict[int, list[str]]:
    """The conservative answer: every unit a rank does not own."""
    owner = split.owner
    return {r: sorted(u for u in owner if r >= model_n or owner[u] != r) for r in range(world)}


def needs(layout: Layout, denoiser, args, kwargs, split, model_n: int, stride: int) -> dict[int, list[str]]:
    """For each rank, the sorted units whose owners' outputs it must receive."""
    world = model_n + stride - 1
    try:
        return _trace(layout, denoiser, args, kwargs, split, model_n, stride)
    except Exception as exc:  # noqa: BLE001 - a model the trace cannot run: send everything
        warnings.warn(f"AsyncDiff: could not trace {type(denoiser).__name__} on the meta device ({exc!r}); "
                      "every rank receives every output it does not own", RuntimeWarning, stacklevel=2)
        return everything_else(split, world, model_n)


def _trace(layout, denoiser, args, kwargs, split, model_n, stride):
    model = _meta_copy(denoiser)
    margs, mkwargs = _to_meta(args), _to_meta(kwargs)
    units = list(split.owner)
    mods = {u: layout.module(u, model) for u in units}
    captured: dict[str, tuple] = {}
    handles = []

    def capture(name):
        def hook(_m, _a, out):
            captured[name] = flatten(out)
        return hook

    try:
        for u, m in mods.items():
            handles.append(m.register_forward_hook(capture(u)))
        with torch.no_grad():
            model(*margs, **mkwargs)
    finally:
        for h in handles:
            h.remove()

    world = model_n + stride - 1
    result: dict[int, list[str]] = {}
    by_component: dict[int, frozenset] = {}
    for rank in range(world):
        comp = rank if rank < model_n else model_n - 1
        if comp not in by_component:
            by_component[comp] = _reached(model, mods, captured, margs, mkwargs, _owned_by(split, rank, model_n))
        wanted = set(by_component[comp])
        if stride == 2 and split.owner[layout.final] != rank:
            wanted.add(layout.final)  # a sync call's output is the replayed final unit
        mine = frozenset(split.components[rank]) if rank < model_n else frozenset()
        result[rank] = sorted(wanted - mine)
    return result


def _reached(model, mods, captured, margs, mkwargs, computed: frozenset) -> frozenset:
    """Replayed units whose outputs reach a unit in ``computed``."""
    mode = _Taint()
    reached: set[str] = set()
    saved = {}

    def replay(name):
        def forward(*_a, **_k):
            spec, tensors = captured[name]
            fresh = [torch.empty_like(t) for t in tensors]
            for t in fresh:
                mode.tag(t, frozenset((name,)))
            return unflatten(spec, fresh)
        return forward

    def seen(_m, a, k):
        reached.update(mode.of((a, k)))

    handles = []
    try:
        for u, m in mods.items():
            if u in computed:
                handles.append(m.register_forward_pre_hook(seen, with_kwargs=True))
            else:
                saved[u] = m.__dict__.get("forward")
                m.forward = replay(u)
        with torch.no_grad(), mode:
            model(*margs, **mkwargs)
    finally:
        for h in handles:
            h.remove()
        for u, f in saved.items():
            if f is None:
                mods[u].__dict__.pop("forward", None)
            else:
                mods[u].forward = f
    return frozenset(reached - computed)
