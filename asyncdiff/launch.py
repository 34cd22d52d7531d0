"""Rendezvous: who am I, and a key-value store shared with the other ranks.

The ranks meet through the torchrun environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).  The
store is, in order of preference: the store of a process group the user has
already initialised, the store torchrun's agent hosts
(``TORCHELASTIC_USE_AGENT_STORE``), or a ``TCPStore`` that rank 0 hosts.
The user never has to call ``init_process_group``.  This module is also the
one place that picks a rank's device (``rank_device``) and that compares what
the ranks were given (``agree``).  See docs/design.md §7.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch

from . import _core

log = logging.getLogger("asyncdiff")
PeerError = getattr(_core, "AsyncDiffPeerError", _core.AsyncDiffError)


@dataclass(frozen=True)
class Rendezvous:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def from_env() -> Rendezvous:
    def read(name, default=None):
        value = os.environ.get(name, default)
        if value is None:
            raise ValueError(f"{name}: not set; launch with torchrun (or set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name}: expected an integer, got {value!r}") from None

    world = read("WORLD_SIZE")
    rank = read("RANK")
    if not 0 <= rank < world:
        raise ValueError(f"RANK: {rank} is outside 0..{world - 1}")
    return Rendezvous(rank, world, read("LOCAL_RANK", str(rank)), read("LOCAL_WORLD_SIZE", str(world)))


_stores: dict = {}  # (host, port, hosted) -> the TCPStore this process uses for that launch


def join(rv: Rendezvous, prefix: str, timeout: float) -> "Board":
    """The store all ranks share, with keys under ``prefix``, as this rank's ``Board``."""
    import torch.distributed as dist

    wait = timedelta(seconds=timeout)
    if dist.is_available() and dist.is_initialized():
        base = dist.distributed_c10d._get_default_store()
        hosted = dist.get_rank() == 0
    else:
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        try:
            port = int(os.environ["MASTER_PORT"])
        except (KeyError, ValueError):
            raise ValueError("MASTER_PORT: not set or not an integer; launch with torchrun") from None
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        hosted = rv.rank == 0 and not agent
        key = (host, port, hosted)
        base = _stores.get(key)
        if base is None:
            # One store per launch and process, kept for the process's life: the
            # host's server must outlive every instance, or a peer that already
            # connected for the next instance would find it gone.
            base = _stores[key] = dist.TCPStore(
                host, port, rv.world_size, is_master=hosted, timeout=wait,
                wait_for_workers=False, multi_tenant=not agent,
            )
    s = dist.PrefixStore(prefix, base)
    s.set_timeout(wait)
    return Board(s, rv.rank, rv.world_size, timeout, hosted)


class Board:
    """The launch store as one rank sees it, with failures made visible.

    A rank that fails between the rendezvous and its first pipeline call
    posts its error (``fail``); every wait of every other rank (``get``)
    polls for such records and raises ``AsyncDiffPeerError`` naming the rank
    and its message instead of waiting out ``timeout``.  A store that stops
    answering means its host (rank 0, or the user's process-group host) is
    gone, which is also a peer error.  Keys live under the instance's prefix,
    so every AsyncDiff has its own records.  See docs/design.md §8."""

    POLL = 0.05  # seconds between checks for a peer's error record

    def __init__(self, store, rank: int, world: int, timeout: float, hosted: bool):
        self.store, self.rank, self.world, self.timeout = store, rank, world, timeout
        self.hosted = hosted  # this process hosts the store: it must outlive the others' reads

    def set(self, key: str, value) -> None:
        self.store.set(key, value)

    def get(self, key: str) -> bytes:
        """The value of ``key`` once a rank sets it; a peer's error record, a
        vanished store or ``timeout`` seconds of waiting raise instead."""
        import torch.distributed as dist

        deadline = time.monotonic() + self.timeout
        nap = 0.001
        while True:
            # check() then sleep, never a blocking wait with a short timeout: a
            # TCPStore client whose wait times out is out of step with its server
            try:
                if self.store.check([key]):
                    return self.store.get(key)
            except dist.DistNetworkError as exc:
                raise PeerError(f"rendezvous: the store stopped answering while rank {self.rank} waited for "
                                f"{key!r} (its host, rank 0, has probably exited): {exc}") from None
            self.check()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"rendezvous: rank {self.rank} waited {self.timeout:g} s for {key!r} "
                                   f"(set by another rank); is every rank running AsyncDiff with the same "
                                   "arguments?")
            time.sleep(nap)
            nap = min(nap * 2, self.POLL)

    def check(self) -> None:
        """Raise ``AsyncDiffPeerError`` when another rank has posted an error."""
        import torch.distributed as dist

        try:
            if not self.store.add("errors", 0):
                return
            for r in range(self.world):
                if r != self.rank and self.store.check([f"error/{r}"]):
                    message = self.store.get(f"error/{r}").decode(errors="replace")
                    self.store.set(f"seen/{self.rank}", "1")
                    error = PeerError(f"rank {r} failed: {message}")
                    error.rank = r
                    raise error
        except dist.DistNetworkError as exc:
            raise PeerError(f"rendezvous: the store stopped answering (its host, rank 0, has probably "
                            f"exited): {exc}") from None

    def fail(self, exc: BaseException) -> None:
        """Post this rank's error; the host of the store then waits (at most
        ``timeout``) until every other rank has read it or failed too."""
        import torch.distributed as dist

        if isinstance(exc, PeerError):
            return  # the first failure is the one to report
        try:
            self.store.set(f"error/{self.rank}", f"{type(exc).__name__}: {exc}")
            self.store.add("errors", 1)
            if not self.hosted:
                return
            others = [r for r in range(self.world) if r != self.rank]
            deadline = time.monotonic() + self.timeout
            logged = False
            while others and time.monotonic() < deadline:
                others = [r for r in others
                          if not self.store.check([f"seen/{r}"]) and not self.store.check([f"error/{r}"])]
                if others and not logged:
                    log.warning("rank %d: keeping the rendezvous store up until ranks %s have read this error "
                                "(at most %g s)", self.rank, others, self.timeout)
                    logged = True
                time.sleep(self.POLL)
        except dist.DistError:
            pass  # the store is gone: nobody is left to tell


def board_if_launched(transport, timeout) -> Board | None:
    """This process's ``Board`` for a new AsyncDiff when it is one rank of a
    launch (``WORLD_SIZE`` set, ``transport`` not ``"emulate"``), else None.
    It is made before the arguments are checked, so that a bad one is posted
    to the other ranks; ``timeout`` is the default when it is invalid itself.
    None too when the launch gives no place to meet (no ``MASTER_PORT``):
    the rendezvous then fails with what is missing."""
    if os.environ.get("WORLD_SIZE") is None or (isinstance(transport, str) and transport == "emulate"):
        return None
    import torch.distributed as dist

    if "MASTER_PORT" not in os.environ and not (dist.is_available() and dist.is_initialized()):
        return None  # nowhere to meet: errors stay local, and the rendezvous says what is missing
    from .config import AsyncDiffConfig, check_timeout
    from .transport import join

    try:
        timeout = check_timeout(timeout)
    except (TypeError, ValueError):
        timeout = AsyncDiffConfig.timeout
    return join(timeout)


def rank_if_launched(config) -> int | None:
    """This process's rank when it is one of a torchrun launch that AsyncDiff
    should join, None for emulation.  A launch of the wrong size is refused."""
    env_world = os.environ.get("WORLD_SIZE")
    if config.transport == "emulate" or (config.transport == "auto" and env_world is None):
        return None
    if env_world is None:
        raise ValueError(f"transport: {config.transport!r} needs a torchrun launch (WORLD_SIZE, RANK are not set)")
    rv = from_env()
    if rv.world_size != config.world_size:
        raise ValueError(
            f"world size: torchrun started {rv.world_size} processes but this configuration needs "
            f"{config.ranks_needed()} = {config.world_size}; launch with --nproc_per_node={config.world_size}"
        )
    return rv.rank


def rank_device() -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))))
    return torch.device("cpu")


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a module's first real parameter or buffer lives (the CPU for none;
    tensors on the meta device, e.g. other ranks' blocks, do not count)."""
    for tensor in (*module.parameters(), *module.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


def gather(board: Board, key: str, value) -> list:
    """Every rank's ``value`` (JSON), in rank order, through the store."""
    board.set(f"{key}/{board.rank}", json.dumps(value))
    return [json.loads(board.get(f"{key}/{r}")) for r in range(board.world)]


def disagreement(every: list) -> str | None:
    """The first entry on which the ranks' dicts ``every`` differ, as
    "name: rank 0 has A, rank r has B", or None when they all agree."""
    for name in every[0]:
        for r in range(1, len(every)):
            if every[r].get(name) != every[0][name]:
                return f"{name}: rank 0 has {every[0][name]!r}, rank {r} has {every[r].get(name)!r}"
    return None


def agree(board: Board, facts: dict) -> None:
    """Raise, on every rank alike, when the ranks were not given the same
    ``facts``: a ValueError naming the first entry that differs and the values
    of rank 0 and of the first rank that differs."""
    differ = disagreement(gather(board, "facts", facts))
    if differ is not None:
        raise ValueError(f"{differ}; the ranks disagree: every rank must run the same script with the same "
                         "arguments")
