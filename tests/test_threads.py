"""Several devices in one process (``devices=["cpu", ...]``): one thread per
rank, outputs bitwise equal to the emulation, errors before any work, and a
failing component that fails the call, not the pipeline."""

import threading

import pytest
import torch

from asyncdiff import AsyncDiff
from asyncdiff.testing import tiny
from asyncdiff.threads import cores

pytestmark = pytest.mark.usefixtures("one_thread")
# every shape on SD 1.5; the extremes (N=2 S=1, N=3 S=2) on SDXL and SD3
CASES = [(arch, n, s) for arch in ("sd15", "sdxl", "sd3") for n, s in ((2, 1), (3, 1), (2, 2), (3, 2))
         if arch == "sd15" or (n, s) in ((2, 1), (3, 2))]


def run(pipe, arch, steps=6, **options):
    kw = dict(tiny.default_call_kwargs(arch), num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
    ad = AsyncDiff(pipe, **options)
    try:
        out = pipe(**kw)
        return (out.images if hasattr(out, "images") else out.frames), ad
    finally:
        ad.remove()


@pytest.mark.parametrize("arch, n, s", CASES)
def test_threads_equal_emulation(pipes, arch, n, s):
    pipe = pipes(arch)
    torch.set_num_threads(max(1, cores() // (n + s - 1)))  # the workers' kernels everywhere: the same bits
    expected, emu = run(pipe, arch, model_n=n, stride=s, warm_up=1, time_shift=n == 3)
    got, ad = run(pipe, arch, model_n=n, stride=s, warm_up=1, time_shift=n == 3, devices=["cpu"] * (n + s - 1))
    assert ad.mode == "threads" and emu.mode == "emulate"
    assert torch.equal(got, expected)
    assert ad.counts == emu.counts  # every rank ran its own blocks, as in the emulation


def test_the_callers_thread_count_is_kept(pipes):
    torch.set_num_threads(2)
    run(pipes("sd15"), "sd15", model_n=2, devices=["cpu", "cpu"])
    assert torch.get_num_threads() == 2


def test_ranks_run_in_their_own_threads(pipes):
    pipe = pipes("sd15")
    seen = set()
    handle = pipe.unet.down_blocks[0].register_forward_pre_hook(lambda *_: seen.add(threading.current_thread().name))
    try:
        run(pipe, "sd15", model_n=2, devices=["cpu", "cpu"])
    finally:
        handle.remove()
    assert threading.current_thread().name in seen  # the warm-up: the caller's thread
    assert any(name.startswith("asyncdiff") for name in seen), seen


@pytest.mark.parametrize("devices, error, text", [
    (["cpu"], ValueError, r"devices: 1 given, but model_n \+ stride - 1 = 2"),
    (["cpu", "cpu", "cpu"], ValueError, "devices: 3 given"),
    (["cpu", "cuda:0"], ValueError, "devices: mixed device types"),
    (["cuda:98", "cuda:99"], ValueError, r"devices: 'cuda:98' does not exist \(\d+ CUDA device\(s\) visible\)"),
    (["cpu", "toaster"], ValueError, "devices: 'toaster' is not a device"),
    (["meta", "meta"], ValueError, "devices: 'meta': only CPU and CUDA devices are supported"),
    ("cpu", ValueError, "devices: expected a list"),
    ([], TypeError, "devices: expected a non-empty list"),
])
def test_bad_devices_are_refused_up_front(pipes, devices, error, text):
    pipe = pipes("sd15")
    forward = pipe.unet.forward
    with pytest.raises(error, match=text):
        AsyncDiff(pipe, model_n=2, devices=devices)
    assert pipe.unet.forward == forward  # nothing was attached


def test_devices_under_torchrun_are_refused(pipes, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="devices: under torchrun each process drives one device"):
        AsyncDiff(pipes("sd15"), model_n=2, devices=["cpu", "cpu"])


def test_a_failing_component_fails_the_call_not_the_pipeline(pipes):
    pipe = pipes("sd15")
    expected, _ = run(pipe, "sd15", model_n=2)
    ad = AsyncDiff(pipe, model_n=2, devices=["cpu", "cpu"])
    calls = {"n": 0}

    def fail_in_a_worker(*_):
        calls["n"] += 1
        if threading.current_thread().name.startswith("asyncdiff") and calls["n"] < 100:
            calls["n"] = 100
            raise RuntimeError("injected fault in a worker thread")

    handle = pipe.unet.up_blocks[-1].register_forward_pre_hook(fail_in_a_worker)
    try:
        kw = dict(tiny.default_call_kwargs("sd15"), num_inference_steps=6)
        with pytest.raises(RuntimeError, match="injected fault in a worker thread"):
            pipe(**{**kw, "generator": torch.Generator().manual_seed(0)})
        handle.remove()
        out = pipe(**{**kw, "generator": torch.Generator().manual_seed(0)})  # the next call works
        assert torch.equal(out.images, expected)
    finally:
        handle.remove()
        ad.remove()


@pytest.mark.parametrize("arch, n, s", [("sd15", 2, 1), ("sd15", 3, 2), ("sdxl", 2, 1), ("sd3", 2, 1)])
def test_per_device_copies_equal_emulation(pipes, monkeypatch, arch, n, s):
    """The several-GPU path on the CPU: every rank but 0 runs its own copy of the
    denoiser holding only the glue and its blocks (ASYNCDIFF_REPLICAS=1 makes the
    copies on one device), inputs and published outputs go through the copies
    between devices; the images are still the emulation's, bit for bit."""
    from asyncdiff import shard

    pipe = pipes(arch)
    world = n + s - 1
    torch.set_num_threads(max(1, cores() // world))
    expected, emu = run(pipe, arch, model_n=n, stride=s, warm_up=1)
    monkeypatch.setenv("ASYNCDIFF_REPLICAS", "1")
    kw = dict(tiny.default_call_kwargs(arch), num_inference_steps=6, generator=torch.Generator().manual_seed(0))
    ad = AsyncDiff(pipe, model_n=n, stride=s, warm_up=1, devices=["cpu"] * world)
    ran: dict = {}
    try:
        copies = ad._mode.replicas
        assert sorted(copies) == list(range(1, world))
        handles = []
        for rank, copy in copies.items():
            component = rank if rank < n else n - 1
            mine = set(ad.split.components[component])
            units = shard.tensor_units(ad.layout, ad.split.owner, copy)
            real = {name for name, t in [*copy.named_parameters(), *copy.named_buffers()] if not t.is_meta}
            assert real == {name for name, u in units.items() if u is None or u in mine}
            unit = sorted(mine)[0]
            handles.append(ad.layout.module(unit, copy).register_forward_pre_hook(
                lambda *_, key=(rank, unit): ran.__setitem__(key, ran.get(key, 0) + 1)))
        out = pipe(**kw)
        got = out.images if hasattr(out, "images") else out.frames
        for h in handles:
            h.remove()
    finally:
        ad.remove()
    assert torch.equal(got, expected)
    assert ad.counts == emu.counts
    for key, count in ran.items():  # each copy ran its block once per asynchronous call it computed
        assert count == emu.counts[key] > 0, key
    assert not ad._mode.replicas and not shard.meta_names(pipe.unet if hasattr(pipe, "unet") else pipe.transformer)
