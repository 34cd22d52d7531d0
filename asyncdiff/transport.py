"""The Python side of the transports: tensors in, bytes moved by the C core.

``open_transport(kind, rank, world, instance, timeout, device=None)``
rendezvouses the ranks through the launch store and returns an object with
``reserve(nbytes)`` (collective), ``exchange(seq, sends, recvs)`` and
``close(failed)``; every wait happens in C with the GIL released.  Emulation
needs no transport at all (one process holds every rank's outputs).

Kinds:

* ``"shm"`` -- POSIX shared memory between the processes of one host
  (``csrc/shm.c``).  CPU tensors are copied straight in and out; CUDA tensors
  are staged through page-locked host buffers, so several processes sharing
  one GPU can run the multi-process path.
* ``"nccl"`` -- NCCL point-to-point between GPUs, on this host or several
  (``csrc/nccl.c``): device to device, on a stream of its own, ordered with
  the compute stream by CUDA events (no host sync).
* ``"auto"`` -- collective choice: NCCL when every rank's denoiser is on its
  own CUDA device and NCCL loads on every rank, else shared memory.

Bytes are moved as they are: fp16/bf16 stay fp16/bf16.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import weakref

import torch

from . import _core, launch

KINDS = ("auto", "shm", "nccl")


def available() -> dict:
    """Which transports can be used in this process, e.g.
    ``{"emulate": True, "shm": True, "nccl": False}``; ``gpu_status()`` says
    why NCCL is or is not usable."""
    got = dict(_core.transports())
    got["nccl"] = bool(got.get("nccl")) and torch.cuda.is_available()
    return got


def gpu_status() -> str:
    """What the C core found of NCCL and the CUDA runtime, or what is missing."""
    return _core.gpu_status()


def check_transport(kind: str, device) -> None:
    """Raise a ValueError naming ``transport`` when ``kind`` cannot serve a
    denoiser on ``device`` in this process (checked before any rendezvous)."""
    if kind != "nccl":
        return
    if not available()["nccl"]:
        why = gpu_status() if torch.cuda.is_available() else \
            f"torch {torch.__version__} sees no CUDA device; {gpu_status()}"
        raise ValueError(f"transport: 'nccl' is not usable here: {why}")
    if device is None or torch.device(device).type != "cuda":
        raise ValueError(
            f"transport: 'nccl' moves CUDA tensors, but the denoiser is on {device}; move the "
            "pipeline to this rank's GPU (pipe.to(f'cuda:{LOCAL_RANK}')) or use transport='shm'"
        )


def _u8(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor as a flat uint8 tensor (same memory)."""
    if not t.is_contiguous():
        raise ValueError("transport: tensors must be contiguous")
    return t.reshape(-1).view(torch.uint8)


def _bytes(t: torch.Tensor):
    """A writable uint8 NumPy view of a contiguous CPU tensor's memory."""
    return _u8(t).numpy()


def _host_bytes(t: torch.Tensor):
    """The NumPy byte view shared memory reads or fills for a tensor that is
    not staged: a CPU tensor's own memory, or nothing for an empty one."""
    return _bytes(t) if not t.is_cuda else _bytes(torch.empty(0, dtype=torch.uint8))


def _rendezvous(instance: int, timeout: float):
    """The torchrun environment and a store private to this AsyncDiff instance."""
    rv = launch.from_env()
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return rv, launch.store(rv, f"asyncdiff/{restart}/{instance}/", timeout)


class _PinnedPool:
    """Page-locked host buffers for staging CUDA tensors, reused by size.

    Buffers handed out during one exchange stay busy until the next one
    begins: by then the host-to-device copies that read them have been
    waited for (``settle``)."""

    def __init__(self):
        self._free: dict[int, list] = {}
        self._busy: list = []
        self._events: list = []

    def take(self, nbytes: int) -> torch.Tensor:
        bucket = self._free.get(nbytes)
        buf = bucket.pop() if bucket else torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self._busy.append(buf)
        return buf

    def after_uploads(self, devices):
        """Remember where copies out of the busy buffers were queued."""
        for dev in devices:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(dev))
            self._events.append(ev)

    def settle(self):
        for ev in self._events:
            ev.synchronize()
        self._events.clear()
        for buf in self._busy:
            self._free.setdefault(buf.numel(), []).append(buf)
        self._busy.clear()

    def clear(self):
        self.settle()
        self._free.clear()


class ShmTransport:
    """Shared memory between the processes of one host (``csrc/shm.c``)."""

    kind = "shm"

    def __init__(self, rank: int, world: int, instance: int, timeout: float, store=None):
        rv = launch.from_env()
        if rv.local_world_size != rv.world_size:
            raise ValueError(
                f"transport: 'shm' needs every rank on one host, but LOCAL_WORLD_SIZE={rv.local_world_size} "
                f"and WORLD_SIZE={rv.world_size}"
            )
        self.rank, self.world, self.timeout = rank, world, timeout
        if store is None:
            _, store = _rendezvous(instance, timeout)
        if rank == 0:
            name = f"/asyncdiff-{os.getpid()}-{secrets.token_hex(6)}"
            self._handle = _core.ShmTransport(name, world, rank, True, timeout)
            store.set("shm_name", name)
        else:
            name = store.get("shm_name").decode()
            self._handle = _core.ShmTransport(name, world, rank, False, timeout)
        try:
            self._handle.barrier(timeout)  # everyone has mapped the control segment
        finally:
            if rank == 0:
                _core.shm_unlink(name)  # from now on nothing is left in /dev/shm, whatever happens
        self._pinned: _PinnedPool | None = None  # made on the first CUDA tensor
        self._finalizer = weakref.finalize(self, _core.ShmTransport.detach, self._handle, False)

    def reserve(self, nbytes: int):
        """Collective: room for ``nbytes`` of slots (all ranks pass the same)."""
        self._handle.reserve(nbytes, self.timeout)

    def _pool(self) -> _PinnedPool:
        if self._pinned is None:
            self._pinned = _PinnedPool()
        return self._pinned

    def exchange(self, seq: int, sends, recvs):
        """One event.  ``sends``: (destination ranks, offset, tensor);
        ``recvs``: (source rank, offset, tensor to fill).  Each sent slot is
        written once into shared memory, whatever the number of readers.
        CUDA tensors go through pinned host buffers: device-to-host copies
        before the publish (waited for), host-to-device copies after the
        fetch (queued on the current stream, waited for at the next event
        before their buffers are reused)."""
        if self._pinned is not None:
            self._pinned.settle()
        items, downloads = [], set()
        for _dsts, off, t in sends:
            if t.is_cuda and t.nbytes:
                buf = self._pool().take(t.nbytes)
                buf.copy_(_u8(t), non_blocking=True)
                downloads.add(t.device)
                items.append((off, buf.numpy()))
            else:
                items.append((off, _host_bytes(t)))
        for dev in downloads:
            torch.cuda.current_stream(dev).synchronize()
        self._handle.publish(seq, items, self.timeout)
        by_src: dict[int, list] = {}
        uploads = []
        for src, off, t in recvs:
            if t.is_cuda and t.nbytes:
                buf = self._pool().take(t.nbytes)
                uploads.append((t, buf))
                target = buf.numpy()
            else:
                target = _host_bytes(t)
            by_src.setdefault(src, []).append((off, target))
        for src in sorted(by_src):
            self._handle.fetch(seq, src, by_src[src], self.timeout)
        self._handle.ack(seq)
        if uploads:
            for t, buf in uploads:
                _u8(t).copy_(buf, non_blocking=True)
            self._pinned.after_uploads({t.device for t, _ in uploads})

    def barrier(self):
        self._handle.barrier(self.timeout)

    def close(self, failed: bool = False):
        if self._finalizer.detach() is not None:
            self._handle.detach(failed)
            if self._pinned is not None and not failed:
                self._pinned.clear()
            self._pinned = None


def _cuda_device(device) -> torch.device:
    """The CUDA device a rank's NCCL communicator lives on: the denoiser's, or
    cuda:LOCAL_RANK when none is given."""
    if device is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))))
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"transport: 'nccl' needs a CUDA device, got {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class NcclTransport:
    """NCCL point-to-point between the GPUs of one or several hosts
    (``csrc/nccl.c``).  Rank 0 makes the NCCL unique id and puts its 128
    bytes in the launch store; every rank (``RANK`` of ``WORLD_SIZE``) joins
    with it on its own device."""

    kind = "nccl"

    def __init__(self, rank: int, world: int, instance: int, timeout: float, device=None, store=None):
        self.rank, self.world, self.timeout = rank, world, timeout
        self.device = _cuda_device(device)
        check_transport("nccl", self.device)
        if store is None:
            _, store = _rendezvous(instance, timeout)
        if rank == 0:
            uid = _core.nccl_unique_id()
            store.set("nccl_id", uid)
        else:
            uid = store.get("nccl_id")
        self._handle = _core.NcclTransport(bytes(uid), world, rank, self.device.index, timeout)
        # Tensors of the last exchange: kept alive until the next exchange has
        # confirmed (in C) that the GPU is done with them.
        self._inflight: list = []
        self._finalizer = weakref.finalize(self, _core.NcclTransport.close, self._handle, True)

    def reserve(self, nbytes: int):
        """Nothing to do: NCCL reads and writes the tensors themselves."""

    def _checked(self, t: torch.Tensor) -> torch.Tensor:
        if t.device != self.device:
            raise ValueError(f"transport: the NCCL transport of this rank moves tensors on {self.device}, "
                             f"got one on {t.device}")
        _u8(t)  # contiguity
        return t

    def exchange(self, seq: int, sends, recvs):
        """One event (``seq`` is implied by the order of calls).  Each send
        goes to each of its destinations; items to one peer are paired with
        that peer's items by slot offset, which is the same on every rank.
        Empty tensors are skipped on both sides."""
        out = sorted(((dst, off, self._checked(t)) for dsts, off, t in sends if t.nbytes for dst in dsts),
                     key=lambda item: (item[0], item[1]))
        ins = sorted(((src, off, self._checked(t)) for src, off, t in recvs if t.nbytes),
                     key=lambda item: (item[0], item[1]))
        stream = torch.cuda.current_stream(self.device)
        self._handle.exchange([(peer, t.data_ptr(), t.nbytes) for peer, _, t in out],
                              [(peer, t.data_ptr(), t.nbytes) for peer, _, t in ins],
                              stream.cuda_stream, self.timeout)
        self._inflight = [t for _, _, t in out] + [t for _, _, t in ins]

    def wait(self):
        """Block until every exchange queued so far has finished on the GPU."""
        self._handle.wait(self.timeout)

    def close(self, failed: bool = False):
        if self._finalizer.detach() is not None:
            self._handle.close(bool(failed))
            self._inflight = []


def _choose(rank: int, world: int, rv, store, device) -> str:
    """Collective choice for ``"auto"``: every rank states what it can do,
    then all pick the same transport from the same statements."""
    host = socket.gethostname()
    mine = {"host": host, "nccl": False, "gpu": None, "why": ""}
    if device is not None and torch.device(device).type == "cuda":
        try:
            check_transport("nccl", device)
            dev = _cuda_device(device)
            uuid = getattr(torch.cuda.get_device_properties(dev), "uuid", None)
            mine.update(nccl=True, gpu=f"{host}/{uuid if uuid is not None else dev}")
        except ValueError as exc:
            mine["why"] = str(exc)
    else:
        mine["why"] = f"denoiser on {device}"
    store.set(f"auto/{rank}", json.dumps(mine))
    votes = [json.loads(store.get(f"auto/{r}")) for r in range(world)]
    gpus = [v["gpu"] for v in votes]
    if all(v["nccl"] for v in votes) and len(set(gpus)) == world:
        return "nccl"
    if len({v["host"] for v in votes}) == 1 and rv.local_world_size == rv.world_size:
        return "shm"
    reasons = "; ".join(f"rank {r}: {v['why'] or 'shares its GPU with another rank'}"
                        for r, v in enumerate(votes) if not v["nccl"] or gpus.count(v["gpu"]) > 1)
    raise ValueError(f"transport: the ranks span several hosts, so shared memory cannot be used, and NCCL "
                     f"is not usable on every rank ({reasons})")


def open_transport(kind: str, rank: int, world: int, instance: int, timeout: float, device=None):
    """Rendezvous and open a transport of ``kind`` (``"auto"``, ``"shm"`` or
    ``"nccl"``) for rank ``rank`` of ``world``; ``device`` is where the
    denoiser's tensors live."""
    if kind not in KINDS:
        raise ValueError(f"transport: unknown transport {kind!r} (expected one of {', '.join(KINDS)})")
    if kind == "nccl":
        check_transport("nccl", device if device is not None else _cuda_device(None))
    rv, store = _rendezvous(instance, timeout)
    if kind == "auto":
        kind = _choose(rank, world, rv, store, device)
    if kind == "shm":
        return ShmTransport(rank, world, instance, timeout, store=store)
    return NcclTransport(rank, world, instance, timeout, device=device, store=store)
