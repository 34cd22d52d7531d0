"""One rank of a multi-process test run (started by tests/mp.py, or torchrun).

Reads a JSON list of configurations, runs each with AsyncDiff over the shm
transport and saves the latents and block-execution counts per rank.

A configuration may name a ``world`` smaller than the launch: the ranks below
it run it as a launch of that size would (``WORLD_SIZE`` and
``LOCAL_WORLD_SIZE`` set to it), the others skip it, keeping their count of
AsyncDiff instances in step.  Configurations come in decreasing world size,
so a rank that skips one has no more to run, and one start of the processes
serves every world size.
"""

import json
import os
import sys
import time

import torch

torch.set_num_threads(1)

from asyncdiff import AsyncDiff, encoders, shard, transport  # noqa: E402
from asyncdiff.testing import tiny  # noqa: E402


def run(config: dict, pipe, rank: int):
    kwargs = tiny.default_call_kwargs(config["arch"])
    kwargs["num_inference_steps"] = config.get("steps", kwargs.get("num_inference_steps", 6))
    kwargs.pop("generator")
    kwargs.update(config.get("call", {}))
    pipe.set_progress_bar_config(disable=False)  # as a user has it; AsyncDiff keeps rank 0's alone
    present = sorted(encoders.text_encoders(pipe))
    ad = AsyncDiff(pipe, model_n=config["model_n"], stride=config["stride"], warm_up=config["warm_up"],
                   time_shift=config.get("time_shift", False), split=config.get("split"),
                   timeout=config.get("timeout", 60.0), keep_weights=config.get("keep_weights", False),
                   encoders=config.get("encoders", "all"), cfg_parallel=config.get("cfg_parallel", False))
    try:
        results = []
        for _ in range(config.get("repeat", 1)):
            out = pipe(**kwargs, generator=torch.Generator().manual_seed(config.get("seed", 0)))
            results.append(out.images if hasattr(out, "images") else out.frames)
        progress = dict(getattr(pipe, "_progress_bar_config", {}))
        denoiser = getattr(pipe, "unet", None) or pipe.transformer
        real = sorted(n for n, t in [*denoiser.named_parameters(), *denoiser.named_buffers()] if not t.is_meta)
        result = {"latents": results, "counts": dict(ad.counts), "split": str(ad.split), "progress": progress,
                  "real": real, "freed": ad.freed, "encoders": present, "stats": ad.stats,
                  "encoders_left": sorted(encoders.text_encoders(pipe))}
    finally:
        ad.remove()
        assert not getattr(pipe, "_progress_bar_config", {}).get("disable"), "progress bar not restored"
    # after remove(): a sharded pipeline says it must be reloaded, a complete one runs
    try:
        AsyncDiff(pipe, model_n=config["model_n"], stride=config["stride"], transport="emulate").remove()
        result["again"] = "attached"
    except ValueError as exc:
        result["again"] = str(exc)
    if config.get("after_remove"):  # the pipeline itself, once more
        try:
            pipe(**{**kwargs, "num_inference_steps": 2}, generator=torch.Generator().manual_seed(0))
            result["guard"] = "ran"
        except RuntimeError as exc:
            result["guard"] = str(exc)
    return result


def main():
    configs = json.load(open(sys.argv[1]))
    outdir = sys.argv[2]
    rank = int(os.environ["RANK"])
    launched = int(os.environ["WORLD_SIZE"])
    worlds = [cfg.get("world", launched) for cfg in configs]
    assert worlds == sorted(worlds, reverse=True) and worlds[0] <= launched, worlds
    pipes = {}
    for cfg, world in zip(configs, worlds):
        if rank >= world:
            transport.next_instance()  # as the ranks that run it do
            print(f"{cfg['id']}: not in its world of {world}", flush=True)
            continue
        os.environ["WORLD_SIZE"] = os.environ["LOCAL_WORLD_SIZE"] = str(world)
        if cfg.get("init_process_group"):
            # the user's own process group (of this world) must not get in the way
            import torch.distributed as dist

            if not dist.is_initialized():
                if "port" in cfg:
                    os.environ["MASTER_PORT"] = str(cfg["port"])
                dist.init_process_group("gloo")
        arch = cfg["arch"]
        start = time.perf_counter()
        held = pipes.get(arch)
        if held is None or not cfg.get("keep_weights", False) or \
                shard.meta_names(getattr(held, "unet", None) or held.transformer):
            # a sharded pipeline keeps only this rank's blocks: the next configuration needs a new one
            pipes[arch] = tiny.build_pipeline(arch, seed=0)
        result = run(cfg, pipes[arch], rank)
        print(f"{cfg['id']}: {time.perf_counter() - start:.2f} s", flush=True)
        torch.save(result, os.path.join(outdir, f"{cfg['id']}.rank{rank}.pt"))
    print(f"rank {rank} done", flush=True)


if __name__ == "__main__":
    main()
