"""Our shared-memory transport vs torch.distributed (gloo) between processes of one host.

Two kinds of events, each timed with both transports in the same processes,
alternating, after a barrier (so every event starts with all ranks ready):

* ``plain``: rank 0 sends one buffer to every other rank (64 KiB .. 64 MiB),
  with 2 and 3 processes;
* ``SD 1.5 N=k``: the exchange at the end of one asynchronous step (stride
  1) of SD 1.5 at 512x512 in float16 with batch 2 (classifier-free guidance),
  paper preset, k processes: every owner sends each unit output that other
  ranks read (the exchange plan, ``asyncdiff/exchange.py``) and the last rank sends the result to
  everyone.  Shapes come from a forward of the real-size UNet on the meta
  device; slots are laid out as ``attach.py`` lays them out.

Ours = one ``ShmTransport.exchange`` per event (each sent slot written once
into shared memory, each receiver copies out what it needs); gloo = the same
sends and receives as ``isend``/``irecv``, then wait for all of them.

Latency of an event = last rank done - first rank started (CLOCK_MONOTONIC,
shared by the processes), median over ``--iters`` events.  GB/s = bytes
received by the busiest receiver / latency (10^9 bytes).  memcpy = one core
copying that many bytes with ``numpy.copyto`` in this process: the ceiling of
any single copy.  Every received buffer is checked once per transport.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64K,1M,16M,64M", help="plain buffer sizes (K/M/G = 2^10/2^20/2^30)")
    ap.add_argument("--worlds", default="2,3", help="process counts for the plain sends")
    ap.add_argument("--patterns", default="2,3", help="model_n values of the SD 1.5 exchange ('' for none)")
    ap.add_argument("--arch", default="sd15", help="architecture of the exchange pattern (asyncdiff.testing.tiny name)")
    ap.add_argument("--px", type=int, default=512, help="image side of the exchange pattern")
    ap.add_argument("--iters", type=int, default=20, help="timed events per case and transport")
    ap.add_argument("--warmup", type=int, default=3, help="untimed events per case and transport")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _fill(src: int, tag: int) -> int:
    return (src * 31 + tag * 7 + 1) % 251


# ------------------------------------------------------------------ worker
def worker(args):
    import os

    import torch
    import torch.distributed as dist

    from asyncdiff import launch
    from asyncdiff.transport import ShmTransport

    _util.set_threads(1)
    job = json.loads(Path(args.job).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    store = launch.join(launch.from_env(), "bench/", args.timeout)  # the process group's store
    shm = ShmTransport(rank, world, args.timeout, store)
    shm.reserve(max(c["bytes"] for c in job["cases"]))
    seq = 0
    results = {}
    for case in job["cases"]:
        mine = case["ranks"][str(rank)]
        sends = []
        for dsts, off, nb, tag in mine["sends"]:
            t = torch.empty(nb, dtype=torch.uint8)
            t.fill_(_fill(rank, tag))
            sends.append((dsts, off, t, tag))
        recvs = [(src, off, torch.empty(nb, dtype=torch.uint8), tag) for src, off, nb, tag in mine["recvs"]]

        def ours():
            nonlocal seq
            seq += 1
            shm.exchange(seq, [(frozenset(d), off, t) for d, off, t, _ in sends],
                         [(src, off, t) for src, off, t, _ in recvs])

        def gloo():
            reqs = [dist.isend(t, dst, tag=tag) for d, _off, t, tag in sends for dst in d]
            reqs += [dist.irecv(t, src, tag=tag) for src, _off, t, tag in recvs]
            for r in reqs:
                r.wait()

        def check(fn) -> bool:
            for _src, _off, t, _tag in recvs:
                t.zero_()
            shm.barrier()
            fn()
            return all(bool((t == _fill(src, tag)).all()) for src, _off, t, tag in recvs)

        out = {"ok": {"ours": check(ours), "gloo": check(gloo)}, "spans": {"ours": [], "gloo": []}}
        for i in range(args.warmup + args.iters):
            for name, fn in (("ours", ours), ("gloo", gloo)):
                shm.barrier()
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                if i >= args.warmup:
                    out["spans"][name].append((t0, t1))
        results[case["name"]] = out
    shm.barrier()
    shm.close()
    dist.destroy_process_group()
    _util.rank_result(results)


# ------------------------------------------------------------------ parent
def plain_case(world: int, size: int) -> dict:
    ranks = {r: {"sends": [], "recvs": []} for r in range(world)}
    ranks[0]["sends"].append((list(range(1, world)), 0, size, 0))
    for r in range(1, world):
        ranks[r]["recvs"].append((0, 0, size, 0))
    return {"name": f"plain {_util.nbytes_h(size)} x{world}", "kind": "plain", "world": world,
            "label": f"{_util.nbytes_h(size)}, rank 0 -> {world - 1} rank(s)", "bytes": max(size, 64),
            "ranks": ranks}


def pattern_case(arch: str, n: int, px: int) -> dict:
    import _models

    c = _models.case(arch, px=px)
    split = _models.split_of(c, n, "paper")
    ex = _models.exchange(c, split, n)
    plan = _models.slot_plan(ex)
    received = {r: sorted(set(ex["needs"][r])) for r in range(n)}
    detail = f"{arch} N={n}: " + "; ".join(
        f"rank {r} receives {' '.join(u) or 'no unit'}" for r, u in received.items())
    detail += f"; rank {split.owner[c.layout.final]} sends the result to the others"
    if ex["fell_back"]:
        detail += (" (the exchange plan fell back to 'everything' on the fp16 meta inputs; these are its answer "
                   "for the same inputs in fp32)")
    return {"name": f"{arch} N={n}", "kind": "pattern", "world": n, "detail": detail,
            "label": f"{_models.NAMES.get(arch, arch)} {px}px fp16 async step, N={n}", "bytes": plan["bytes"],
            "ranks": plan["ranks"]}


def memcpy_gbs(nbytes: int, iters: int) -> float:
    import numpy as np

    src = np.ones(max(nbytes, 1), dtype=np.uint8)
    dst = np.zeros_like(src)
    t = _util.measure(lambda: np.copyto(dst, src), repeat=max(iters, 5), warmup=2)
    return nbytes / t["median"] / 1e9


def main(argv=None):
    args = parse_args(argv)
    if args.job is not None:
        return worker(args)
    _util.set_threads(1)
    cases = []
    for world in _util.int_list(args.worlds):
        for size in [_util.parse_size(s) for s in args.sizes.split(",") if s.strip()]:
            cases.append(plain_case(world, size))
    for n in _util.int_list(args.patterns):
        cases.append(pattern_case(args.arch, n, args.px))
    _util.preamble(
        "Transport: shared memory (ours) vs torch.distributed gloo",
        threads="1 per rank process",
        notes=[f"{args.iters} timed events per case and transport after {args.warmup} untimed, alternating "
               "ours/gloo, a barrier before each event",
               "latency: first rank starting to last rank done, median; GB/s: busiest receiver's bytes / latency; "
               "ours/gloo: ratio of latencies (< 1: ours faster); memcpy: one core, numpy.copyto of the "
               "busiest receiver's bytes"],
    )
    rows = []
    for world in sorted({c["world"] for c in cases}):
        group = [c for c in cases if c["world"] == world]
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            json.dump({"cases": group}, fh)
            job = fh.name
        try:
            results = _util.launch(Path(__file__).resolve(), [*sys.argv[1:], "--job", job], world=world,
                                   threads=1, silence=args.timeout)
        finally:
            Path(job).unlink()
        for c in group:
            per_rank = [r[c["name"]] for r in results]
            recv_bytes = [sum(nb for _s, _o, nb, _t in c["ranks"][r]["recvs"]) for r in range(world)]
            busiest, total = max(recv_bytes), sum(recv_bytes)
            lat = {}
            for name in ("ours", "gloo"):
                spans = [p["spans"][name] for p in per_rank]
                lat[name] = statistics.median(
                    max(s[i][1] for s in spans) - min(s[i][0] for s in spans) for i in range(len(spans[0])))
            ok = all(p["ok"]["ours"] and p["ok"]["gloo"] for p in per_rank)
            rows.append([c["label"], world, _util.nbytes_h(total), lat["ours"] * 1e6, lat["gloo"] * 1e6,
                         busiest / lat["ours"] / 1e9, busiest / lat["gloo"] / 1e9, lat["ours"] / lat["gloo"],
                         memcpy_gbs(busiest, args.iters), "yes" if ok else "NO"])
            print(f"  done: {c['name']}", file=sys.stderr, flush=True)
    print(_util.table(["event", "procs", "bytes received (all ranks)", "ours µs", "gloo µs", "ours GB/s",
                       "gloo GB/s", "ours/gloo", "memcpy GB/s", "data ok"], rows, align="lrrrrrrrrl"))
    for c in cases:
        if c.get("detail"):
            print(f"\n- {c['detail']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
