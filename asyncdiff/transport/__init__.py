"""The transports: tensors in, bytes moved by the C core (docs/design.md §5).

``open_transport(kind, board, device=None, facts=None)`` checks, through the
launch store (``launch.Board``), that the ranks agree on ``facts`` (their
AsyncDiff configuration), and returns an object with ``reserve(nbytes)``
(collective), ``exchange(seq, sends, recvs)`` and ``close(failed)``; every
wait happens in C with the GIL released.  Emulation
needs no transport at all (one process holds every rank's outputs).

Kinds:

* ``"shm"`` (``shm.py``) -- POSIX shared memory between the processes of one
  host.
* ``"nccl"`` (``nccl.py``) -- NCCL point-to-point between GPUs, on one host
  or several.
* ``"auto"`` -- collective choice: NCCL when every rank's denoiser is on its
  own CUDA device and NCCL loads on every rank, else shared memory.

Bytes are moved as they are: fp16/bf16 stay fp16/bf16.
"""

from __future__ import annotations

import itertools
import json
import os
import socket

import torch

from .. import _core, launch
from . import nccl
from .nccl import NcclTransport
from .shm import ShmTransport

KINDS = ("auto", "shm", "nccl")
_instances = itertools.count()  # AsyncDiff instances of this process: one store prefix each

__all__ = ["KINDS", "available", "gpu_status", "check_transport", "open_transport", "join", "next_instance",
           "ShmTransport", "NcclTransport"]


def available() -> dict:
    """Which transports can be used in this process, e.g.
    ``{"emulate": True, "shm": True, "nccl": False}``; ``gpu_status()`` says
    why NCCL is or is not usable."""
    got = dict(_core.transports())
    got["nccl"] = nccl.usable()
    return got


def gpu_status() -> str:
    """What the C core found of NCCL and the CUDA runtime, or what is missing."""
    return _core.gpu_status()


def check_transport(kind: str, device) -> None:
    """Raise a ValueError naming ``transport`` when ``kind`` cannot serve a
    denoiser on ``device`` in this process (checked before any rendezvous)."""
    if kind == "nccl":
        nccl.check(device if device is not None else "cpu")


def next_instance() -> int:
    return next(_instances)


def _choose(board, rv, device) -> str:
    """Collective choice for ``"auto"``: every rank states what it can do,
    then all pick the same transport from the same statements."""
    host = socket.gethostname()
    mine = {"host": host, "nccl": False, "gpu": None, "why": ""}
    if device is not None and torch.device(device).type == "cuda":
        try:
            nccl.check(device)
            dev = nccl.cuda_device(device)
            uuid = getattr(torch.cuda.get_device_properties(dev), "uuid", None)
            mine.update(nccl=True, gpu=f"{host}/{uuid if uuid is not None else dev}")
        except ValueError as exc:
            mine["why"] = str(exc)
    else:
        mine["why"] = f"denoiser on {device}"
    votes = launch.gather(board, "auto", mine)
    world = board.world
    gpus = [v["gpu"] for v in votes]
    if all(v["nccl"] for v in votes) and len(set(gpus)) == world:
        return "nccl"
    if len({v["host"] for v in votes}) == 1 and rv.local_world_size == rv.world_size:
        return "shm"
    reasons = "; ".join(f"rank {r}: {v['why'] or 'shares its GPU with another rank'}"
                        for r, v in enumerate(votes) if not v["nccl"] or gpus.count(v["gpu"]) > 1)
    raise ValueError(f"transport: the ranks span several hosts, so shared memory cannot be used, and NCCL "
                     f"is not usable on every rank ({reasons})")


def open_transport(kind: str, board, device=None, facts: dict | None = None):
    """Open a transport of ``kind`` (``"auto"``, ``"shm"`` or ``"nccl"``) for
    this rank of the launch ``board`` (a ``launch.Board``); ``device`` is
    where the denoiser's tensors live; ``facts`` what every rank must agree on
    (a mismatch raises on every rank, naming the entry and both values)."""
    if kind not in KINDS:
        raise ValueError(f"transport: unknown transport {kind!r} (expected one of {', '.join(KINDS)})")
    if kind == "nccl":
        nccl.check(device if device is not None else nccl.cuda_device(None))
    rv = launch.from_env()
    if facts is not None:
        launch.agree(board, json.loads(json.dumps(facts)))
    if kind == "auto":
        kind = _choose(board, rv, device)
    if kind == "shm":
        return ShmTransport(board.rank, board.world, board.timeout, board)
    return NcclTransport(board.rank, board.world, board.timeout, board, device=device)


def join(timeout: float):
    """This process's ``launch.Board`` for a new AsyncDiff instance (one
    store prefix per instance, numbered alike on every rank)."""
    rv = launch.from_env()
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return launch.join(rv, f"asyncdiff/{restart}/{next_instance()}/", timeout)
