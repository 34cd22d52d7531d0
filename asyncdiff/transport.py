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
        self._handle.reserve(nbytes, self.timeout)

    def publish(self, seq: int, items):
        self._handle.publish(seq, [(off, _bytes(t)) for off, t in items], self.timeout)

    def fetch(self, seq: int, src: int, items):
        self._handle.fetch(seq, src, [(off, _bytes(t)) for off, t in items], self.timeout)

    def ack(self, seq: int):
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
