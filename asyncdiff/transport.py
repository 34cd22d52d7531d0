"""The Python side of the transports: tensors in, bytes moved by the C core.

``open_transport`` rendezvouses the ranks and returns an object with
``reserve``, ``publish``, ``fetch``, ``ack``, ``barrier`` and ``close``; the
copies and every wait happen in C with the GIL released.  Emulation needs no
transport at all (one process holds every rank's outputs).
"""

from __future__ import annotations

import os
import secrets
import weakref

import torch

from . import _core, launch


def _bytes(t: torch.Tensor):
    """A writable uint8 NumPy view of a contiguous CPU tensor's memory."""
    return t.reshape(-1).view(torch.uint8).numpy()


class ShmTransport:
    """Shared memory between the processes of one host (``csrc/shm.c``)."""

    kind = "shm"

    def __init__(self, rank: int, world: int, instance: int, timeout: float):
        rv = launch.from_env()
        if rv.local_world_size != rv.world_size:
            raise ValueError(
                f"transport: 'shm' needs every rank on one host, but LOCAL_WORLD_SIZE={rv.local_world_size} "
                f"and WORLD_SIZE={rv.world_size}"
            )
        self.rank, self.world, self.timeout = rank, world, timeout
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = launch.store(rv, f"asyncdiff/{restart}/{instance}/", timeout)
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
        self._finalizer = weakref.finalize(self, _core.ShmTransport.detach, self._handle, False)

    def reserve(self, nbytes: int):
        """Collective: room for ``nbytes`` of slots (all ranks pass the same)."""
        self._handle.reserve(nbytes, self.timeout)

    def exchange(self, seq: int, sends, recvs):
        """One event.  ``sends``: (destination ranks, offset, tensor);
        ``recvs``: (source rank, offset, tensor to fill).  Each sent slot is
        written once into shared memory, whatever the number of readers."""
        self._handle.publish(seq, [(off, _bytes(t)) for _dsts, off, t in sends], self.timeout)
        by_src: dict[int, list] = {}
        for src, off, t in recvs:
            by_src.setdefault(src, []).append((off, _bytes(t)))
        for src in sorted(by_src):
            self._handle.fetch(seq, src, by_src[src], self.timeout)
        self._handle.ack(seq)

    def barrier(self):
        self._handle.barrier(self.timeout)

    def close(self, failed: bool = False):
        if self._finalizer.detach() is not None:
            self._handle.detach(failed)


def open_transport(kind: str, rank: int, world: int, instance: int, timeout: float):
    if kind == "shm":
        return ShmTransport(rank, world, instance, timeout)
    raise ValueError(f"transport: unknown transport {kind!r}")
