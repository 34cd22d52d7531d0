"""Rendezvous: who am I, and a key-value store shared with the other ranks.

The ranks meet through the torchrun environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).  The
store is, in order of preference: the store of a process group the user has
already initialised, the store torchrun's agent hosts
(``TORCHELASTIC_USE_AGENT_STORE``), or a ``TCPStore`` that rank 0 hosts.
The user never has to call ``init_process_group``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta


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


def store(rv: Rendezvous, prefix: str, timeout: float):
    """A store all ranks share, with keys under ``prefix``."""
    import torch.distributed as dist

    wait = timedelta(seconds=timeout)
    if dist.is_available() and dist.is_initialized():
        base = dist.distributed_c10d._get_default_store()
    else:
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        try:
            port = int(os.environ["MASTER_PORT"])
        except (KeyError, ValueError):
            raise ValueError("MASTER_PORT: not set or not an integer; launch with torchrun") from None
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        base = dist.TCPStore(
            host, port, rv.world_size, is_master=(rv.rank == 0 and not agent), timeout=wait,
            wait_for_workers=False, multi_tenant=not agent,
        )
    s = dist.PrefixStore(prefix, base)
    s.set_timeout(wait)
    return s
