"""NCCL point-to-point between GPUs, on one host or several (``csrc/nccl.c``; docs/design.md §5.2).

Device to device, on a stream of its own, ordered with the compute stream by
CUDA events (no host sync).  Rank 0 makes the NCCL unique id and puts its 128
bytes in the launch store; every rank joins with it on its own device.
"""

from __future__ import annotations

import weakref

import torch

from .. import _core, launch
from .shm import u8


def check(device) -> None:
    """Raise a ValueError naming ``transport`` when NCCL cannot serve a
    denoiser on ``device`` in this process (checked before any rendezvous);
    ``device`` None checks the library alone."""
    if not usable():
        why = _core.gpu_status() if torch.cuda.is_available() else \
            f"torch {torch.__version__} sees no CUDA device; {_core.gpu_status()}"
        raise ValueError(f"transport: 'nccl' is not usable here: {why}")
    if device is not None and torch.device(device).type != "cuda":
        raise ValueError(
            f"transport: 'nccl' moves CUDA tensors, but the denoiser is on {device}; move the "
            "pipeline to this rank's GPU (pipe.to(f'cuda:{LOCAL_RANK}')) or use transport='shm'"
        )


def usable() -> bool:
    """NCCL loads and torch sees a CUDA device."""
    return bool(dict(_core.transports()).get("nccl")) and torch.cuda.is_available()


def cuda_device(device) -> torch.device:
    """The CUDA device a rank's NCCL communicator lives on: the denoiser's, or
    this rank's (``launch.rank_device``) when none is given."""
    device = torch.device(device) if device is not None else launch.rank_device()
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

    def __init__(self, rank: int, world: int, timeout: float, store, device=None):
        self.rank, self.world, self.timeout = rank, world, timeout
        self.device = cuda_device(device)
        check(self.device)
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
        u8(t)  # contiguity
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
