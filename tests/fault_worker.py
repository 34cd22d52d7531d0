"""One rank of a fault-injection run (started by tests/test_faults.py as a bare
launch: RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, no torchrun agent).

``argv``: a JSON file with a list of scenarios, and the output folder.  Each
scenario makes this rank misbehave, or not, and records what AsyncDiff
raised here and when (``time.time()``; the ranks share the host's clock);
after a scenario a rank that is still alive checks that a fresh AsyncDiff in
the same process works.  Results go to ``<out>/<scenario>.rank<r>.json``,
written before anything that could end the process.
"""

import json
import os
import signal
import sys
import time
from datetime import timedelta

import torch

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402

from asyncdiff import AsyncDiff, shard  # noqa: E402
from asyncdiff.testing import tiny  # noqa: E402

RANK, WORLD = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
OUT = sys.argv[2]
PIPE = tiny.build_pipeline("sd15", seed=0)
STEPS = 6


def save(name: str, **record):
    path = os.path.join(OUT, f"{name}.rank{RANK}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


def call(steps: int = STEPS, seed: int = 0):
    out = PIPE(**{**tiny.default_call_kwargs("sd15"), "num_inference_steps": steps,
                  "generator": torch.Generator().manual_seed(seed)})
    return out.images


def meet(store, name: str):
    """Every rank here before going on (the test's own barrier, not AsyncDiff's)."""
    store.add(f"meet/{name}", 1)
    store.wait([f"meet/{name}/done"] if RANK else [], timedelta(seconds=600))
    if RANK == 0:
        while int(store.add(f"meet/{name}", 0)) < WORLD:
            time.sleep(0.01)
        store.set(f"meet/{name}/done", "1")


def renew():
    """After remove(), a rank that held only its own blocks (the default under a
    launch) has a pipeline that must be reloaded: build the next one."""
    global PIPE
    if shard.meta_names(PIPE.unet):
        PIPE = tiny.build_pipeline("sd15", seed=0)


def fresh(timeout: float = 120.0, transport: str = "auto") -> bool:
    """A new AsyncDiff in this process runs a normal call."""
    ad = AsyncDiff(PIPE, model_n=2, timeout=timeout, transport=transport)
    try:
        images = call(4)
        return bool(torch.isfinite(images).all())
    finally:
        ad.remove()
        renew()


def attempt(name: str, make, run=call, after=None):
    """Attach with ``make()`` and ``run()``; record the error and its time."""
    record = {"error": None, "message": "", "t_error": None, "rank_attr": None, "t_start": time.time()}
    ad = None
    try:
        ad = make()
        run()
    except BaseException as exc:  # noqa: BLE001 - what AsyncDiff raised is the result
        record.update(error=type(exc).__name__, message=str(exc)[:2000], t_error=time.time(),
                      rank_attr=getattr(exc, "rank", None))
    finally:
        if ad is not None:
            ad.remove()
            renew()
    if after is not None:
        after(record)
    save(name, **record)
    return record


def block_that_fails(at_call: int):
    """A pre-hook on one of rank 0's blocks that raises on its at_call-th run."""
    seen = {"n": 0}

    def hook(_module, _args):
        seen["n"] += 1
        if seen["n"] == at_call:
            save("exception-fault", t_fault=time.time())
            raise RuntimeError("injected fault in down_blocks[0]")

    return PIPE.unet.down_blocks[0].register_forward_pre_hook(hook)


def main():
    scenarios = json.load(open(sys.argv[1]))
    store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), WORLD, is_master=RANK == 0,
                          timeout=timedelta(seconds=600), wait_for_workers=False, multi_tenant=True)
    store = dist.PrefixStore("faults/", store)
    short = 3.0  # seconds of silence a rank waits for another in these scenarios
    for name in scenarios:
        meet(store, name)
        print(f"scenario {name}", flush=True)
        if name == "timeout-1e12-on-rank-0":
            attempt(name, lambda: AsyncDiff(PIPE, model_n=2, timeout=1e12 if RANK == 0 else 120.0))
        elif name == "nccl-on-rank-0":
            attempt(name, lambda: AsyncDiff(PIPE, model_n=2, transport="nccl" if RANK == 0 else "shm"))
        elif name == "warm_up-differs":
            attempt(name, lambda: AsyncDiff(PIPE, model_n=2, warm_up=1 + RANK))
        elif name == "time_shift-differs":
            attempt(name, lambda: AsyncDiff(PIPE, model_n=2, time_shift=bool(RANK)))
        elif name == "cfg-guidance-differs":  # rank 1's call has no batch of two halves to split
            def run():
                kwargs = {**tiny.default_call_kwargs("sd15"), "num_inference_steps": 3}
                return PIPE(**{**kwargs, **({"guidance_scale": 1.0} if RANK == 1 else {})})
            attempt(name, lambda: AsyncDiff(PIPE, model_n=1, split="auto", cfg_parallel=True), run=run)
        elif name == "steps-differ":
            attempt(name, lambda: AsyncDiff(PIPE, model_n=2), run=lambda: call(3 if RANK == 0 else 5))
        elif name == "exception-in-block":
            handle = block_that_fails(4) if RANK == 0 else None

            def stay_alive(_record):  # a notebook's kernel lives on after the error
                if handle is not None:
                    handle.remove()
                time.sleep(1.0)
            attempt(name, lambda: AsyncDiff(PIPE, model_n=2, timeout=120.0), after=stay_alive)
        elif name == "never-calls":
            def run():
                if RANK == 1:
                    save("never-calls-fault", t_fault=time.time())
                    time.sleep(2 * short)  # attached, but busy elsewhere
                call()
            attempt(name, lambda: AsyncDiff(PIPE, model_n=2, timeout=short), run=run)
        elif name == "sigkill" or name == "sigstop":
            sig = signal.SIGKILL if name == "sigkill" else signal.SIGSTOP

            def stop(_pipe, step, _t, kwargs):
                if RANK == 1 and step == 2:
                    save(f"{name}-fault", t_fault=time.time(), pid=os.getpid())
                    os.kill(os.getpid(), sig)
                return kwargs

            def after(record):
                if name == "sigstop" and RANK == 0:  # the operator ends the stopped rank
                    os.kill(json.load(open(os.path.join(OUT, "sigstop-fault.rank1.json")))["pid"], signal.SIGKILL)
            attempt(name, lambda: AsyncDiff(PIPE, model_n=2, timeout=short),
                    run=lambda: PIPE(**{**tiny.default_call_kwargs("sd15"), "num_inference_steps": STEPS,
                                        "callback_on_step_end": stop}), after=after)
            # the peer is gone for good: a fresh AsyncDiff here runs in emulation
            save(f"{name}-fresh", ok=fresh(transport="emulate"))
            continue
        elif name == "soak":
            ad = AsyncDiff(PIPE, model_n=2, timeout=120.0)
            try:
                first, rss, same = call(3, seed=1), [], True
                for _ in range(50):
                    same &= torch.equal(call(3, seed=1), first)
                    rss.append(_current_rss_kb())
                save(name, same=bool(same), rss_kb=rss)
            finally:
                ad.remove()
                renew()
            continue
        else:
            raise SystemExit(f"unknown scenario {name}")
        meet(store, name + "/fresh")
        save(name + "-fresh", ok=fresh())
    print(f"rank {RANK} done", flush=True)


def _current_rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


if __name__ == "__main__":
    main()
