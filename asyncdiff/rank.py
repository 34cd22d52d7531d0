"""One rank's step in a multi-process run (docs/design.md §6.3).

Each process is one rank.  Per denoiser call k it reads its own plan from
the C schedule, runs the forward with its blocks computing or replaying,
keeps the outputs it stores as its cache, and, when the plan has a transport
event, sends and receives what the exchange plan (``exchange.py``) says:
owners deliver their fresh outputs to the ranks that read them, the result
rank hands the denoiser output to everyone.

At the first denoiser call of every pipeline call the ranks compare, in one
small all-gather, what the schedule depends on (the steps, the timesteps,
the latents' shape and dtype, the other inputs' shapes); every exchange
event carries (pipeline call, denoiser call k), which the receiving side
checks.  An error during a call marks the transport failed with its message,
so the peers raise at once, and this instance refuses further calls
(docs/design.md §8).
"""

from __future__ import annotations

import json
import time
import zlib
from collections import Counter

import torch

from . import _core, launch
from .exchange import RESULT, ExchangePlan, Slots
from .outputs import flatten, unflatten
from .step import Pass, run_in_turn


def call_record(call, number: int, config) -> dict:
    """What the ranks must agree on for one pipeline call (JSON, small)."""
    t = call.timesteps.detach().float().cpu()
    latents = call.inputs[0] if call.inputs else (None, None, (), None)
    others = ";".join(f"{n}[{key}]:{tuple(shape)}:{dtype}" for n, key, shape, dtype in call.inputs[1:])
    return {
        "pipeline call": number,
        "denoising steps (num_inference_steps)": call.steps,
        "timesteps": f"{float(t[0]):g}..{float(t[-1]):g} (crc {zlib.crc32(t.numpy().tobytes()):08x})",
        **{name: value for name, value in config.summary().items() if name in ("warm_up", "time_shift")},
        "batch": latents[2][0] if latents[2] else None,
        "latents": f"{'x'.join(map(str, latents[2]))} {str(latents[3]).replace('torch.', '')}",
        "other inputs' shapes": f"crc {zlib.crc32(others.encode()):08x}",
    }


class RankStep:
    run = staticmethod(run_in_turn)  # the forwards of a call, one after another

    def __init__(self, rank: int, units_of: dict, transport, board=None, device=None, group=None):
        self.rank = rank  # in its group (the schedule's rank)
        # cfg_parallel (docs/design.md §6.7): (this rank's group, the number of ranks in a group);
        # the transport's ranks are group * size + rank, each group writes its own copy of the slots,
        # and after every call this rank swaps its half of the output with its twin, the rank of the
        # same place in the other group
        self.group = group
        self.base = group[0] * group[1] if group is not None else 0
        self.device = device if device is not None else torch.device("cpu")
        # sharded (docs/design.md §6.5): expect(bound) -> the probe of these
        # inputs (every unit's output shapes), set once the split is known;
        # None while this rank holds the whole denoiser
        self.expect = None
        self.units_of = units_of  # component -> frozenset of its units
        self.transport = transport
        self.board = board  # the launch store, for transports without an all-gather of their own
        self.kind = transport.kind if transport is not None else "shm"
        self.plan: ExchangePlan | None = None
        self.cache: dict = {}  # unit -> (spec, tensors): what this rank replays
        self.slots: Slots | None = None
        self._events: dict = {}  # (publish, receive, result rank) -> the event's moves, for these slots
        self.seq = 0  # transport events so far (alike on every rank)
        self.synced_seq = -1  # the event that last delivered the owners' outputs
        self.calls = 0  # pipeline calls begun (alike on every rank)
        self.failed: str | None = None  # why an earlier call failed
        self.took: Counter = Counter()  # this call's transport time and bytes (read by the Loop)

    def busy(self, flag: bool) -> None:
        """This rank is computing (peers wait for it however long it takes) or not
        (a peer waiting for it fails after ``timeout`` seconds of silence)."""
        if self.transport is not None and hasattr(self.transport, "busy"):
            self.transport.busy(flag)

    def fail(self, exc: BaseException) -> None:
        """An error during a call: tell the peers, refuse further calls."""
        if self.failed is None:
            self.failed = f"{type(exc).__name__}: {exc}"
            if self.transport is not None:
                if hasattr(self.transport, "fail"):
                    self.transport.fail(self.failed)  # the peers' waits end with this message
                self.transport.close(failed=True)
                self.transport = None

    def _agree(self, call, config) -> None:
        """Raise, on every rank alike, when the ranks' pipeline calls differ."""
        record = call_record(call, self.calls, config)
        if hasattr(self.transport, "allgather"):
            blobs = self.transport.allgather(json.dumps(record, separators=(",", ":")).encode())
            every = [json.loads(b) for b in blobs]
        else:
            every = launch.gather(self.board, f"call/{self.calls}", record)
        differ = launch.disagreement(every)
        if differ is not None:
            raise ValueError(f"{differ}; the ranks' pipeline calls differ: every rank must call the pipeline "
                             "with the same arguments (prompt batch, num_inference_steps, strength, size, ...)")

    def start(self, call) -> None:
        """A pipeline call begins (its first denoiser call): check the ranks agree on it."""
        if self.failed is not None:
            raise _core.AsyncDiffError(f"AsyncDiff: an earlier pipeline call failed ({self.failed}); the ranks "
                                       "are out of step: call remove() and attach a new AsyncDiff")
        self.calls += 1
        self._agree(call, call.config)

    def begin(self, call, k: int) -> list:
        self._plan = plan = call.schedule.plan(self.rank, k)
        if plan.sync and self.synced_seq != self.seq:
            # the owners' outputs arrive at the event that ends the call before a sync
            raise RuntimeError("AsyncDiff: a sync with nothing exchanged before it (schedule out of step)")
        if plan.warmup:
            if self.expect is None:
                return [Pass(self.rank, None, plan.store, {}, False, plan.timestep_index)]
            if k == 0:
                self._expected = self.expect(call.bound)
                self._lay_out_shapes({u: shapes for u, (_, shapes) in self._expected.outputs.items()
                                      if u in self.plan.owner}, self._expected.result)
            self._tag = (self.calls << 32) | k
            own = self.units_of.get(self.rank, frozenset())
            return [Pass(self.rank, own, plan.store, {}, False, plan.timestep_index, relay=self._relay)]
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
            out = self._exchange(plan, out, k)
        if self.group is not None:
            out = self._join(out, k)
        return out

    def _join(self, out, k: int):
        """cfg_parallel: swap halves of the denoiser output with the twin; the
        whole batch, unconditional half first, on both."""
        group, size = self.group
        twin = (1 - group) * size + self.rank
        spec, tensors = flatten(out)
        mine = tensors[0].contiguous()
        if self.slots is None:  # warm-up calls before the first that stores
            self._lay_out_shapes({}, (mine.shape, mine.dtype))
        (off, _), = self.slots.of[RESULT]
        theirs = torch.empty_like(mine, memory_format=torch.contiguous_format)
        synced = self.synced_seq == self.seq
        self.seq += 1
        self._move([((twin,), off, mine)], [(twin, off, theirs)], (self.calls << 32) | k, "join", shift=False)
        if synced:  # this event delivers nothing the schedule waits for
            self.synced_seq = self.seq
        halves = (mine, theirs) if group == 0 else (theirs, mine)
        return unflatten(spec, [torch.cat(halves), *tensors[1:]])

    def _lay_out(self, out):
        """Slots for this call's shapes (collective: the transport may grow)."""
        result = flatten(out)[1][0]
        self._lay_out_shapes({u: [(t.shape, t.dtype) for t in ts] for u, (_, ts) in self.cache.items()},
                             (result.shape, result.dtype))

    def _lay_out_shapes(self, shapes: dict, result: tuple):
        slots = Slots(shapes, result)
        if self.slots is None or slots.key != self.slots.key:
            self.transport.reserve(slots.nbytes * (1 if self.group is None else 2))  # cfg_parallel: one per group
            self.slots = slots
            self._events = {}

    @torch.compiler.disable
    def _relay(self, unit: str, out):
        """Warm-up through the owners: one event per unit, in the order the
        units run.  Its owner sends what it just computed to every other rank
        (each needs it to go on through the glue); the others receive it."""
        self.seq += 1
        owner = self.plan.owner[unit]
        places = self.slots.of[unit]
        if out is not None:
            others = tuple(r for r in range(self.plan.world) if r != self.rank)
            tensors = [t.contiguous() for t in flatten(out)[1]]
            self._move([(others, off, t) for (off, _), t in zip(places, tensors)], [], self._tag, "relay")
            return out
        spec, shapes = self._expected.outputs[unit]
        got = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in shapes]
        self._move([], [(owner, off, t) for (off, _), t in zip(places, got)], self._tag, "relay")
        return unflatten(spec, got)

    def _move(self, sends, recvs, tag, where="exchange", shift=True):
        """One transport event, timed: ``took[where]`` gets the seconds in it
        ("relay": during a warm-up forward; "exchange": after the forwards;
        "join": cfg_parallel's swap of halves), and, where the transport says,
        its publish and fetch halves and the bytes.  ``shift``: the peers are
        ranks of this group (the transport's are numbered across groups)."""
        if self.group is not None:
            # both groups use the same slot layout: each writes in a copy of its own, the
            # group's index times the layout's size on (shared memory has one buffer for all)
            size, span = self.group[1], self.slots.nbytes
            by, mine = (self.base if shift else 0), self.group[0] * span
            sends = [(tuple(by + r for r in dsts), mine + off, t) for dsts, off, t in sends]
            recvs = [(by + src, (by + src) // size * span + off, t) for src, off, t in recvs]
        t0 = time.perf_counter()
        self.transport.exchange(self.seq, sends, recvs, tag=tag)
        self.took[where] += time.perf_counter() - t0
        for name, seconds in (getattr(self.transport, "last", None) or {}).items():
            self.took[name] += seconds
        self.took["bytes sent"] += sum(t.nbytes for _, _, t in sends)
        self.took["bytes received"] += sum(t.nbytes for _, _, t in recvs)
        self.took["events"] += 1

    def _exchange(self, plan, out, k: int):
        self.seq += 1
        spec, tensors = flatten(out)
        result = tensors[0].contiguous()
        key = (plan.publish, plan.receive, plan.result_rank)
        moves = self._events.get(key)
        if moves is None:  # the same few kinds of event all along a call: worked out once each
            moves = self._events[key] = self.plan.event(self.rank, plan, self.slots)
        sends, recvs = moves
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
        self._move(outgoing, incoming, (self.calls << 32) | k)
        self.cache.update(fresh)
        return out

    def close(self, failed: bool = False):
        self.cache = {}
        if self.transport is not None:
            self.transport.close(failed=failed)
            self.transport = None
