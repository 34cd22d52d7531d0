"""Run by tests/test_nccl.py in a subprocess whose ASYNCDIFF_CUDART_LIBRARY /
ASYNCDIFF_NCCL_LIBRARY point at the stand-in libraries (csrc/tests/fake_*.c):
the binding asyncdiff._core.NcclTransport end to end, one case per run
(``python nccl_binding_cases.py CASE``), printing "binding ok CASE"."""

import os, sys, threading
import numpy as np
import torch
from asyncdiff import _core

case = sys.argv[1]
assert _core.transports()["nccl"] is True, _core.gpu_status()
status = _core.gpu_status()
assert "libfakenccl" in status and "(ASYNCDIFF_NCCL_LIBRARY)" in status, status
uid = _core.nccl_unique_id()
assert isinstance(uid, bytes) and len(uid) == _core.NCCL_UNIQUE_ID_BYTES == 128 and uid[:4] == b"FAKE"

def ptr(a):
    return a.ctypes.data if isinstance(a, np.ndarray) else a.data_ptr()

if case == "roundtrip":
    t = _core.NcclTransport(uid, 1, 0, 0, 5.0)
    assert (t.world_size, t.rank, t.device, t.blocking, t.failed, t.closed) == (1, 0, 0, False, False, False)
    assert isinstance(t.stream, int) and t.stream != 0
    rng = np.random.default_rng(0)
    for n in (1, 1000, 1 << 20):
        a = rng.integers(0, 256, n, dtype=np.uint8)
        b = np.zeros(n, np.uint8)
        t.exchange([(0, ptr(a), a.nbytes)], [(0, ptr(b), b.nbytes)], 0, 5.0)
        assert np.array_equal(a, b)
    # half precision travels as bytes: no upcast, bit for bit (NaN payloads too)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(333).to(dtype)
        x[7] = float("nan")
        y = torch.zeros_like(x)
        t.exchange([(0, ptr(x), x.numel() * x.element_size())], [(0, ptr(y), y.numel() * y.element_size())],
                   0, 5.0)
        assert torch.equal(x.view(torch.int16), y.view(torch.int16))
    # several items to one peer pair in list order
    parts = [np.full(k + 1, k, np.uint8) for k in range(5)]
    outs = [np.zeros(k + 1, np.uint8) for k in range(5)]
    t.exchange([(0, ptr(p), p.nbytes) for p in parts], [(0, ptr(o), o.nbytes) for o in outs], 0, 5.0)
    assert all(np.array_equal(p, o) for p, o in zip(parts, outs))
    t.exchange([], [], 0, 5.0)
    t.wait(5.0)
    # bad arguments on the real method: refused, the handle stays usable
    a = np.zeros(8, np.uint8)
    for sends, recvs, stream, name in [([(1, ptr(a), 8)], [], 0, "sends"), ([], [(0, ptr(a), 0)], 0, "recvs"),
                                       ([], [(0, 0, 8)], 0, "recvs"), ([], [], -1, "stream"),
                                       ([(0, ptr(a))], [], 0, "sends")]:
        try:
            t.exchange(sends, recvs, stream, 5.0)
        except (TypeError, ValueError) as exc:
            assert name in str(exc), exc
        else:
            raise AssertionError("accepted")
    for args, kwargs in (((), {}), ((1,), {}), (([], [], 0), {"timeout": 1.0})):
        try:
            t.exchange(*args, **kwargs)
        except TypeError:
            pass
        else:
            raise AssertionError("accepted")
    assert not t.failed
    t.exchange([(0, ptr(a), 8)], [(0, ptr(a), 8)], 0, 5.0)
    t.close(False)
    assert t.closed and t.world_size == 0 and t.stream == 0
    t.close(False)  # twice is fine
    for call in (lambda: t.exchange([], [], 0, 1.0), lambda: t.wait(1.0)):
        try:
            call()
        except ValueError as exc:
            assert "closed" in str(exc)
        else:
            raise AssertionError("closed transport used")
    # a communicator left open is aborted when collected
    u = _core.NcclTransport(uid, 1, 0, 0, 5.0)
    del u
    # a wrong device, a corrupted id
    try:
        _core.NcclTransport(uid, 1, 0, 5, 5.0)
    except ValueError as exc:
        assert "device" in str(exc), exc
    else:
        raise AssertionError("device 5 accepted")
    try:
        _core.NcclTransport(bytes(128), 1, 0, 0, 5.0)
    except _core.AsyncDiffError as exc:
        assert exc.status == "external_error" and "ncclCommInitRankConfig" in str(exc), exc
    else:
        raise AssertionError("bad id accepted")
    # GIL released while waiting: another thread runs meanwhile
    os.environ["FAKE_CUDA_EVENT_POLLS"] = "600"  # a few hundred ms of polling
    t = _core.NcclTransport(uid, 1, 0, 0, 30.0)
    t.exchange([(0, ptr(a), 8)], [(0, ptr(a), 8)], 0, 30.0)
    ticks = []
    stop = threading.Event()
    def tick():
        while not stop.is_set():
            ticks.append(1)
            stop.wait(0.001)
    th = threading.Thread(target=tick)
    th.start()
    t.wait(30.0)
    stop.set()
    th.join()
    assert len(ticks) > 3, len(ticks)
    t.close(False)
elif case == "timeout":
    t = _core.NcclTransport(uid, 1, 0, 0, 5.0)
    a = np.zeros(64, np.uint8)
    try:
        t.exchange([(0, ptr(a), 64)], [(0, ptr(a), 64)], 0, 0.2)
    except TimeoutError as exc:
        assert exc.status == "timeout" and "ncclGroupEnd" in str(exc), exc
    else:
        raise AssertionError("no timeout")
    assert t.failed
    try:
        t.exchange([(0, ptr(a), 64)], [(0, ptr(a), 64)], 0, 0.2)
    except _core.AsyncDiffError as exc:
        assert exc.status == "bad_state", exc
    else:
        raise AssertionError("aborted transport used")
    t.close(False)
elif case == "peer_gone":
    t = _core.NcclTransport(uid, 1, 0, 0, 5.0)
    a = np.zeros(64, np.uint8)
    try:
        t.exchange([(0, ptr(a), 64)], [(0, ptr(a), 64)], 0, 5.0)
    except _core.AsyncDiffError as exc:
        assert exc.status == "peer_gone" and "remote" in str(exc), exc
    else:
        raise AssertionError("no error")
    t.close(True)
elif case == "init_timeout":
    try:
        _core.NcclTransport(uid, 2, 0, 0, 0.3)
    except TimeoutError as exc:
        assert "within the timeout" in str(exc), exc
    else:
        raise AssertionError("no timeout")
print("binding ok", case)
