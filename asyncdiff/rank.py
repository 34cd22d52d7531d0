"""One rank's step in a multi-process run (docs/design.md §6.3).

Each process is one rank.  Per denoiser call k it reads its own plan from
the C schedule, runs the forward with its blocks computing or replaying,
keeps the outputs it stores as its cache, and, when the plan has a transport
event, sends and receives what the exchange plan (``exchange.py``) says:
owners deliver their fresh outputs to the ranks that read them, the result
rank hands the denoiser output to everyone.
"""

from __future__ import annotations

import torch

from .exchange import RESULT, ExchangePlan, Slots
from .outputs import flatten, unflatten
from .step import Pass


class RankStep:
    def __init__(self, rank: int, units_of: dict, transport):
        self.rank = rank
        self.units_of = units_of  # component -> frozenset of its units
        self.transport = transport
        self.kind = transport.kind if transport is not None else "shm"
        self.plan: ExchangePlan | None = None
        self.cache: dict = {}  # unit -> (spec, tensors): what this rank replays
        self.slots: Slots | None = None
        self.seq = 0  # transport events so far (alike on every rank)
        self.synced_seq = -1  # the event that last delivered the owners' outputs

    def begin(self, call, k: int) -> list:
        self._plan = plan = call.schedule.plan(self.rank, k)
        if plan.sync and self.synced_seq != self.seq:
            # the owners' outputs arrive at the event that ends the call before a sync
            raise RuntimeError("AsyncDiff: a sync with nothing exchanged before it (schedule out of step)")
        if plan.warmup:
            return [Pass(self.rank, None, plan.store, {}, False, plan.timestep_index)]
        c = plan.compute_component
        return [Pass(self.rank, self.units_of[c] if c >= 0 else frozenset(), plan.store, self.cache, True,
                     plan.timestep_index)]

    def finish(self, call, k: int, passes: list, outs: list):
        plan, p, out = self._plan, passes[0], outs[0]
        if plan.store:
            stored = {u: (spec, [t.contiguous() for t in ts]) for u, (spec, ts) in p.stores.items()}
            if plan.warmup:
                self.cache = stored
                self._lay_out(out)
            else:
                self.cache.update(stored)
        if plan.exchange:
            out = self._exchange(plan, out)
        return out

    def _lay_out(self, out):
        """Slots for this call's shapes (collective: the transport may grow)."""
        slots = Slots.of_tensors(self.cache, flatten(out)[1][0])
        if self.slots is None or slots.key != self.slots.key:
            self.transport.reserve(slots.nbytes)
            self.slots = slots

    def _exchange(self, plan, out):
        self.seq += 1
        spec, tensors = flatten(out)
        result = tensors[0].contiguous()
        sends, recvs = self.plan.event(self.rank, plan, self.slots)
        fresh: dict = {}
        outgoing = [(m.peers, m.offset, result if m.unit == RESULT else self.cache[m.unit][1][m.index])
                    for m in sends]
        incoming = []
        for m in recvs:
            if m.unit == RESULT:
                got = torch.empty_like(result, memory_format=torch.contiguous_format)
                out = unflatten(spec, [got, *tensors[1:]])
            else:
                cached_spec, old = self.cache[m.unit]
                new = fresh.setdefault(m.unit, (cached_spec, [None] * len(old)))[1]
                got = new[m.index] = torch.empty_like(old[m.index], memory_format=torch.contiguous_format)
            incoming.append((m.peers[0], m.offset, got))
        if plan.receive:
            self.synced_seq = self.seq
        self.transport.exchange(self.seq, outgoing, incoming)
        self.cache.update(fresh)
        return out

    def close(self, failed: bool = False):
        self.cache = {}
        if self.transport is not None:
            self.transport.close(failed=failed)
            self.transport = None
