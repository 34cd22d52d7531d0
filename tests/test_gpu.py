"""GPU checks of the transports and of device placement.

Every test here is marked ``gpu`` and skipped, with the reason, when
``torch.cuda.is_available()`` is False; the NCCL tests are also skipped when
the C core cannot load NCCL (``asyncdiff._core.gpu_status()`` says why).

* NCCL world-size-1 self exchange on one GPU (1 MB, checked byte for byte,
  fp16/bf16 untouched), through the binding and through
  ``transport.NcclTransport`` with a real store rendezvous (the tensors NCCL
  was given stay referenced until the next exchange);
* two ranks on one GPU over NCCL: refused by every rank, saying why;
* emulation on CUDA equals emulation on CPU (fp32, TF32 off) within fp
  tolerance;
* two processes sharing one GPU over shared memory (CUDA tensors staged
  through pinned host buffers) equal the emulation on that GPU, and
  ``transport="auto"`` picks shared memory there (NCCL cannot put two ranks
  on one GPU);
* with two GPUs: two processes over NCCL equal the emulation;
* a benchmark-like test prints the NCCL self-exchange bandwidth at 1/16/64 MB
  (printed, never asserted: run with -s to see it).

Run as a script (by tests/mp.py's launch) this file is the rank worker of
the multi-process tests.  benchmarks/gpu_acceptance.py runs the GPU checks
that are not tests (failure probes, timings) and some of these again.
"""

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from asyncdiff import AsyncDiff, _core, transport
from asyncdiff.testing import ranks, tiny

HERE = Path(__file__).resolve().parent
CUDA = torch.cuda.is_available()
NCCL = CUDA and transport.available()["nccl"]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="no CUDA device: torch.cuda.is_available() is False "
                                        f"(torch {torch.__version__})"),
]
needs_nccl = pytest.mark.skipif(
    not NCCL,
    reason="NCCL not usable: " + (_core.gpu_status() if CUDA else "no CUDA device (torch.cuda.is_available() is False)"),
)
needs_two_gpus = pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")

STEPS = 6


def _exact_math():
    """Full-precision fp32 on the GPU (no TF32), so that devices agree closely."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False


@pytest.fixture
def exact_math():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    _exact_math()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def _run(pipe, arch: str, steps: int = STEPS, seed: int = 0):
    kw = tiny.default_call_kwargs(arch)
    kw["num_inference_steps"] = steps
    kw.pop("generator")
    out = pipe(**kw, generator=torch.Generator("cpu").manual_seed(seed))
    return out.images if hasattr(out, "images") else out.frames


def _emulate(pipe, arch, model_n=2, stride=1, warm_up=1, cfg_parallel=False):
    ad = AsyncDiff(pipe, model_n=model_n, stride=stride, warm_up=warm_up, transport="emulate",
                   cfg_parallel=cfg_parallel)
    try:
        return _run(pipe, arch).float().cpu()
    finally:
        ad.remove()


# ------------------------------------------------------------------ NCCL

def _self_exchange(handle, src: torch.Tensor, dst: torch.Tensor, timeout=60.0):
    nbytes = src.numel() * src.element_size()
    stream = torch.cuda.current_stream(src.device).cuda_stream
    handle.exchange([(0, src.data_ptr(), nbytes)], [(0, dst.data_ptr(), nbytes)], stream, timeout)


@needs_nccl
def test_nccl_self_exchange_1mb():
    dev = torch.device("cuda", 0)
    h = _core.NcclTransport(_core.nccl_unique_id(), 1, 0, 0, 60.0)
    try:
        assert h.stream != 0 and h.device == 0 and not h.failed
        src = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, device=dev)
        dst = torch.zeros_like(src)
        _self_exchange(h, src, dst)
        # no host sync in exchange: the compute stream waits for the copy, so
        # a kernel queued now sees the bytes
        same = torch.equal(src, dst)
        assert same
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(4099, device=dev).to(dtype)
            y = torch.zeros_like(x)
            _self_exchange(h, x, y)
            assert torch.equal(x.view(torch.int16), y.view(torch.int16))
        h.wait(60.0)
    finally:
        h.close(False)
    assert h.closed


@needs_nccl
def test_nccl_transport_class_world_one():
    """transport.NcclTransport end to end: store rendezvous, send expansion, pairing by offset."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", ranks.free_port(), 1, True, timedelta(seconds=60))
    dev = torch.device("cuda", 0)
    t = transport.NcclTransport(0, 1, 60.0, store, device=dev)
    try:
        assert t.kind == "nccl"
        t.reserve(1 << 20)  # no-op
        a = torch.randn(3, 5, device=dev, dtype=torch.float16)
        b = torch.arange(77, device=dev, dtype=torch.int64)
        ga, gb = torch.empty_like(a), torch.empty_like(b)
        # listed in different orders on the two sides: paired by offset
        t.exchange(1, [(frozenset({0}), 128, b), (frozenset({0}), 0, a), (frozenset({0}), 4096, torch.empty(0, device=dev))],
                   [(0, 0, ga), (0, 128, gb)])
        assert torch.equal(ga, a) and torch.equal(gb, b)
        assert len(t._inflight) == 4  # what NCCL was given stays alive until the next exchange
        with pytest.raises(ValueError, match="transport"):
            t.exchange(2, [(frozenset({0}), 0, a.cpu())], [])
    finally:
        t.close(False)
    assert t._inflight == []


@needs_nccl
def test_nccl_self_exchange_bandwidth():
    """Benchmark-like: prints GB/s for 1, 16 and 64 MB; asserts only correctness."""
    dev = torch.device("cuda", 0)
    h = _core.NcclTransport(_core.nccl_unique_id(), 1, 0, 0, 60.0)
    try:
        for mb in (1, 16, 64):
            n = mb << 20
            src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=dev)
            dst = torch.empty_like(src)
            _self_exchange(h, src, dst)
            torch.cuda.synchronize()
            reps = 20
            t0 = time.perf_counter()
            for _ in range(reps):
                _self_exchange(h, src, dst)
            h.wait(60.0)
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / reps
            assert torch.equal(src, dst)
            print(f"NCCL self exchange {mb:3d} MB: {dt * 1e3:8.3f} ms  {n / dt / 1e9:7.2f} GB/s "
                  f"({torch.cuda.get_device_name(dev)})")
    finally:
        h.close(False)


# ------------------------------------------------------- device placement

def test_emulation_on_cuda_equals_cpu(exact_math):
    cpu = tiny.build_pipeline("sd15", seed=0)
    expected = _emulate(cpu, "sd15")
    gpu = tiny.build_pipeline("sd15", seed=0).to("cuda")
    got = _emulate(gpu, "sd15")
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


# -------------------------------------------------- multi-process on GPUs

def _launch(world, configs, outdir):
    sys.path.insert(0, str(HERE))
    try:
        import mp
    finally:
        sys.path.remove(str(HERE))
    results = mp.launch(world, configs, outdir, script=Path(__file__))
    for rank, (code, log) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def test_two_processes_share_one_gpu_over_shm(tmp_path, exact_math):
    configs = [dict(id="shm", transport="shm", device="cuda:0"),
               dict(id="auto", transport="auto", device="cuda:0")]
    got = _launch(2, configs, tmp_path)
    expected = _emulate(tiny.build_pipeline("sd15", seed=0).to("cuda:0"), "sd15")
    for cfg in configs:
        r0, r1 = (got[r][cfg["id"]] for r in range(2))
        assert r0["mode"] == r1["mode"] == "shm"  # auto: two ranks on one GPU cannot use NCCL
        assert torch.equal(r0["latents"], r1["latents"]), cfg["id"]  # the result is the same bytes on every rank
        torch.testing.assert_close(r0["latents"], expected, rtol=1e-4, atol=1e-4)


@needs_nccl
def test_two_ranks_on_one_gpu_over_nccl_refused(tmp_path, monkeypatch):
    """NCCL refuses two ranks on one GPU (2.30+: unless NCCL_MULTI_RANK_GPU_ENABLE=1): every rank says so
    before NCCL is asked (docs/design.md §5.2)."""
    monkeypatch.delenv("NCCL_MULTI_RANK_GPU_ENABLE", raising=False)
    sys.path.insert(0, str(HERE))
    try:
        import mp
    finally:
        sys.path.remove(str(HERE))
    results = mp.launch(2, [dict(id="nccl", transport="nccl", device="cuda:0")], tmp_path, script=Path(__file__))
    for rank, (code, log) in enumerate(results):
        assert code != 0 and "are on the same GPU" in log and "NCCL_MULTI_RANK_GPU_ENABLE" in log, \
            f"rank {rank}:\n{log[-3000:]}"


@needs_two_gpus
@needs_nccl
def test_two_gpus_over_nccl(tmp_path, exact_math):
    configs = [dict(id="nccl", transport="nccl", device="local"),
               dict(id="auto", transport="auto", device="local"),
               # left on the CPU: each rank moves only its blocks and the glue to its GPU
               dict(id="from-cpu", transport="auto", device="cpu")]
    got = _launch(2, configs, tmp_path)
    expected = _emulate(tiny.build_pipeline("sd15", seed=0).to("cuda:0"), "sd15")
    for cfg in configs:
        r0, r1 = (got[r][cfg["id"]] for r in range(2))
        assert r0["mode"] == r1["mode"] == "nccl"
        assert torch.equal(r0["latents"], r1["latents"]), cfg["id"]
        torch.testing.assert_close(r0["latents"], expected, rtol=1e-4, atol=1e-4)
        for r, got_r in enumerate((r0, r1)):  # sharded: only this rank's part is real, all of it on its GPU
            assert got_r["real_devices"] == [f"cuda:{r}"] and got_r["meta"] > 0, (cfg["id"], got_r)


@pytest.mark.parametrize("world", [2, 4])
def test_cfg_parallel_processes_over_shm(tmp_path, exact_math, world):
    # the CFG halves on two groups of model_n = world / 2 ranks, all sharing one GPU over shared memory
    n = world // 2
    configs = [dict(id="cfg", transport="shm", device="cuda:0", model_n=n, cfg_parallel=True)]
    got = _launch(world, configs, tmp_path)
    expected = _emulate(tiny.build_pipeline("sd15", seed=0).to("cuda:0"), "sd15", model_n=n, cfg_parallel=True)
    for r in range(world):
        assert got[r]["cfg"]["mode"] == "shm"
        assert torch.equal(got[r]["cfg"]["latents"], got[0]["cfg"]["latents"])
    torch.testing.assert_close(got[0]["cfg"]["latents"], expected, rtol=1e-4, atol=1e-4)


@needs_two_gpus
@needs_nccl
def test_cfg_parallel_two_gpus_over_nccl(tmp_path, exact_math):
    got = _launch(2, [dict(id="cfg", transport="nccl", device="local", model_n=1, cfg_parallel=True)], tmp_path)
    expected = _emulate(tiny.build_pipeline("sd15", seed=0).to("cuda:0"), "sd15", model_n=1, cfg_parallel=True)
    assert got[0]["cfg"]["mode"] == got[1]["cfg"]["mode"] == "nccl"
    assert torch.equal(got[0]["cfg"]["latents"], got[1]["cfg"]["latents"])
    torch.testing.assert_close(got[0]["cfg"]["latents"], expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------- several GPUs in one process

@pytest.mark.parametrize("devices, copies", [
    (["cuda:0", "cuda:0"], "0"),  # one GPU, both ranks on the pipeline's denoiser
    (["cuda:0", "cuda:0"], "1"),  # one GPU, rank 1 on its own copy (the several-GPU path)
    pytest.param(["cuda:0", "cuda:1"], "", marks=needs_two_gpus),
    pytest.param("auto", "", marks=needs_two_gpus),
])
def test_devices_in_one_process_equal_emulation(exact_math, monkeypatch, devices, copies):
    monkeypatch.setenv("ASYNCDIFF_REPLICAS", copies)
    expected = _emulate(tiny.build_pipeline("sd15", seed=0).to("cuda:0"), "sd15")
    pipe = tiny.build_pipeline("sd15", seed=0)  # on the CPU: AsyncDiff moves it to devices[0]
    ad = AsyncDiff(pipe, model_n=2, stride=1, warm_up=1, devices=devices)
    try:
        assert str(pipe.unet.device) == "cuda:0"
        copy = ad._mode.replicas.get(1)
        if copies == "1" or devices != ["cuda:0", "cuda:0"]:
            assert copy is not None
            real = {str(t.device) for t in copy.parameters() if not t.is_meta}
            assert real == {ad._mode.devices[1].__str__()} and any(t.is_meta for t in copy.parameters())
        got = _run(pipe, "sd15").float().cpu()
    finally:
        ad.remove()
    assert str(pipe.unet.device) == "cpu"  # moved back
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------ the rank worker

def _worker(cfg_file: str, outdir: str):
    torch.set_num_threads(1)
    _exact_math()
    rank = int(os.environ["RANK"])
    results = {}
    for cfg in json.load(open(cfg_file)):
        device = f"cuda:{os.environ['LOCAL_RANK']}" if cfg["device"] == "local" else cfg["device"]
        pipe = tiny.build_pipeline("sd15", seed=0).to(device)
        ad = AsyncDiff(pipe, model_n=cfg.get("model_n", 2), stride=1, warm_up=1, transport=cfg["transport"],
                       timeout=120.0, cfg_parallel=cfg.get("cfg_parallel", False))
        try:
            latents = _run(pipe, "sd15").float().cpu()
            tensors = [*pipe.unet.parameters(), *pipe.unet.buffers()]
            results[cfg["id"]] = {"latents": latents, "mode": ad.mode,
                                  "real_devices": sorted({str(t.device) for t in tensors if not t.is_meta}),
                                  "meta": sum(t.is_meta for t in tensors)}
        finally:
            ad.remove()
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    print(f"rank {rank} done", flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
