"""The exchange plan: which tensors go where at a transport event (docs/design.md §4).

In the asynchronous phase rank r replays the units it does not compute.  A
replayed output matters only if it reaches a unit r computes, directly or
through the glue code between blocks (a concatenation, a skip connection);
the others may keep stale values.  Which outputs reach which unit is a fact
about the model, traced once on a ``meta`` copy (``probe.py``); which ranks
compute what, and so who must receive which unit, is the C schedule's
(``Schedule.receives``).  This module turns both into byte slots and the
moves of one event, the same on every rank.

It is the only copy of this logic: the rank step (``rank.py``) moves tensors
with it and the communication-volume benchmark counts bytes with it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from . import _core
from .probe import probe

RESULT = "<result>"  # the denoiser output's slot
ALIGN = 64  # bytes; every slot starts on a cache line


@dataclass(frozen=True)
class Move:
    """One tensor of one event: ``unit``'s ``index``-th output tensor (or the
    result), to ``peers`` (a send) or from ``peers[0]`` (a receive), at byte
    ``offset`` of the event's slots."""

    unit: str
    index: int
    peers: tuple
    offset: int
    nbytes: int


def _nbytes(shape, dtype) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


class Slots:
    """Byte offsets of every cached unit's tensors and of the result.

    ``shapes``: unit -> [(shape, dtype)] of its output tensors; ``result``:
    (shape, dtype) of the denoiser output's first tensor.  The layout depends
    on these alone, so every rank computes the same one."""

    def __init__(self, shapes: dict, result: tuple):
        self.key = tuple((u, tuple((tuple(s), d) for s, d in shapes[u])) for u in sorted(shapes))
        self.key += ((RESULT, ((tuple(result[0]), result[1]),)),)
        offset, self.of = 0, {}
        for unit, items in self.key:
            entries = []
            for shape, dtype in items:
                nbytes = _nbytes(shape, dtype)
                entries.append((offset, nbytes))
                offset += (nbytes + ALIGN - 1) // ALIGN * ALIGN
            self.of[unit] = entries
        self.nbytes = max(offset, ALIGN)

    @classmethod
    def of_tensors(cls, cache: dict, result: torch.Tensor) -> "Slots":
        """The layout for a cache of unit -> (spec, tensors) and a result tensor."""
        shapes = {u: [(t.shape, t.dtype) for t in ts] for u, (_, ts) in cache.items()}
        return cls(shapes, (result.shape, result.dtype))


class ExchangePlan:
    """Who reads which unit, for one split and schedule.

    ``receives[r]``: the units rank r receives when owners deliver (sorted);
    ``readers[u]``: the ranks that receive unit u."""

    def __init__(self, split, receives: dict):
        self.split = split
        self.owner = split.owner
        self.world = len(receives)
        self.receives = {r: tuple(units) for r, units in receives.items()}
        self.readers = {u: tuple(r for r in range(self.world) if u in self.receives[r]) for u in self.owner}

    @classmethod
    def from_reads(cls, schedule, split, final: str, reads) -> "ExchangePlan":
        """``reads(unit, units)``: the units among ``units`` whose outputs reach
        ``unit`` through glue alone.  The C schedule says who receives what."""
        units = sorted(split.owner)
        index = {u: i for i, u in enumerate(units)}
        matrix = np.zeros((len(units), len(units)), dtype=np.uint8)
        names = frozenset(units)
        for u in units:
            for v in reads(u, names):
                matrix[index[u], index[v]] = 1
        owner = np.fromiter((split.owner[u] for u in units), dtype=np.int32, count=len(units))
        got = schedule.receives(owner, matrix, index[final])
        return cls(split, {r: [units[i] for i in got[r]] for r in range(len(got))})

    @classmethod
    def everything(cls, split, world: int, model_n: int) -> "ExchangePlan":
        """The conservative plan: every rank receives every unit it does not own."""
        owner = split.owner
        return cls(split, {r: sorted(u for u in owner if r >= model_n or owner[u] != r) for r in range(world)})

    @classmethod
    def trace(cls, config, layout, split, denoiser, args, kwargs, forward=None) -> "ExchangePlan":
        """The plan for this model and these inputs: one traced forward of a
        meta copy; a model the trace cannot run falls back, loudly, on
        sending everything."""
        schedule = _core.Schedule(config.model_n, config.stride, config.warm_up, int(config.time_shift), 1)
        try:
            p = probe(layout, denoiser, args, kwargs, forward)
        except Exception as exc:  # noqa: BLE001 - any model the trace cannot run
            warnings.warn(f"AsyncDiff: could not trace {type(denoiser).__name__} ({exc!r}); "
                          "every rank receives every output it does not own", RuntimeWarning, stacklevel=2)
            return cls.everything(split, config.group_size, config.model_n)
        return cls.from_reads(schedule, split, layout.final, p.inputs_of)

    def event(self, rank: int, plan, slots: Slots) -> tuple[list[Move], list[Move]]:
        """(sends, receives) of ``rank`` at the event of a call whose plan (for
        this rank) is ``plan``: owners send the outputs they just stored to
        their readers when they publish; the result rank sends the denoiser
        output to every other rank; readers receive when owners deliver."""
        sends, recvs = [], []
        if plan.publish:
            for unit in sorted(self.split.components[rank]):
                if self.readers[unit]:
                    sends.extend(Move(unit, i, self.readers[unit], off, nb)
                                 for i, (off, nb) in enumerate(slots.of[unit]))
        (off, nb), = slots.of[RESULT]
        if plan.result_rank == rank:
            sends.append(Move(RESULT, 0, tuple(r for r in range(self.world) if r != rank), off, nb))
        if plan.receive:
            for unit in self.receives[rank]:
                recvs.extend(Move(unit, i, (self.owner[unit],), o, n) for i, (o, n) in enumerate(slots.of[unit]))
        if plan.result_rank >= 0 and plan.result_rank != rank:
            recvs.append(Move(RESULT, 0, (plan.result_rank,), off, nb))
        return sends, recvs
