"""Shared memory between the processes of one host (``csrc/shm.c``; docs/design.md §5.1).

CPU tensors are copied straight in and out of the shared segment; CUDA
tensors are staged through page-locked host buffers, so several processes
sharing one GPU can run the multi-process path.
"""

from __future__ import annotations

import os
import secrets
import time
import weakref

import torch

from .. import _core, launch


def u8(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor as a flat uint8 tensor (same memory)."""
    if not t.is_contiguous():
        raise ValueError("transport: tensors must be contiguous")
    return t.reshape(-1).view(torch.uint8)


def _bytes(t: torch.Tensor):
    """A writable uint8 NumPy view of a contiguous CPU tensor's memory."""
    return u8(t).numpy()


def _host_bytes(t: torch.Tensor):
    """The NumPy byte view shared memory reads or fills for a tensor that is
    not staged: a CPU tensor's own memory, or nothing for an empty one."""
    return _bytes(t) if not t.is_cuda else _bytes(torch.empty(0, dtype=torch.uint8))


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

    def __init__(self, rank: int, world: int, timeout: float, store):
        rv = launch.from_env()
        if rv.local_world_size != rv.world_size:
            raise ValueError(
                f"transport: 'shm' needs every rank on one host, but LOCAL_WORLD_SIZE={rv.local_world_size} "
                f"and WORLD_SIZE={rv.world_size}"
            )
        self.rank, self.world, self.timeout = rank, world, timeout
        if rank == 0:
            name = f"/asyncdiff-{os.getpid()}-{secrets.token_hex(6)}"
            self._handle = _core.ShmTransport(name, world, rank, True, timeout)
            store.set("shm_name", name)
        else:
            name = store.get("shm_name").decode()
            self._handle = _core.ShmTransport(name, world, rank, False, timeout)
        try:
            self._handle.barrier(timeout)  # everyone has mapped the control segment
        except BaseException:
            # whoever is left removes the name: its creator may have been killed
            _core.shm_unlink(name)
            self._handle.detach(True)
            raise
        if rank == 0:
            _core.shm_unlink(name)  # from now on nothing is left in /dev/shm, whatever happens
        self._pinned: _PinnedPool | None = None  # made on the first CUDA tensor
        self.last: dict = {}  # seconds in the last exchange's halves (AsyncDiff.stats)
        self._finalizer = weakref.finalize(self, _core.ShmTransport.detach, self._handle, False)

    def busy(self, flag: bool) -> None:
        """Whether this rank is running a denoiser call: while it is, its
        heartbeat tells the peers waiting for it to keep waiting (``timeout``
        bounds silence; docs/design.md §5.1)."""
        self._handle.busy(flag)

    def fail(self, message: str) -> None:
        """Mark this rank failed with ``message``: every peer's wait ends with it."""
        self._handle.fail(message)

    def allgather(self, record: bytes) -> list:
        """Every rank's ``record`` (at most 256 bytes), in rank order."""
        return self._handle.allgather(record, self.timeout)

    def reserve(self, nbytes: int):
        """Collective: room for ``nbytes`` of slots (all ranks pass the same)."""
        self._handle.reserve(nbytes, self.timeout)

    def _pool(self) -> _PinnedPool:
        if self._pinned is None:
            self._pinned = _PinnedPool()
        return self._pinned

    def exchange(self, seq: int, sends, recvs, tag: int = 0):
        """One event.  ``sends``: (destination ranks, offset, tensor);
        ``recvs``: (source rank, offset, tensor to fill); ``tag``: the event's
        identity ((pipeline call << 32) | denoiser call), which every receiver
        checks against its own.  Each sent slot is
        written once into shared memory, whatever the number of readers.
        CUDA tensors go through pinned host buffers: device-to-host copies
        before the publish (waited for), host-to-device copies after the
        fetch (queued on the current stream, waited for at the next event
        before their buffers are reused)."""
        t0 = time.perf_counter()
        if self._pinned is not None:
            self._pinned.settle()
        items, downloads = [], set()
        for _dsts, off, t in sends:
            if t.is_cuda and t.nbytes:
                buf = self._pool().take(t.nbytes)
                buf.copy_(u8(t), non_blocking=True)
                downloads.add(t.device)
                items.append((off, buf.numpy()))
            else:
                items.append((off, _host_bytes(t)))
        for dev in downloads:
            torch.cuda.current_stream(dev).synchronize()
        self._handle.publish(seq, items, self.timeout, tag=tag)
        t1 = time.perf_counter()
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
            self._handle.fetch(seq, src, by_src[src], self.timeout, tag=tag)
        self._handle.ack(seq)
        # publish: copying in (and waiting for the readers of two events ago); fetch: waiting for the
        # owners, then copying out
        self.last = {"publish": t1 - t0, "fetch": time.perf_counter() - t1}
        if uploads:
            for t, buf in uploads:
                u8(t).copy_(buf, non_blocking=True)
            self._pinned.after_uploads({t.device for t, _ in uploads})

    def barrier(self):
        self._handle.barrier(self.timeout)

    def close(self, failed: bool = False):
        if self._finalizer.detach() is not None:
            self._handle.detach(failed)
            if self._pinned is not None and not failed:
                self._pinned.clear()
            self._pinned = None
