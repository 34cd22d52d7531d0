"""Faults in one rank are clear errors on every rank, within seconds, and leave
nothing behind (docs/design.md §8).

Two bare launches of 2 ranks (no torchrun agent to stop the survivors; see
tests/fault_worker.py): one runs the faults a rank survives (arguments that
differ between ranks, an exception inside a block, a rank that never calls
the pipeline, a stopped rank) and a 50-call soak, one kills a rank.  Each
checks the error each rank raised, how long the survivors took to raise it,
that a fresh AsyncDiff works afterwards, and that no shared-memory segment
and no process is left.  Run with ``-s -n0`` to see the figures.
"""

import json
import os

import pytest
import torch

import mp
from test_multiprocess import shm_left

WORKER = mp.HERE / "fault_worker.py"
SHORT = 3.0  # the timeout the worker uses for the silence scenarios
SURVIVED = ["timeout-1e12-on-rank-0", "warm_up-differs", "time_shift-differs", "steps-differ", "cfg-guidance-differs",
            "exception-in-block", "never-calls", "soak", "sigstop"]
if not torch.cuda.is_available():  # NCCL is then unusable on rank 0 at once
    SURVIVED.insert(1, "nccl-on-rank-0")


def launch(tmp_path, scenarios):
    pids = []
    results = mp.launch(2, scenarios, tmp_path, script=WORKER, pids=pids)
    for pid in pids:  # every rank was reaped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not shm_left(pids), "shared-memory segments left behind"

    def read(name, rank):
        path = tmp_path / f"{name}.rank{rank}.json"
        assert path.exists(), f"{name}: rank {rank} wrote nothing:\n{results[rank][1][-3000:]}"
        return json.loads(path.read_text())
    return results, read


def figure(name, seconds, what):
    print(f"FAULT {name:24s} {what:52s} {seconds:6.2f} s")


def test_faults_a_rank_survives(tmp_path):
    results, read = launch(tmp_path, SURVIVED)
    for rank, (code, log) in enumerate(results):
        if rank == 0:
            assert code == 0, log[-3000:]
    r = {name: (read(name, 0), read(name, 1) if name != "sigstop" else None)
         for name in SURVIVED if name != "soak"}

    zero, one = r["timeout-1e12-on-rank-0"]
    assert zero["error"] == "ValueError" and zero["message"].startswith("timeout:"), zero
    assert one["error"] == "AsyncDiffPeerError" and one["rank_attr"] == 0, one
    assert "rank 0 failed" in one["message"] and "timeout:" in one["message"], one
    assert one["t_error"] - zero["t_start"] < 5.0
    figure("bad timeout on rank 0", one["t_error"] - zero["t_start"], "rank 1 raises AsyncDiffPeerError after")

    if "nccl-on-rank-0" in r:
        zero, one = r["nccl-on-rank-0"]
        assert zero["error"] == "ValueError" and "transport: 'nccl'" in zero["message"], zero
        assert one["error"] == "AsyncDiffPeerError" and "transport: 'nccl'" in one["message"], one
        assert one["t_error"] - zero["t_start"] < 5.0
        figure("nccl on rank 0 only", one["t_error"] - zero["t_start"], "rank 1 raises AsyncDiffPeerError after")

    for name, text in (("warm_up-differs", "warm_up: rank 0 has 1, rank 1 has 2"),
                       ("time_shift-differs", "time_shift: rank 0 has False, rank 1 has True"),
                       ("steps-differ", "denoising steps (num_inference_steps): rank 0 has 3, rank 1 has 5")):
        zero, one = r[name]
        for rec in (zero, one):
            assert rec["error"] == "ValueError" and rec["message"].startswith(text), (name, rec)
        figure(name, abs(one["t_error"] - zero["t_error"]), "both ranks raise ValueError, apart by")

    zero, one = r["cfg-guidance-differs"]
    assert one["error"] == "ValueError" and "cfg_parallel: " in one["message"], one
    assert zero["error"] == "AsyncDiffPeerError" and zero["rank_attr"] == 1, zero
    assert "no classifier-free guidance" in zero["message"], zero
    figure("cfg: no guidance on rank 1", zero["t_error"] - one["t_error"], "rank 0 raises AsyncDiffPeerError after")

    zero, one = r["exception-in-block"]
    fault = read("exception-fault", 0)["t_fault"]
    assert zero["error"] == "RuntimeError" and "injected" in zero["message"], zero
    assert one["error"] == "AsyncDiffPeerError" and one["rank_attr"] == 0, one
    assert "rank 0" in one["message"] and "injected fault" in one["message"], one
    assert one["t_error"] - fault < 5.0
    figure("exception in a block", one["t_error"] - fault, "rank 1 raises AsyncDiffPeerError after")

    zero, one = r["never-calls"]
    fault = read("never-calls-fault", 1)["t_fault"]
    assert zero["error"] == "TimeoutError" and "silent" in zero["message"], zero
    assert SHORT - 0.5 <= zero["t_error"] - fault < 2 * SHORT, zero  # before rank 1 ever calls
    assert one["error"] == "AsyncDiffPeerError" and one["rank_attr"] == 0, one
    figure("rank 1 never calls", zero["t_error"] - fault, f"rank 0 raises TimeoutError (timeout={SHORT:g}) after")

    zero, _ = r["sigstop"]
    fault = read("sigstop-fault", 1)["t_fault"]
    assert zero["error"] == "TimeoutError" and "rank 1" in zero["message"], zero
    assert SHORT - 0.5 <= zero["t_error"] - fault < SHORT + 10.0, zero
    assert read("sigstop-fresh", 0)["ok"]
    figure("SIGSTOP of rank 1", zero["t_error"] - fault, f"rank 0 raises TimeoutError (timeout={SHORT:g}) after")

    for name in SURVIVED:
        if name not in ("soak", "sigstop"):
            assert read(name + "-fresh", 0)["ok"] and read(name + "-fresh", 1)["ok"], name

    for rank in (0, 1):
        soak = read("soak", rank)
        assert soak["same"], "a seed gave different images over 50 calls"
        rss = soak["rss_kb"]
        assert abs(rss[-1] - rss[9]) <= 0.05 * rss[9], rss
        print(f"SOAK rank {rank}: RSS after call 10 {rss[9] / 1024:.1f} MiB, after call 50 {rss[-1] / 1024:.1f} MiB")


def test_a_killed_rank_is_an_error_on_the_other(tmp_path):
    results, read = launch(tmp_path, ["sigkill"])
    assert results[1][0] == -9
    zero = read("sigkill", 0)
    fault = read("sigkill-fault", 1)["t_fault"]
    assert zero["error"] == "AsyncDiffPeerError" and zero["rank_attr"] == 1, zero
    assert "rank 1 has died" in zero["message"], zero
    assert zero["t_error"] - fault < 5.0
    assert read("sigkill-fresh", 0)["ok"]
    figure("SIGKILL of rank 1", zero["t_error"] - fault, "rank 0 raises AsyncDiffPeerError after")
