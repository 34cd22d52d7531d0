"""The C schedule is the only owner of "what does rank r do at call k".

Two checks.  Behaviour: over the whole grid of the schedule tests, the
passes the emulation and every rank's step ask for are read off the C plan
field by field.  Source: outside the options' own home (config.py, the
properties of attach.py) and the two places that build a ``_core.Schedule``
from them, no module of the package reads ``stride``, ``warm_up`` or
``time_shift``, so no Python code can re-derive a schedule rule from them.
"""

import ast
from pathlib import Path

import pytest

from asyncdiff import _core
from asyncdiff.emulate import Emulation
from asyncdiff.rank import RankStep

PACKAGE = Path(__file__).resolve().parents[1] / "asyncdiff"
GRID = [(n, s, w, ts, steps) for n in range(1, 9) for s in (1, 2) for steps in (1, 2, 3, 5, 8, 13)
        for w in range(1, steps + 1) for ts in (0, 1)]


class Call:
    def __init__(self, schedule):
        self.schedule = schedule


def units(n):
    return {c: frozenset({f"c{c}.a", f"c{c}.b"}) for c in range(n)}


def expected_pass(plan, units_of):
    if plan.compute_all:
        return None
    return units_of[plan.compute_component] if plan.compute_component >= 0 else frozenset()


@pytest.mark.parametrize("n", range(1, 9))
def test_passes_are_read_off_the_plan(n):
    units_of = units(n)
    for n_, s, w, ts, steps in GRID:
        if n_ != n:
            continue
        schedule = _core.Schedule(n, s, w, ts, steps)
        call, world = Call(schedule), n + s - 1
        emu = Emulation(world, units_of)
        ranks = [RankStep(r, units_of, None) for r in range(world)]
        for k in range(steps):
            plans = [schedule.plan(r, k) for r in range(world)]
            for r, step in enumerate(ranks):
                step.synced_seq = step.seq  # what the exchange before a sync would have set
                (p,) = step.begin(call, k)
                assert (p.rank, p.compute, p.store, p.tidx) == \
                    (r, expected_pass(plans[r], units_of), bool(plans[r].store), plans[r].timestep_index)
                assert p.count == (not plans[r].warmup)
            passes = emu.begin(call, k)
            computing = [r for r in range(world) if plans[r].compute_component >= 0]
            if plans[0].warmup or not computing:
                assert [(p.compute, p.tidx) for p in passes] == \
                    [(expected_pass(plans[0], units_of), plans[0].timestep_index)]
            else:
                assert [(p.rank, p.compute, p.tidx) for p in passes] == \
                    [(r, units_of[plans[r].compute_component], plans[r].timestep_index) for r in computing]
                assert plans[0].result_rank in computing
            emu.finish(call, k, passes, list(range(len(passes))))


SCHEDULE_OPTIONS = {"stride", "warm_up", "time_shift"}
# where the options may be read: their home, the facade's properties, and the
# arguments of the _core.Schedule built from them
ALLOWED_FILES = {"config.py", "attach.py"}


def test_no_python_module_reads_the_schedule_options():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ALLOWED_FILES or rel.startswith(("testing/", "demo/")):
            continue
        tree = ast.parse(path.read_text())
        allowed = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "Schedule":
                allowed.update(id(a) for arg in node.args for a in ast.walk(arg))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in SCHEDULE_OPTIONS and id(node) not in allowed:
                offenders.append(f"{rel}:{node.lineno}: .{node.attr}")
    assert not offenders, "schedule options read outside the Schedule constructor:\n" + "\n".join(offenders)
