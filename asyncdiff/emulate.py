"""Emulation: one process plays every rank in turn (docs/design.md §6.2).

This is what a plain ``python`` process or a Jupyter kernel gets, the way to
preview a configuration's quality on one device, and the oracle every
multi-process test compares against.  Per denoiser call k it reads the plan
of every rank from the C schedule and runs, in rank order, the forward of
each rank that computes; the outputs a rank stores become visible to the
others at the next call, as they would after the exchange.  Warm-up calls
and calls where no rank computes are alike on every rank and run once.
"""

from __future__ import annotations

from .step import Pass, run_in_turn


class Emulation:
    run = staticmethod(run_in_turn)  # the forwards of a call, one after another
    kind = "emulate"
    rank = 0

    def __init__(self, world: int, units_of: dict):
        self.world = world
        self.units_of = units_of  # component -> frozenset of its units
        self.published: dict = {}  # unit -> (spec, tensors): its owner's last stored output

    def begin(self, call, k: int) -> list:
        plans = [call.schedule.plan(r, k) for r in range(self.world)]
        first = plans[0]
        self._warmup, self._result = first.warmup, 0
        if first.warmup:
            return [Pass(0, None, first.store, {}, False, first.timestep_index)]
        computing = [(r, pl) for r, pl in enumerate(plans) if pl.compute_component >= 0]
        if not computing:  # every rank replays the owners' last outputs alike
            return [Pass(0, frozenset(), False, self.published, False, first.timestep_index)]
        self._result = [r for r, _ in computing].index(first.result_rank)
        return [Pass(r, self.units_of[pl.compute_component], pl.store, self.published, True, pl.timestep_index)
                for r, pl in computing]

    def finish(self, call, k: int, passes: list, outs: list):
        if self._warmup:
            if passes[0].store:
                self.published = passes[0].stores
        else:
            for p in passes:  # what the ranks stored is read from the next call on
                self.published.update(p.stores)
        return outs[self._result]

    def start(self, call) -> None:
        pass  # one process: nothing to agree on

    def busy(self, flag: bool) -> None:
        pass  # nobody waits for this process

    def fail(self, exc: BaseException) -> None:
        self.published = {}  # the next call starts afresh

    def close(self, failed: bool = False):
        self.published = {}
