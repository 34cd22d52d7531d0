"""GPU acceptance: what the GPU path promises, checked in one run (docs/design.md §5.2, §5.3).

    python benchmarks/gpu_acceptance.py [--only NAME,...] [--skip NAME,...]

Made for one GPU (a few minutes there); with two or more it also runs NCCL
between processes and the end-to-end speed-up.  Each check prints
``PASS|FAIL|SKIP name: detail`` when it ends; the run ends with one markdown
table to paste into README's "GPU support".  Checks, in order: loader
(gpu_status: files, versions), abi (tests/test_abi.py here), emulation (on
cuda:0, bitwise equal to the plain pipeline at warm_up >= steps), shm-2proc
(two processes sharing cuda:0 over shared memory equal the emulation;
tests/test_gpu.py's rank worker), multi-device (the in-process mode on
["cuda:0", "cuda:0"] with and without per-device copies, and on
["cuda:0", "cuda:1"] with two GPUs, against the emulation), nccl-self (world size 1, self
send/receive), nccl-timeout (a world-2 communicator with rank 0 alone raises
after its timeout and returns from the abort), nccl-inflight (a failed
exchange keeps its tensors until the abort), timing (per-component GPU times
of SD 1.5 and SDXL, fp16, random weights, implied N=2/4 speed-up:
benchmarks/gpu.py), nccl-2gpu, cfg-shm (cfg_parallel, model_n=2: four
processes sharing cuda:0 over shared memory equal the emulation), cfg-2gpu
(cfg_parallel alone, model_n=1, over NCCL on two GPUs), e2e-2gpu and
devices-2gpu (two GPUs: the speed-up over NCCL processes, and in one process
with one thread per device vs one host thread).

Without a GPU each line that needs one says SKIP and why, after going as far
as a CPU allows: the loader names the real libraries, the NCCL lines call them
and report their answer, the emulation check runs on the CPU.  Exit status: 0
when no line failed (SKIP is no failure), 1 otherwise.  The NCCL probes that
could block run in a child process with a hard time limit.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "tests")]
import _util  # noqa: E402

CHECKS: list = []  # (name, function) in running order


def check(name):
    def register(fn):
        CHECKS.append((name, fn))
        return fn
    return register


def no_gpu(count: int = 1) -> str | None:
    """Why this machine cannot run a check that needs ``count`` GPUs, or None."""
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
        return f"needs a GPU (torch {torch.__version__}, {build}, sees none)"
    if torch.cuda.device_count() < count:
        return f"needs {count} GPUs ({torch.cuda.device_count()} visible)"
    return None


def exact_math():
    from test_gpu import _exact_math
    _exact_math()
    import torch
    torch.backends.cudnn.deterministic = True


def _store(timeout: float):
    from torch.distributed import TCPStore

    from asyncdiff.testing import ranks
    return TCPStore("127.0.0.1", ranks.free_port(), 1, True, timedelta(seconds=timeout))


def _first_problem(text: str) -> str:
    """What a gpu_status-like text says is missing, without the list of what was found."""
    text = text.split("NCCL transport unavailable: ", 1)[-1]
    return re.split(r"; (?:NCCL \S+|CUDA runtime \S+) from ", text)[0]


def _nccl_refusal(exc: Exception) -> tuple:
    """A refusal of the real libraries where there is no device is a SKIP."""
    return "SKIP", f"needs a GPU; the real libraries answer: {_first_problem(str(exc))}"


# ------------------------------------------------------------------ checks
@check("loader")
def loader(args):
    import torch

    from asyncdiff import _core

    status = _core.gpu_status()
    libs = re.findall(r"((?:NCCL|CUDA runtime) \S+) from (\S+) \(([^)]*)\)", status)
    found = "; ".join(f"{what} from {path} ({how})" for what, path, how in libs)
    if _core.transports()["nccl"] and torch.cuda.is_available():
        return "PASS", f"{status}; torch {torch.__version__}, {torch.cuda.get_device_name(0)}"
    if len(libs) == 2 and ("no usable CUDA device" in status or "no CUDA device visible" in status):
        return "SKIP", f"needs a GPU ({_first_problem(status)}); found {found}"
    return "FAIL", status


@check("abi")
def abi(args):
    cmd = [sys.executable, "-m", "pytest", "-q", "-n0", "-p", "no:cacheprovider", "-s", "tests/test_abi.py"]
    ran = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = ran.stdout.strip().splitlines()
    pairs = sorted(set(re.findall(r"against (CUDA runtime \S+ headers and NCCL \S+) headers", ran.stdout)))
    summary = lines[-1].strip("= ") if lines else ran.stderr[-300:]
    return ("PASS" if ran.returncode == 0 else "FAIL"), f"{summary}; {', '.join(pairs)}"


def _pipeline(device):
    from asyncdiff.testing import tiny
    return tiny.build_pipeline("sd15", seed=0).to(device)


@check("emulation")
def emulation(args):
    import torch

    from asyncdiff import AsyncDiff
    from test_gpu import _run

    why = no_gpu()
    device = "cpu" if why else "cuda:0"
    exact_math()
    pipe = _pipeline(device)
    plain = _run(pipe, "sd15", steps=args.steps)
    ad = AsyncDiff(pipe, model_n=2, stride=1, warm_up=args.steps, transport="emulate")
    try:
        got = _run(pipe, "sd15", steps=args.steps)
    finally:
        ad.remove()
    same = torch.equal(plain, got)
    result = f"warm_up={args.steps} >= steps={args.steps}: {'bitwise equal' if same else 'DIFFERENT'} on {device}"
    if why:
        return "SKIP", f"{why}; the same check on the CPU: {'PASS' if same else 'FAIL'} ({result})"
    return ("PASS" if same else "FAIL"), result


def _compare_ranks(args, world: int, configs: list, **emulated) -> tuple:
    """Launch tests/test_gpu.py's rank worker and compare with the emulation on cuda:0
    (``emulated``: its AsyncDiff options, the workers' defaults if none)."""
    import mp
    import torch
    from test_gpu import _emulate

    exact_math()
    expected = _emulate(_pipeline("cuda:0"), "sd15", **emulated)
    with tempfile.TemporaryDirectory(prefix="asyncdiff-accept-") as out:
        results = mp.launch(world, configs, Path(out), script=ROOT / "tests" / "test_gpu.py", silence=300.0)
        bad = [f"rank {r}: exit {code}: {log[-800:]}" for r, (code, log) in enumerate(results) if code != 0]
        if bad:
            return "FAIL", " | ".join(bad)
        got = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    notes, ok = [], True
    for cfg in configs:
        lat = [got[r][cfg["id"]]["latents"] for r in range(world)]
        modes = {got[r][cfg["id"]]["mode"] for r in range(world)}
        diff = (lat[0] - expected).abs().max().item()
        ok &= all(torch.equal(lat[0], x) for x in lat) and diff <= 1e-4 and modes == {cfg["transport"]}
        notes.append(f"{cfg['transport']}: max |diff| to emulation {diff:.1e}{' (bitwise)' if diff == 0 else ''}, "
                     f"modes {sorted(modes)}")
    return ("PASS" if ok else "FAIL"), "; ".join(notes)


@check("shm-2proc")
def shm_two_processes(args):
    why = no_gpu()
    if why:
        return "SKIP", why
    return _compare_ranks(args, 2, [dict(id="shm", transport="shm", device="cuda:0")])


@check("multi-device")
def multi_device(args):
    from asyncdiff import AsyncDiff

    why = no_gpu()
    if why:
        return "SKIP", why
    from test_gpu import _emulate, _run

    import os

    import torch

    exact_math()
    expected = _emulate(_pipeline("cuda:0"), "sd15")
    count = torch.cuda.device_count()
    notes, ok = [], True
    # one GPU: both ranks on cuda:0, with and without per-device copies; two: cuda:0 and cuda:1
    layouts = [(["cuda:0", "cuda:0"], "0"), (["cuda:0", "cuda:0"], "1")] + \
        ([(["cuda:0", "cuda:1"], "0")] if count >= 2 else [])
    for devices, copies in layouts:
        os.environ["ASYNCDIFF_REPLICAS"] = copies
        pipe = _pipeline("cuda:0")
        try:
            ad = AsyncDiff(pipe, model_n=2, stride=1, warm_up=1, devices=devices)
            try:
                got = _run(pipe, "sd15").float().cpu()
                made = sorted(ad._mode.replicas)
            finally:
                ad.remove()
        finally:
            os.environ.pop("ASYNCDIFF_REPLICAS", None)
        diff = (got - expected.float().cpu()).abs().max().item()
        ok &= diff <= 1e-4
        notes.append(f"{devices} (copies for ranks {made}): max |diff| to emulation {diff:.1e}")
    return ("PASS" if ok else "FAIL"), "; ".join(notes)


@check("devices-2gpu")
def devices_two_gpus(args):
    why = no_gpu(2)
    if why:
        return "SKIP", why
    import gpu

    got = gpu.in_process(gpu.parse_args(["--steps", "20"]), 2)
    plain = got["plain"]
    return "PASS", ("SD 1.5 UNet (real size, fp16, random weights) 512 px, 20 steps, batch 2, ONE process: "
                    f"plain {plain:.3f} s; devices=[cuda:0, cuda:1] thread per device {got['thread per device']:.3f} s "
                    f"(x{plain / got['thread per device']:.2f}), one host thread {got['one host thread']:.3f} s "
                    f"(x{plain / got['one host thread']:.2f})")


@check("nccl-self")
def nccl_self(args):
    import torch

    from asyncdiff import _core, transport

    dev = torch.device("cuda", 0)
    try:
        t = transport.NcclTransport(0, 1, args.timeout, _store(args.timeout) if not no_gpu() else None, device=dev)
    except (ValueError, _core.AsyncDiffError) as exc:
        if no_gpu():
            return _nccl_refusal(exc)
        raise
    try:
        checks = []
        for dtype, n in ((torch.uint8, 1 << 20), (torch.float16, 4099), (torch.bfloat16, 4099)):
            src = (torch.randint(0, 256, (n,), dtype=dtype, device=dev) if dtype == torch.uint8
                   else torch.randn(n, device=dev).to(dtype))
            dst = torch.zeros_like(src)
            t.exchange(len(checks), [(frozenset({0}), 0, src)], [(0, 0, dst)])
            checks.append(torch.equal(src.view(torch.uint8), dst.view(torch.uint8)))
        t.wait()
    finally:
        t.close(False)
    return ("PASS" if all(checks) else "FAIL"), f"1 MiB uint8, fp16, bf16 to self: {checks.count(True)}/3 byte-equal"


def probe_timeout(args) -> tuple:
    """World 2, rank 0 alone: init must raise TimeoutError after ~timeout (the C core aborts on the way out)."""
    from asyncdiff import _core

    t0 = time.monotonic()
    try:
        _core.NcclTransport(_core.nccl_unique_id(), 2, 0, 0, args.nccl_timeout)
    except TimeoutError as exc:
        took = time.monotonic() - t0
        ok = args.nccl_timeout * 0.9 <= took <= args.nccl_timeout + 30
        return ("PASS" if ok else "FAIL"), f"TimeoutError after {took:.1f} s (timeout {args.nccl_timeout:g} s) " \
                                           f"and the abort returned: {str(exc)[:120]}"
    except _core.AsyncDiffError as exc:
        return _nccl_refusal(exc) if exc.status == "unsupported" else ("FAIL", f"{exc.status}: {exc}")
    return "FAIL", "a world-2 communicator was created with one rank present"


def probe_inflight(args) -> tuple:
    """A send to self with no receive never completes: the exchange (or the next) must raise with
    the tensors kept, and close(failed=True) must return."""
    import torch

    from asyncdiff import _core, transport

    dev = torch.device("cuda", 0)
    try:
        t = transport.NcclTransport(0, 1, args.nccl_timeout, _store(30.0) if not no_gpu() else None, device=dev)
    except (ValueError, _core.AsyncDiffError) as exc:
        return _nccl_refusal(exc)
    a = torch.ones(1 << 20, dtype=torch.uint8, device=dev)
    b, c = torch.ones_like(a), torch.empty_like(a)
    try:
        t.exchange(1, [(frozenset({0}), 0, a)], [])
        t.exchange(2, [(frozenset({0}), 0, b)], [(0, 0, c)])
    except (TimeoutError, _core.AsyncDiffError) as exc:
        kept = any(x is a for x in t._inflight)
        t0 = time.monotonic()
        t.close(True)
        return ("PASS" if kept and not t._inflight else "FAIL"), \
            f"{type(exc).__name__} ({str(exc)[:100]}); tensors kept: {kept}; close(failed) returned in " \
            f"{time.monotonic() - t0:.2f} s"
    t.close(True)
    return "FAIL", "an unmatched send to self was not noticed"


PROBES = {"nccl-timeout": probe_timeout, "nccl-inflight": probe_inflight}


def _run_probe(name, args) -> tuple:
    if no_gpu():  # the C core refuses before any wait: safe in this process
        return PROBES[name](args)
    limit = args.nccl_timeout + 90
    cmd = [sys.executable, __file__, "--probe", name, "--nccl-timeout", str(args.nccl_timeout)]
    try:
        ran = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return "FAIL", f"no answer within {limit:g} s: a wait or the abort did not return (process killed)"
    last = (ran.stdout.strip().splitlines() or ["{}"])[-1]
    try:
        status, detail = json.loads(last)
    except ValueError:
        return "FAIL", f"exit {ran.returncode}: {(ran.stdout + ran.stderr)[-600:]}"
    return status, detail


check("nccl-timeout")(lambda args: _run_probe("nccl-timeout", args))
check("nccl-inflight")(lambda args: _run_probe("nccl-inflight", args))


@check("timing")
def timing(args):
    why = no_gpu()
    if why:
        return "SKIP", why
    import gpu
    import torch

    opts = gpu.parse_args(["--n", "2,4", "--repeat", str(args.repeat), "--warmup", "2"])
    rows = []
    for arch in ("sd15", "sdxl"):
        rows += gpu.measure_arch(arch, opts, gpu.Clock("cuda"), torch.float16)[2]
    paper = [r for r in rows if r[2] == "paper"]
    args.tables.append(("Implied AsyncDiff step from per-component GPU times (paper splits, stride 1)",
                        _util.table(gpu.STEP_HEADERS, paper, align="lrllrrrrrr")))
    return "PASS", "; ".join(f"{r[0]} N={r[1]}: step {r[7]:.1f} ms, implied x{r[8]:.2f}" for r in paper)


@check("nccl-2gpu")
def nccl_two_gpus(args):
    why = no_gpu(2)
    if why:
        return "SKIP", why
    return _compare_ranks(args, 2, [dict(id="nccl", transport="nccl", device="local")])


def _cfg_ranks(args, gpus: int, world: int, transport: str, device: str) -> tuple:
    """cfg_parallel over ``world`` rank processes (two groups of ``world / 2``) against the emulation."""
    why = no_gpu(gpus)
    if why:
        return "SKIP", why
    n = world // 2
    return _compare_ranks(args, world, [dict(id="cfg", transport=transport, device=device, model_n=n,
                                             cfg_parallel=True)], model_n=n, cfg_parallel=True)


@check("cfg-shm")
def cfg_shm(args):
    # the CFG halves on two groups of 2 ranks (model_n=2), four processes sharing cuda:0
    return _cfg_ranks(args, 1, 4, "shm", "cuda:0")


@check("cfg-2gpu")
def cfg_two_gpus(args):
    # CFG parallelism alone (model_n=1) over NCCL, one GPU per half
    return _cfg_ranks(args, 2, 2, "nccl", "local")


@check("e2e-2gpu")
def end_to_end(args):
    why = no_gpu(2)
    if why:
        return "SKIP", why
    got = _util.launch(HERE / "gpu.py", ["--e2e", "--steps", "20"], 2, silence=600.0)
    plain, asyn = got[0]["plain"], got[0]["asyncdiff"]
    return "PASS", f"SD 1.5 UNet (real size, fp16, random weights) 512 px, 20 steps, batch 2: plain {plain:.3f} s, " \
                   f"AsyncDiff N=2 over NCCL {asyn:.3f} s: x{plain / asyn:.2f}"


# ------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [n for n, _ in CHECKS]
    ap.add_argument("--only", default="", help=f"comma list of checks to run ({', '.join(names)})")
    ap.add_argument("--skip", default="", help="comma list of checks not to run")
    ap.add_argument("--steps", type=int, default=6, help="denoising steps of the tiny pipeline")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds for NCCL waits of the passing checks")
    ap.add_argument("--nccl-timeout", type=float, default=10.0, help="timeout the failure probes must hit")
    ap.add_argument("--repeat", type=int, default=5, help="timed forwards per model (median)")
    ap.add_argument("--probe", choices=sorted(PROBES), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for opt in ("only", "skip"):
        unknown = set(filter(None, getattr(args, opt).split(","))) - set(names)
        if unknown:
            ap.error(f"--{opt}: unknown check(s) {', '.join(sorted(unknown))}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(PROBES[args.probe](args)), flush=True)
        return 0
    only, skip = set(filter(None, args.only.split(","))), set(filter(None, args.skip.split(",")))
    args.tables = []
    print(f"## GPU acceptance\n\n- machine: {_util.machine()}\n- command: `{_util.command()}`\n", flush=True)
    rows, start = [], time.monotonic()
    for name, fn in CHECKS:
        if (only and name not in only) or name in skip:
            continue
        t0 = time.monotonic()
        try:
            status, detail = fn(args)
        except Exception as exc:  # a check that breaks is a FAIL line, never the end of the run
            status, detail = "FAIL", f"{type(exc).__name__}: {exc}"
        detail = " ".join(str(detail).split())
        print(f"{status} {name}: {detail} [{time.monotonic() - t0:.1f} s]", flush=True)
        rows.append([name, status, detail.replace("|", "/")])
    for title, table in args.tables:
        print(f"\n{title}:\n\n{table}")
    print(f"\nGPU acceptance ({time.monotonic() - start:.0f} s):\n")
    print(_util.table(["check", "result", "detail"], rows, align="lll"))
    return 1 if any(r[1] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
