"""What the ranks of the shared-memory transport tell each other besides events,
through the binding (``asyncdiff._core.ShmTransport``) and real processes:

- a rank that fails leaves a message (``fail``) that its peers' waits raise as
  ``AsyncDiffPeerError`` naming it (``.rank``), at once;
- ``timeout`` bounds silence: a rank marked ``busy`` beats, so a long step is
  waited for; an idle or SIGSTOPped rank times out after ``timeout``, and so
  do busy ranks that wait for each other;
- event tags (pipeline call, denoiser call): ranks out of step fail on both sides;
- ``allgather`` of small records, its cost;
- a reserve whose rank 0 is killed midway leaves nothing in /dev/shm;
- names with a NUL byte are refused.

Ranks are forked processes (they never touch torch); every wait is bounded and
every process is reaped (and continued, if stopped) before a test ends.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import secrets
import signal
import time
import traceback
from pathlib import Path

import pytest

import asyncdiff
from asyncdiff import _core

pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm on this host")

CTX = multiprocessing.get_context("fork")
T = 10.0  # timeout of the waits that must succeed


def _rank_main(fn, name, world, rank, conn, args):
    code = 0
    try:
        h = _core.ShmTransport(name, world, rank, rank == 0, T)
        try:
            h.barrier(T)
        finally:
            if rank == 0:
                _core.shm_unlink(name)
        conn.send(("ok", fn(h, rank, name, *args)))
        h.detach(False)
    except BaseException as exc:  # reported to the test, which fails with it
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        code = 1
    finally:
        os._exit(code)


def run_ranks(fn, world, *args, limit=60.0, killed=()):
    """Run ``fn(handle, rank, name, *args)`` in ``world`` forked ranks joined to
    one fresh segment; return each rank's result (None for ranks in
    ``killed``, which must die of SIGKILL).  Fails on an error in a rank, on
    a rank that outlives ``limit`` seconds, and on a name left in /dev/shm."""
    name = f"/asyncdiff-pytest-{os.getpid()}-{secrets.token_hex(4)}"
    procs, conns = [], []
    try:
        for rank in range(world):
            parent, child = CTX.Pipe(duplex=False)
            p = CTX.Process(target=_rank_main, args=(fn, name, world, rank, child, args))
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        deadline = time.monotonic() + limit
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.exitcode is None]
        assert not hung, f"ranks {hung} still running after {limit} s"
    finally:
        for p in procs:
            if p.exitcode is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            p.join()
    left = sorted(e.name for e in Path("/dev/shm").iterdir() if e.name.startswith(name[1:]))
    for entry in left:  # removed before any check fails
        os.unlink(Path("/dev/shm") / entry)
    results = []
    for rank, (p, conn) in enumerate(zip(procs, conns)):
        if rank in killed:
            assert p.exitcode == -signal.SIGKILL, f"rank {rank} was meant to die of SIGKILL, exit {p.exitcode}"
            results.append(None)
            continue
        assert conn.poll(0), f"rank {rank} exited with {p.exitcode} and no result"
        status, value = conn.recv()
        assert status == "ok", f"rank {rank}: {value}"
        results.append(value)
    assert not left, f"left in /dev/shm: {left}"
    return results


def _timed(call, *args, **kwargs):
    """(exception or None, seconds) of one call."""
    t0 = time.monotonic()
    try:
        call(*args, **kwargs)
    except Exception as exc:  # the caller inspects it
        return exc, time.monotonic() - t0
    return None, time.monotonic() - t0


def _describe(exc):
    return None if exc is None else (type(exc).__name__, str(exc), getattr(exc, "rank", "-"),
                                     isinstance(exc, _core.AsyncDiffError))


# ------------------------------------------------------------- error records

MESSAGE = "ValueError: warm_up: rank 0 has 1, rank 1 has 2"


def _fail_rank(h, rank, name):
    if rank == 1:
        h.fail(MESSAGE)
        time.sleep(0.4)  # rank 0 notices while we are still attached
        h.fail("a later failure does not replace the first message")
        h.detach(True)
        return None
    exc, dt = _timed(h.fetch, 1, 1, [], T)
    time.sleep(0.6)  # rank 1 has detached by now: its message stays
    exc2, _ = _timed(h.barrier, T)
    return _describe(exc), dt, _describe(exc2)


def test_failure_message_reaches_the_peer():
    (first, dt, second), _ = run_ranks(_fail_rank, 2)
    assert first == ("AsyncDiffPeerError", f"fetch: rank 1 failed: {MESSAGE}", 1, True), first
    assert dt < 0.5, dt
    assert second == ("AsyncDiffPeerError", f"barrier: rank 1 failed: {MESSAGE}", 1, True), second


def test_failure_message_is_cut_at_a_character_boundary():
    name = f"/asyncdiff-pytest-{os.getpid()}-{secrets.token_hex(4)}"
    h0 = _core.ShmTransport(name, 2, 0, True, 1.0)
    h1 = _core.ShmTransport(name, 2, 1, False, 1.0)
    try:
        _core.shm_unlink(name)
        h1.fail("é" * 200)  # 400 bytes of UTF-8: 127 characters fit in the 255 kept
        with pytest.raises(_core.AsyncDiffPeerError) as info:
            h0.fetch(1, 1, [], 5.0)
        assert str(info.value) == "fetch: rank 1 failed: " + "é" * 127
        assert info.value.rank == 1 and info.value.status == "peer_gone"
        with pytest.raises(_core.AsyncDiffError, match="unusable after an earlier failure"):
            h1.publish(1, [], 1.0)
    finally:
        h1.detach(True)
        h1.fail("ignored once detached")
        h1.busy(False)
        h0.detach(False)


def _killed_rank(h, rank, name):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    exc, dt = _timed(h.fetch, 1, 1, [], T)
    return _describe(exc), dt


def test_dead_peer_is_a_peer_error_with_its_rank():
    (exc, dt), _ = run_ranks(_killed_rank, 2, killed={1})
    assert exc[0] == "AsyncDiffPeerError" and exc[2] == 1 and exc[3], exc
    assert "rank 1 has died" in exc[1], exc
    assert dt < 1.0, dt


def test_peer_error_class():
    assert asyncdiff.AsyncDiffPeerError is _core.AsyncDiffPeerError
    assert "AsyncDiffPeerError" in asyncdiff.__all__
    assert issubclass(_core.AsyncDiffPeerError, _core.AsyncDiffError)
    assert _core.AsyncDiffPeerError.__module__ == "asyncdiff._core"
    exc = _core.AsyncDiffPeerError("rank 3 failed: boom", rank=3)
    assert exc.rank == 3 and str(exc) == "rank 3 failed: boom"
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is _core.AsyncDiffPeerError and back.rank == 3 and back.args == exc.args
    assert _core.AsyncDiffPeerError("x").rank is None
    with pytest.raises(TypeError):
        _core.AsyncDiffPeerError("x", peer=1)
    with pytest.raises(TypeError):
        _core.AsyncDiffPeerError("x", rank="1")


# ---------------------------------------------------------- heartbeat, silence

def _late_publisher(h, rank, name, busy):
    if rank == 1:
        if busy:
            h.busy(True)
        time.sleep(1.5)
        h.publish(1, [], T)
        h.busy(False)
        return None
    exc, dt = _timed(h.fetch, 1, 1, [], 0.5)
    if exc is not None:
        h.fetch(1, 1, [], T)  # it does come: nobody is left waiting
    return _describe(exc), dt


def test_busy_peer_is_waited_for_beyond_the_timeout():
    (exc, dt), _ = run_ranks(_late_publisher, 2, True)
    assert exc is None, exc
    assert dt >= 1.3, dt


def test_idle_peer_times_out():
    (exc, dt), _ = run_ranks(_late_publisher, 2, False)
    assert exc is not None and exc[0] == "TimeoutError", exc
    assert "rank 1 has been silent" in exc[1], exc
    assert 0.5 <= dt < 1.2, dt


def _stopped_rank(h, rank, name):
    pids = [int(p) for p in h.allgather(str(os.getpid()).encode(), T)]
    if rank == 1:
        h.busy(True)
        os.kill(os.getpid(), signal.SIGSTOP)  # rank 0 continues us
        h.publish(1, [], T)
        return None
    try:
        exc, dt = _timed(h.fetch, 1, 1, [], 0.5)
    finally:
        os.kill(pids[1], signal.SIGCONT)
    h.fetch(1, 1, [], T)
    return _describe(exc), dt


def test_stopped_busy_peer_times_out():
    (exc, dt), _ = run_ranks(_stopped_rank, 2)
    assert exc is not None and exc[0] == "TimeoutError", exc
    assert "rank 1 has been silent" in exc[1], exc
    assert 0.5 <= dt < 1.2, dt


def _each_other(h, rank, name):
    h.busy(True)
    exc, dt = _timed(h.fetch, 1, 1 - rank, [], 0.5)  # nobody publishes: a deadlock
    if isinstance(exc, TimeoutError):
        h.fail(f"TimeoutError: {exc}")  # what the Python side does with it
    return _describe(exc), dt


def test_busy_ranks_waiting_for_each_other_time_out():
    results = run_ranks(_each_other, 2)
    for exc, dt in results:
        assert exc is not None and exc[0] in ("TimeoutError", "AsyncDiffPeerError"), exc
        assert "waiting for each other" in exc[1], exc
        assert 0.5 <= dt < 1.2, dt
    assert any(exc[0] == "TimeoutError" for exc, _ in results), results


def test_busy_arguments():
    name = f"/asyncdiff-pytest-{os.getpid()}-{secrets.token_hex(4)}"
    h = _core.ShmTransport(name, 1, 0, True, 1.0)
    try:
        _core.shm_unlink(name)
        h.busy(True)
        h.busy(False)
        with pytest.raises(TypeError, match="flag"):
            h.busy("yes")
        with pytest.raises(ValueError, match="flag"):
            h.busy(2)
        with pytest.raises(TypeError, match="message"):
            h.fail(1)
        with pytest.raises(ValueError, match="message"):
            h.fail("a\0b")
    finally:
        h.detach(False)


def test_forked_child_does_not_speak_for_the_rank():
    name = f"/asyncdiff-pytest-{os.getpid()}-{secrets.token_hex(4)}"
    h0 = _core.ShmTransport(name, 2, 0, True, 1.0)
    h1 = _core.ShmTransport(name, 2, 1, False, 1.0)
    try:
        _core.shm_unlink(name)
        h1.busy(True)
        pid = os.fork()
        if pid == 0:  # the child has the handle but not the rank (nor its heartbeat thread)
            try:
                h1.fail("a forked child must not fail the rank")
                h1.busy(False)
                h1.detach(True)
            finally:
                os._exit(0)
        deadline = time.monotonic() + 10.0
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("detach in a forked child hung")
            time.sleep(0.01)
        with pytest.raises(TimeoutError):  # rank 1 is still there, not failed nor left
            h0.fetch(1, 1, [], 0.0)
    finally:
        h1.detach(False)
        h0.detach(False)


# ------------------------------------------------------------------- tags

def _tag(call, k):
    return (call << 32) | k


def _out_of_step(h, rank, name):
    h.publish(1, [], T)  # the old signature: tag 0 on both sides
    h.fetch(1, 1 - rank, [], T)
    h.publish(2, [], T, tag=_tag(2, 3 + rank))  # rank 1 is one denoiser call ahead
    if rank == 0:
        exc, _ = _timed(h.fetch, 2, 1, [], T, tag=_tag(2, 3))
    else:
        exc, _ = _timed(h.fetch, 3, 0, [], T, _tag(2, 5))
    return _describe(exc)


def test_tag_mismatch_fails_on_both_sides():
    r0, r1 = run_ranks(_out_of_step, 2)
    text = ("exchange out of step: rank 1 sent event 2 as pipeline call 2, denoiser call 4; rank 0 "
            "expected pipeline call 2, denoiser call 3 (the ranks were given different arguments)")
    assert r0 == ("AsyncDiffError", text, "-", True), r0
    assert r1 == ("AsyncDiffPeerError", f"fetch: rank 0 failed: {text}", 0, True), r1


def test_tag_arguments():
    name = f"/asyncdiff-pytest-{os.getpid()}-{secrets.token_hex(4)}"
    h = _core.ShmTransport(name, 1, 0, True, 1.0)
    try:
        _core.shm_unlink(name)
        h.publish(1, [], 1.0, tag=2**64 - 1)
        h.fetch(1, 0, [], 1.0, tag=2**64 - 1)
        for bad, exc in ((-1, ValueError), (2**64, ValueError), (True, TypeError), ("1", TypeError)):
            with pytest.raises(exc, match="tag"):
                h.publish(2, [], 1.0, tag=bad)
        with pytest.raises(TypeError):
            h.publish(2, [], 1.0, label=1)
    finally:
        h.detach(False)


# -------------------------------------------------------------- all-gather

def _record(call, rank):
    n = (0, _core.SHM_MAX_RECORD, (37 * call + 11 * rank) % _core.SHM_MAX_RECORD)[(call + rank) % 3]
    return bytes((call * 31 + rank * 7 + i) % 256 for i in range(n))


def _gather(h, rank, name, rounds):
    out = []
    for call in range(rounds):
        mine = _record(call, rank)
        arg = (mine, bytearray(mine), memoryview(mine))[call % 3]
        out.append(h.allgather(arg, T))
        if call % 4 == 3:
            h.reserve(1000 * call, T)
    return out


def test_allgather_records():
    rounds, world = 12, 3
    results = run_ranks(_gather, world, rounds)
    want = [[_record(call, r) for r in range(world)] for call in range(rounds)]
    assert {0, _core.SHM_MAX_RECORD} <= {len(x) for row in want for x in row}
    for rank, got in enumerate(results):
        assert got == want, f"rank {rank}"


def test_allgather_arguments():
    name = f"/asyncdiff-pytest-{os.getpid()}-{secrets.token_hex(4)}"
    h = _core.ShmTransport(name, 1, 0, True, 1.0)
    try:
        _core.shm_unlink(name)
        assert h.allgather(b"", 1.0) == [b""]
        with pytest.raises(ValueError, match="record"):
            h.allgather(bytes(_core.SHM_MAX_RECORD + 1), 1.0)
        with pytest.raises(TypeError, match="record"):
            h.allgather("text", 1.0)
        with pytest.raises(ValueError, match="timeout"):
            h.allgather(b"x", -1.0)
    finally:
        h.detach(False)


def _gather_cost(h, rank, name, n):
    record = bytes(64)
    h.barrier(T)
    t0 = time.perf_counter()
    for _ in range(n):
        h.allgather(record, T)
    return (time.perf_counter() - t0) / n


def test_allgather_cost():
    per_call = max(run_ranks(_gather_cost, 2, 2000))
    print(f"allgather, 2 ranks, 64-byte records: {per_call * 1e6:.1f} us per call")
    # Goal: well under 1 ms; the bound leaves room for a loaded test machine.
    assert per_call < 2e-3, per_call


# --------------------------------------------------- names and segments left

def _reserve_rank0_killed(h, rank, name):
    if rank == 0:
        h.barrier(T)  # meets rank 1 in its reserve's first barrier
        with open(f"/dev/shm{name}-d1", "wb") as f:  # what rank 0's reserve makes next
            f.truncate(4096)
        os.kill(os.getpid(), signal.SIGKILL)
    exc, dt = _timed(h.reserve, 2048, T)
    return _describe(exc), dt, os.path.exists(f"/dev/shm{name}-d1")


def test_reserve_with_rank0_killed_leaves_nothing():
    _, (exc, dt, left) = run_ranks(_reserve_rank0_killed, 2, killed={0})
    assert exc[0] == "AsyncDiffPeerError" and exc[2] == 0 and "rank 0 has died" in exc[1], exc
    assert dt < 1.0, dt
    assert not left


def test_names_with_nul_are_refused():
    victim = Path(f"/dev/shm/asyncdiff-pytest-nul-{os.getpid()}")
    victim.write_bytes(b"")
    try:
        with pytest.raises(ValueError, match="name"):
            _core.shm_unlink(f"/{victim.name}\0-other")
        assert victim.exists(), "shm_unlink removed the name before the NUL"
        with pytest.raises(ValueError, match="name"):
            _core.ShmTransport(f"/{victim.name}\0-other", 1, 0, True, 1.0)
        with pytest.raises(ValueError, match="name"):
            _core.ShmTransport(f"/{victim.name}\0-other", 2, 1, False, 1.0)
    finally:
        victim.unlink()
