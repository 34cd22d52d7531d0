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
import os
from dataclasses import dataclass
from datetime import timedelta

import torch


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
            f"model_n + stride - 1 = {config.world_size}; launch with --nproc_per_node={config.world_size}"
        )
    return rv.rank


def rank_device() -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))))
    return torch.device("cpu")


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a module's first parameter or buffer lives (the CPU for none)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def gather(store, key: str, rank: int, world: int, value) -> list:
    """Every rank's ``value`` (JSON), in rank order, through the store."""
    store.set(f"{key}/{rank}", json.dumps(value))
    return [json.loads(store.get(f"{key}/{r}")) for r in range(world)]


def agree(store, rank: int, world: int, facts: dict) -> None:
    """Raise, on every rank alike, when the ranks were not given the same
    ``facts``: a ValueError naming the first entry that differs and the values
    of rank 0 and of the first rank that differs."""
    every = gather(store, "facts", rank, world, facts)
    for name in every[0]:
        for r in range(1, world):
            if every[r].get(name) != every[0][name]:
                raise ValueError(f"{name}: the ranks disagree: rank 0 has {every[0][name]!r}, "
                                 f"rank {r} has {every[r].get(name)!r}; every rank must run the same "
                                 "script with the same arguments")
