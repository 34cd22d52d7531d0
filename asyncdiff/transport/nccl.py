"""NCCL point-to-point between GPUs, on one host or several (``csrc/nccl.c``; docs/design.md §5.2).

Device to device, on a stream of its own, ordered with the compute stream by
CUDA events (no host sync).  Rank 0 makes the NCCL unique id and puts its 128
bytes in the launch store; every rank joins with it on its own device.
"""

from __future__ import annotations

import os
import re
import socket
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


def nccl_version() -> tuple | None:
    """(major, minor, patch) of the NCCL the C core found, None when none was."""
    found = re.search(r"\bNCCL (\d+)\.(\d+)\.(\d+) from ", _core.gpu_status())
    return tuple(int(x) for x in found.groups()) if found else None


def shared_gpu_problem(gpus: list, version: tuple | None, opt_in: str | None) -> str | None:
    """Why NCCL will refuse a communicator whose ranks use ``gpus`` (one
    identity per rank, "host/uuid"), or None.  NCCL before 2.30 never puts
    two ranks on one GPU; 2.30 and later do only with
    ``NCCL_MULTI_RANK_GPU_ENABLE=1`` (experimental).  docs/design.md §5.2."""
    first: dict = {}
    for rank, gpu in enumerate(gpus):
        if gpu in first:
            shared = f"ranks {first[gpu]} and {rank} are on the same GPU ({gpu})"
            break
        first[gpu] = rank
    else:
        return None
    name = "NCCL " + ".".join(map(str, version)) if version else "NCCL"
    if version is not None and version >= (2, 30, 0):
        if opt_in == "1":
            return None
        rule = (f"{name} refuses that unless NCCL_MULTI_RANK_GPU_ENABLE=1 (experimental; it is "
                f"{'unset' if opt_in is None else repr(opt_in)})")
    else:
        rule = f"{name} never allows that (2.30+ does with NCCL_MULTI_RANK_GPU_ENABLE=1, experimental)"
    return (f"transport: 'nccl': {shared}; {rule}; give each rank its own GPU "
            "(pipe.to(f'cuda:{LOCAL_RANK}')) or use transport='shm', which may share one")


def _abandon(handle, inflight: list) -> None:
    """A transport collected without close(): abort (peers stop waiting),
    then let go of the tensors NCCL may have been using."""
    handle.close(True)
    inflight.clear()


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
        if world > 1:  # a refusal NCCL would give, said first and by every rank alike
            props = torch.cuda.get_device_properties(self.device)
            store.set(f"nccl_gpu/{rank}", f"{socket.gethostname()}/{getattr(props, 'uuid', self.device.index)}")
            gpus = [bytes(store.get(f"nccl_gpu/{r}")).decode() for r in range(world)]
            why = shared_gpu_problem(gpus, nccl_version(), os.environ.get("NCCL_MULTI_RANK_GPU_ENABLE"))
            if why is not None:
                raise ValueError(why)
        if rank == 0:
            uid = _core.nccl_unique_id()
            store.set("nccl_id", uid)
        else:
            uid = store.get("nccl_id")
        self._handle = _core.NcclTransport(bytes(uid), world, rank, self.device.index, timeout)
        # Tensors NCCL may still read or write (docs/design.md §5.2): those of
        # the last exchange until the next one has confirmed (in C) that the
        # GPU is done with them, and after a failed exchange everything it
        # was given, until close() has aborted the communicator.  The
        # finalizer holds the same list, so a transport that is collected
        # unclosed lets go of them only after its abort.
        self._inflight: list = []
        self._finalizer = weakref.finalize(self, _abandon, self._handle, self._inflight)

    def reserve(self, nbytes: int):
        """Nothing to do: NCCL reads and writes the tensors themselves."""

    def _checked(self, t: torch.Tensor) -> torch.Tensor:
        if t.device != self.device:
            raise ValueError(f"transport: the NCCL transport of this rank moves tensors on {self.device}, "
                             f"got one on {t.device}")
        u8(t)  # contiguity
        return t

    def exchange(self, seq: int, sends, recvs, tag: int = 0):
        """One event (``seq`` is implied by the order of calls; ``tag``, the
        event's identity, is not sent: NCCL pairs messages by order, and the
        ranks compared every call's arguments before its first event).  Each send
        goes to each of its destinations; items to one peer are paired with
        that peer's items by slot offset, which is the same on every rank.
        Empty tensors are skipped on both sides."""
        out = sorted(((dst, off, self._checked(t)) for dsts, off, t in sends if t.nbytes for dst in dsts),
                     key=lambda item: (item[0], item[1]))
        ins = sorted(((src, off, self._checked(t)) for src, off, t in recvs if t.nbytes),
                     key=lambda item: (item[0], item[1]))
        stream = torch.cuda.current_stream(self.device)
        mine = [t for _, _, t in out] + [t for _, _, t in ins]
        # Kept before the call: if it raises after NCCL has the pointers
        # (launch timeout, error after ncclGroupEnd), they stay alive.
        self._inflight.extend(mine)
        self._handle.exchange([(peer, t.data_ptr(), t.nbytes) for peer, _, t in out],
                              [(peer, t.data_ptr(), t.nbytes) for peer, _, t in ins],
                              stream.cuda_stream, self.timeout)
        self._inflight[:] = mine  # the previous exchange has finished on the GPU

    def wait(self):
        """Block until every exchange queued so far has finished on the GPU."""
        self._handle.wait(self.timeout)

    def close(self, failed: bool = False):
        if self._finalizer.detach() is not None:
            self._handle.close(bool(failed))
            self._inflight.clear()
