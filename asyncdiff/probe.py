"""One traced forward of the denoiser on the ``meta`` device.

What the automatic split and the minimal exchange need to know about a
denoiser, for the real input shapes, without computing anything:

* ``order``: the fine units (see ``arch``) in the order they run;
* ``flops``: each fine unit's FLOPs (``torch.utils.flop_counter``);
* ``reads``: for every unit, top-level or sub-unit, which units' outputs reach
  its inputs through glue code alone (concatenations, skip connections,
  activations).  A torch function mode carries provenance from the inputs of
  every operation to its outputs;
* ``outputs``: every unit's output structure, shapes and dtypes, and
  ``result``, the denoiser output's (what a rank that does not hold a unit's
  weights must be ready to receive).

Provenance is kept so that it can be read for any split: a tensor that
leaves block ``d1`` is marked "out of d1, made by d1.ds"; a split that keeps
``d1`` whole reads it as ``d1``, one that refines ``d1`` as ``d1.ds``.

The result depends only on the denoiser's class, config, dtypes and input
shapes, and is cached on that key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .arch import Layout
from .outputs import flatten


@dataclass(frozen=True)
class Probe:
    order: list[str]
    flops: dict[str, float]
    reads: dict[str, frozenset]
    outputs: dict = field(default_factory=dict)  # unit -> (spec, [(shape, dtype)])
    result: tuple | None = None  # (shape, dtype) of the denoiser output's first tensor

    def inputs_of(self, unit: str, units) -> frozenset:
        """Units of a split (``units``: a set of names) whose outputs reach ``unit``."""
        found = set()
        for element in self.reads.get(unit, ()):
            name = _resolve(element, units)
            if name is not None:
                found.add(name)
        return frozenset(found)


def _resolve(element, units):
    # ("leaf", name) | ("out", block, inner-or-None)
    if element[0] == "leaf":
        return element[1]
    _, block, inner = element
    if block in units:
        return block
    return _resolve(inner, units) if inner is not None else None


class _Provenance(TorchFunctionMode):
    """Carry sets of provenance elements from what an op reads to what it returns."""

    def __init__(self):
        super().__init__()
        self.marks: dict[int, tuple[torch.Tensor, frozenset]] = {}

    def of(self, objs) -> frozenset:
        found = frozenset()
        for leaf in tree_flatten(objs)[0]:
            if isinstance(leaf, torch.Tensor):
                held = self.marks.get(id(leaf))
                if held is not None and held[0] is leaf:
                    found |= held[1]
        return found

    def set(self, objs, elements: frozenset):
        for leaf in tree_flatten(objs)[0]:
            if isinstance(leaf, torch.Tensor):
                self.marks[id(leaf)] = (leaf, elements)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        elements = self.of((args, kwargs))
        if elements:
            for leaf in tree_flatten(out)[0]:
                if isinstance(leaf, torch.Tensor):
                    held = self.marks.get(id(leaf))
                    old = held[1] if held is not None and held[0] is leaf else frozenset()
                    self.marks[id(leaf)] = (leaf, old | elements)
        return out


def meta_copy(denoiser: torch.nn.Module) -> torch.nn.Module:
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


def to_meta(obj):
    if isinstance(obj, torch.Tensor):
        return torch.empty_like(obj, device="meta")
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_meta(o) for o in obj)
    if isinstance(obj, dict):
        return {k: to_meta(v) for k, v in obj.items()}
    return obj


_CACHE: dict = {}


def _key(denoiser, args, kwargs):
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
    dtypes = tuple(sorted({str(p.dtype) for p in denoiser.parameters()}))
    return (type(denoiser).__qualname__, config, dtypes, sig(args), sig(kwargs))


def probe(layout: Layout, denoiser, args, kwargs, forward=None) -> Probe:
    """Trace one forward with these inputs (cached).

    Runs on a meta copy; a denoiser that cannot run there is traced on itself
    once, through ``forward`` (its original forward when AsyncDiff wraps it).
    """
    key = _key(denoiser, args, kwargs)
    if key is not None and key in _CACHE:
        return _CACHE[key]
    try:
        result = _trace(layout, meta_copy(denoiser), to_meta(args), to_meta(kwargs), None)
    except Exception:  # noqa: BLE001 - the meta copy cannot run this model: trace the real one
        result = _trace(layout, denoiser, args, kwargs, forward)
    if key is not None:
        _CACHE[key] = result
    return result


def _trace(layout: Layout, model, args, kwargs, forward) -> Probe:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    mode = _Provenance()
    fine = set(layout.fine_units())
    order: list[str] = []
    start: dict[str, int] = {}
    flops: dict[str, float] = {}
    reads: dict[str, frozenset] = {}
    outputs: dict = {}
    handles = []

    def enter(name):
        def hook(_m, a, k):
            reads[name] = reads.get(name, frozenset()) | mode.of((a, k))
            if name in fine:
                if name not in start:
                    order.append(name)
                start[name] = counter.get_total_flops()
        return hook

    def leave(name, is_block):
        def hook(_m, _a, _k, out):
            spec, tensors = flatten(out)
            outputs[name] = (spec, [(tuple(t.shape), t.dtype) for t in tensors])
            if name in fine:
                flops[name] = flops.get(name, 0.0) + float(counter.get_total_flops() - start[name])
            if is_block:  # wrap what its parts made: "out of this block"
                for leaf in tree_flatten(out)[0]:
                    if isinstance(leaf, torch.Tensor):
                        held = mode.marks.get(id(leaf))
                        inner = held[1] if held is not None and held[0] is leaf else frozenset()
                        wrapped = {("out", name, e) for e in inner} | {("out", name, None)}
                        mode.marks[id(leaf)] = (leaf, frozenset(wrapped))
            else:
                mode.set(out, frozenset({("leaf", name)}))
        return hook

    try:
        for name in layout.paths:
            mod = layout.module(name, model)
            is_block = bool(layout.subs.get(name))
            handles.append(mod.register_forward_pre_hook(enter(name), with_kwargs=True))
            handles.append(mod.register_forward_hook(leave(name, is_block), with_kwargs=True))
        run = forward if forward is not None else model
        with torch.no_grad(), counter, mode:
            result = flatten(run(*args, **kwargs))[1][0]
    finally:
        for h in handles:
            h.remove()
    missing = [u for u in layout.fine_units() if u not in flops]
    if missing:
        raise TypeError(f"denoiser: unit {missing[0]!r} did not run during a forward; AsyncDiff cannot split this model")
    return Probe(order, flops, reads, outputs, (tuple(result.shape), result.dtype))
