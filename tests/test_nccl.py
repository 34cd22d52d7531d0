"""The NCCL transport where there is no GPU: what can and must work on CPU.

* ``_core.transports()`` / ``gpu_status()`` / ``transport.available()`` say
  that NCCL is not usable here, and why;
* asking for NCCL (the ``NcclTransport`` type, ``nccl_unique_id``,
  ``AsyncDiff(transport="nccl")``, ``open_transport("nccl")``) raises a
  clear error instead of crashing or hanging;
* the argument checks that run before any GPU call are fuzzed: wrong types,
  sizes and values give TypeError / ValueError naming the argument (the
  constructor's on asyncdiff._core itself, exchange's through _nccl_args, a
  test-only extension built here from csrc/tests/nccl_args_module.c and the
  binding's own files);
* csrc/gpu.c and csrc/nccl.c run against stand-in CUDA runtime and NCCL
  libraries built from csrc/tests/fake_cudart.c and fake_nccl.c: the C test
  program test_gpu_loader (plain and under ASan/UBSan), and the Python
  binding end to end in subprocesses pointed at the stand-ins with
  ASYNCDIFF_*_LIBRARY (tests/nccl_binding_cases.py);
* the rule for two ranks on one GPU, per NCCL version.

The real headers and libraries without a GPU are tests/test_abi.py's; what
only a GPU can check is in tests/test_gpu.py and benchmarks/gpu_acceptance.py.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cbuild import (SANITIZE_ENV, SANITIZE_FLAGS, build, build_extension, compiler, require_sanitizers,
                    sanitizer_report)
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncdiff import AsyncDiff, _core, transport
from asyncdiff.testing import tiny

ROOT = Path(__file__).resolve().parent.parent
TESTS_C = ROOT / "csrc" / "tests"
FAKE_CUDART = TESTS_C / "fake_cudart.c"
FAKE_NCCL = TESTS_C / "fake_nccl.c"
LOADER_TEST = [TESTS_C / name for name in ("test_gpu_loader.c", "test_nccl_transport.c", "gpu_test.c",
                                            "check.c")]
GPU_SOURCES = [ROOT / "csrc" / "gpu.c", ROOT / "csrc" / "nccl.c"]
# the test-only extension: exchange's argument checks, from the binding's own files
NCCL_ARGS_SOURCES = [TESTS_C / "nccl_args_module.c", ROOT / "csrc" / "_convert.c",
                     ROOT / "csrc" / "_nccl_type.c", *GPU_SOURCES]
WERROR = ["-Werror"]  # on top of setup.py's flags
ARG_ERRORS = (TypeError, ValueError, OverflowError)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NCCL_USABLE = _core.transports()["nccl"]
needs_no_nccl = pytest.mark.skipif(NCCL_USABLE, reason="NCCL is usable here: the CPU-only behaviour does not apply")
INT64_MAX = 2**63 - 1


def raises_naming(exc_types, name, fn, *args, **kwargs):
    with pytest.raises(exc_types) as info:
        fn(*args, **kwargs)
    assert name in str(info.value), f"{info.value!r} does not name {name!r}"
    return info.value


# ------------------------------------------------------------ what is usable

def test_transports_report():
    got = _core.transports()
    assert set(got) == {"emulate", "shm", "nccl"}
    assert all(isinstance(v, bool) for v in got.values())
    assert got["emulate"] is True
    assert got["shm"] is Path("/dev/shm").is_dir()
    assert _core.transports() == got  # loading happens once; same answer
    avail = transport.available()
    assert set(avail) == set(got) and avail["shm"] == got["shm"]
    if not torch.cuda.is_available():
        assert avail["nccl"] is False


@needs_no_nccl
def test_gpu_status_says_why_not():
    text = _core.gpu_status()
    assert text.startswith("NCCL transport unavailable: "), text
    reasons = ("library not found", "cannot be opened", "lacks required symbol", "no usable CUDA device",
               "no CUDA device visible")
    assert any(r in text for r in reasons), text
    assert transport.gpu_status() == text


@needs_no_nccl
def test_nccl_requests_raise_clear_errors():
    why = _core.gpu_status()
    with pytest.raises(_core.AsyncDiffError) as info:
        _core.NcclTransport(bytes(128), 1, 0, 0, 1.0)
    assert info.value.status == "unsupported"
    assert why.startswith(str(info.value)[:400])  # the same text (the exception's at most 511 bytes)
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(_core.AsyncDiffError) as info:
        _core.nccl_unique_id()
    assert info.value.status == "unsupported"


@needs_no_nccl
def test_open_transport_nccl_fails_before_any_rendezvous(monkeypatch):
    # no MASTER_ADDR / MASTER_PORT: reaching the store would fail differently (or hang)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"transport: 'nccl' is not usable here"):
        transport.open_transport("nccl", None, device="cuda:0")  # no board needed to refuse
    with pytest.raises(ValueError, match="transport"):
        transport.open_transport("pigeon", None)


@pytest.fixture(scope="module")
def sd15():
    return tiny.build_pipeline("sd15", seed=0)


@needs_no_nccl
@pytest.mark.parametrize("torchrun", [False, True])
def test_asyncdiff_nccl_on_cpu_pipeline(sd15, monkeypatch, torchrun):
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    if torchrun:  # as a torchrun rank: must fail at once, not wait for peers
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "1")
    forward = sd15.unet.forward
    with pytest.raises(ValueError) as info:
        AsyncDiff(sd15, model_n=2, transport="nccl")
    text = str(info.value)
    assert text.startswith("transport: 'nccl' is not usable here"), text
    assert "NCCL transport unavailable" in text or "no CUDA device" in text, text
    assert sd15.unet.forward == forward  # nothing was attached


def test_asyncdiff_auto_stays_emulation_without_torchrun(sd15, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ad = AsyncDiff(sd15, model_n=2)
    try:
        assert ad.mode == "emulate"
    finally:
        ad.remove()


@pytest.mark.parametrize("gpus, version, opt_in, expect", [
    (["h/a", "h/b"], (2, 27, 7), None, None),
    (["h/a", "h/a"], (2, 27, 7), "1", "NCCL 2.27.7 never allows that"),
    (["h/a", "h/b", "h/a"], (2, 32, 6), None, "ranks 0 and 2 are on the same GPU (h/a); NCCL 2.32.6 refuses that "
                                               "unless NCCL_MULTI_RANK_GPU_ENABLE=1 (experimental; it is unset)"),
    (["h/a", "h/a"], (2, 30, 0), "0", "(experimental; it is '0')"),
    (["h/a", "h/a"], (2, 30, 0), "1", None),
])
def test_two_ranks_on_one_gpu_rule(gpus, version, opt_in, expect):
    from asyncdiff.transport.nccl import shared_gpu_problem
    got = shared_gpu_problem(gpus, version, opt_in)
    assert got == expect if expect is None else (expect in got and "transport='shm'" in got), got


def test_check_transport_rules():
    transport.check_transport("shm", torch.device("cpu"))  # nothing to say
    if not transport.available()["nccl"]:
        raises_naming(ValueError, "transport", transport.check_transport, "nccl", torch.device("cuda", 0))
    raises_naming(ValueError, "transport", transport.check_transport, "nccl", torch.device("cpu"))


# --------------------------------------------------- NcclTransport arguments

VALID = dict(unique_id=bytes(128), world_size=2, rank=1, device=0, timeout=1.0)


def construct(**changes):
    kw = {**VALID, **changes}
    return _core.NcclTransport(kw["unique_id"], kw["world_size"], kw["rank"], kw["device"], kw["timeout"])


@pytest.mark.parametrize("uid", ["x" * 128, 128, None, [0] * 128, 1.5, object()])
def test_unique_id_wrong_type(uid):
    raises_naming(TypeError, "unique_id", construct, unique_id=uid)


@pytest.mark.parametrize("n", [0, 1, 127, 129, 256])
def test_unique_id_wrong_size(n):
    raises_naming(ValueError, "unique_id", construct, unique_id=bytes(n))


@pytest.mark.parametrize("name", ["world_size", "rank", "device"])
@pytest.mark.parametrize("value", [1.0, "1", None, True, False, np.bool_(True), [1], 1j])
def test_int_arguments_wrong_type(name, value):
    raises_naming(TypeError, name, construct, **{name: value})


@pytest.mark.parametrize("changes, name", [
    (dict(world_size=0), "world_size"), (dict(world_size=-3), "world_size"),
    (dict(world_size=2**31), "world_size"), (dict(world_size=2**80), "world_size"),
    (dict(world_size=65537, rank=0), "world_size"),
    (dict(rank=2), "rank"), (dict(rank=-1), "rank"), (dict(rank=2**70), "rank"),
    (dict(device=-1), "device"), (dict(device=-(2**40)), "device"),
    (dict(timeout=-1.0), "timeout"), (dict(timeout=float("nan")), "timeout"),
    (dict(timeout=float("inf")), "timeout"),
])
def test_bad_values_named(changes, name):
    raises_naming(ValueError, name, construct, **changes)


@pytest.mark.parametrize("timeout", ["1", None, True, [1.0]])
def test_timeout_wrong_type(timeout):
    raises_naming(TypeError, "timeout", construct, timeout=timeout)


@needs_no_nccl
def test_bytes_like_unique_ids_accepted_up_to_loading():
    for uid in (bytes(128), bytearray(128), memoryview(bytes(128)), np.zeros(128, np.uint8)):
        try:
            construct(unique_id=uid, world_size=1, rank=0)
        except _core.AsyncDiffError as exc:  # no NCCL here: the first thing that fails is the library
            assert exc.status in ("unsupported", "external_error", "timeout"), exc
        except TimeoutError:
            pass


@needs_no_nccl  # with NCCL, valid arguments would really try to connect
@SETTINGS
@given(world=st.integers(-(2**64), 2**64), rank=st.integers(-(2**64), 2**64),
       device=st.integers(-(2**64), 2**64))
def test_constructor_ranges_fuzz(world, rank, device):
    valid = 1 <= world <= 65536 and 0 <= rank < world and device >= 0 and device < 2**31
    try:
        construct(world_size=world, rank=rank, device=device)
    except ARG_ERRORS as exc:
        assert not valid, f"valid arguments refused: {exc!r}"
        assert any(n in str(exc) for n in ("world_size", "rank", "device")), exc
    except (_core.AsyncDiffError, TimeoutError) as exc:
        assert valid, f"invalid arguments reached the library: {exc!r}"
    else:
        pytest.fail("NcclTransport was created from a zero unique id")


# ------------------------------------------------------ exchange arguments

@pytest.fixture(scope="module")
def nccl_args(tmp_path_factory):
    """_nccl_args.check_exchange(world_size, sends, recvs, stream, timeout):
    what NcclTransport.exchange checks before any GPU call."""
    out = tmp_path_factory.mktemp("nccl_args")
    path = build_extension(compiler(), "_nccl_args", NCCL_ARGS_SOURCES, out, extra=WERROR)
    spec = importlib.util.spec_from_file_location("_nccl_args", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def check(nccl_args):
    def check(world, sends, recvs, stream=0, timeout=1.0):
        return nccl_args.check_exchange(world, sends, recvs, stream, timeout)
    return check


def test_test_entry_point_is_not_shipped():
    assert not hasattr(_core, "_nccl_check_exchange")
    assert sorted(n for n in dir(_core) if n.startswith("_") and not n.startswith("__")) == []


def test_check_exchange_accepts_good_items(check):
    assert check(2, [(1, 4096, 16)], [(1, 8192, 16), (0, 1, 1)]) is None
    assert check(1, [], []) is None
    assert check(1, (), ((0, 1, 1),), stream=2**40, timeout=0) is None
    assert check(3, [(np.int64(2), np.uint64(10), np.int32(5))], []) is None


@pytest.mark.parametrize("which", ["sends", "recvs"])
@pytest.mark.parametrize("items, exc", [
    ("abc", TypeError), (b"abc", TypeError), (None, TypeError), (5, TypeError), ({1: 2}, TypeError),
    ([(1, 2)], TypeError), ([(1, 2, 3, 4)], TypeError), ([[1, 2, 3]], TypeError), ([None], TypeError),
    ([(1.0, 2, 3)], TypeError), ([(1, 2.0, 3)], TypeError), ([(1, 2, 3.0)], TypeError),
    ([(True, 2, 3)], TypeError), ([(1, "2", 3)], TypeError), ([(1, None, 3)], TypeError),
    ([(1, -2, 3)], ValueError), ([(1, 2, -3)], ValueError), ([(1, 2**64, 3)], ValueError),
    ([(1, 2, 2**64)], ValueError), ([(2**40, 2, 3)], ValueError),
    ([(2, 8, 8)], ValueError), ([(-1, 8, 8)], ValueError),
    ([(1, 0, 8)], ValueError), ([(1, 8, 0)], ValueError),
])
def test_check_exchange_bad_items(check, which, items, exc):
    good = [(1, 64, 64)]
    kwargs = {"sends": good, "recvs": good, which: items}
    raises_naming(exc, which, check, 2, kwargs["sends"], kwargs["recvs"])


@pytest.mark.parametrize("stream, exc", [(-1, ValueError), (1.0, TypeError), ("0", TypeError), (None, TypeError),
                                         (True, TypeError), (2**64, ValueError)])
def test_check_exchange_bad_stream(check, stream, exc):
    raises_naming(exc, "stream", check, 2, [], [], stream=stream)


@pytest.mark.parametrize("timeout, exc", [(-0.5, ValueError), (float("nan"), ValueError), ("1", TypeError)])
def test_check_exchange_bad_timeout(check, timeout, exc):
    raises_naming(exc, "timeout", check, 2, [], [], timeout=timeout)


def test_check_exchange_wrong_arity_and_world(check, nccl_args):
    with pytest.raises(TypeError):
        nccl_args.check_exchange(2, [], [], 0)
    with pytest.raises(TypeError):
        nccl_args.check_exchange(2, [], [], 0, timeout=1.0)  # positional only, like exchange
    raises_naming(ValueError, "world_size", check, 0, [], [])
    raises_naming(TypeError, "world_size", check, 2.0, [], [])


ints = st.one_of(st.integers(-(2**65), 2**65), st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, 2**64 - 1]))
items = st.lists(st.tuples(st.integers(-3, 5), ints, ints), max_size=6)


@SETTINGS
@given(world=st.integers(1, 4), sends=items, recvs=items)
def test_check_exchange_fuzz_matches_reference(check, world, sends, recvs):
    """The C check agrees with the rule written out in Python."""
    def ok(item):
        peer, ptr, nbytes = item
        return 0 <= peer < world and 1 <= ptr <= INT64_MAX and 1 <= nbytes <= INT64_MAX

    expected = all(map(ok, sends)) and all(map(ok, recvs))
    try:
        check(world, sends, recvs)
    except ARG_ERRORS as exc:
        assert not expected, f"good items refused: {exc!r}"
        assert "sends" in str(exc) or "recvs" in str(exc), exc
    else:
        assert expected, "bad items accepted"


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    """The stand-in CUDA runtime and NCCL (sonames libcudart.so.12 / libnccl.so.2)."""
    cc = compiler()
    out = tmp_path_factory.mktemp("fakes")
    cudart, nccl = out / "libfakecudart.so", out / "libfakenccl.so"
    build(cc, [FAKE_CUDART], cudart, extra=[*WERROR, "-shared", "-fPIC", "-Wl,-soname,libcudart.so.12"])
    build(cc, [FAKE_NCCL], nccl, extra=[*WERROR, "-shared", "-fPIC", "-Wl,-soname,libnccl.so.2"], libs=["-ldl"])
    return cudart, nccl


def _run_loader_test(exe, fakes, env=None):
    ran = subprocess.run([str(exe), str(fakes[0]), str(fakes[1])], capture_output=True, text=True,
                         timeout=300, env={**os.environ, **(env or {})})
    report = f"stdout:\n{ran.stdout}\nstderr:\n{ran.stderr}"
    assert ran.returncode == 0, report
    last = ran.stdout.strip().splitlines()[-1]
    assert last.endswith(" passed, 0 failed") and int(last.split()[0]) >= 15, report
    return ran, report


def test_loader_and_transport_c_program(tmp_path, fakes):
    cc = compiler()
    exe = tmp_path / "test_gpu_loader"
    build(cc, [*LOADER_TEST, *GPU_SOURCES], exe, extra=[*WERROR, "-g"], libs=["-ldl", "-pthread"])
    _run_loader_test(exe, fakes)


def test_loader_and_transport_under_sanitizers(tmp_path, fakes):
    cc = compiler()
    require_sanitizers(cc, tmp_path)
    exe = tmp_path / "test_gpu_loader_asan"
    build(cc, [*LOADER_TEST, *GPU_SOURCES], exe, extra=[*WERROR, *SANITIZE_FLAGS], libs=["-ldl", "-pthread"])
    ran, report = _run_loader_test(exe, fakes, SANITIZE_ENV)
    assert not sanitizer_report(ran.stderr, ran.stdout), report


# ------------------------------------- the binding against the stand-ins

BINDING_CASES = Path(__file__).resolve().parent / "nccl_binding_cases.py"


@pytest.mark.parametrize("case, env", [
    ("roundtrip", {"FAKE_NCCL_INIT_POLLS": "2", "FAKE_NCCL_GROUP_POLLS": "2", "FAKE_CUDA_EVENT_POLLS": "3"}),
    ("timeout", {"FAKE_NCCL_GROUP_HANG": "1"}),
    ("peer_gone", {"FAKE_NCCL_ASYNC_ERROR": "6"}),
    ("init_timeout", {"FAKE_NCCL_INIT_HANG": "1"}),
    ("nccl_timeout", {"FAKE_NCCL_ASYNC_ERROR": "8", "FAKE_NCCL_GROUP_POLLS": "1"}),
    ("shared_gpu", {"FAKE_NCCL_INIT_ERROR": "5", "FAKE_NCCL_VERSION": "23200"}),
])
@pytest.mark.skipif(torch.version.cuda is not None,
                    reason="a CUDA build of torch loads the real NCCL, which the loader then prefers to the stand-ins")
def test_binding_against_stand_in_libraries(fakes, tmp_path, case, env):
    script = BINDING_CASES
    full_env = {**os.environ, "ASYNCDIFF_CUDART_LIBRARY": str(fakes[0]), "ASYNCDIFF_NCCL_LIBRARY": str(fakes[1]),
                **env}
    ran = subprocess.run([sys.executable, str(script), case], capture_output=True, text=True, timeout=300,
                         env=full_env, cwd=tmp_path)
    assert ran.returncode == 0 and f"binding ok {case}" in ran.stdout, f"{ran.stdout}\n{ran.stderr}"
