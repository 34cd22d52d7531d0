"""What the ranks' per-call agreement costs (docs/design.md §8).

At the first denoiser call of every pipeline call each rank describes the
call (steps, timesteps, latents, batch, warm-up, the other inputs' shapes),
the ranks all-gather the descriptions and compare them
(``RankStep._agree``).  This times that method, as AsyncDiff runs it, on the
shared-memory transport: the description of an SDXL call at 1024x1024 with
classifier-free guidance and 50 steps, ``--iters`` times in a row after a
barrier, on 2 and 3 processes.  Median and 99th percentile per call, rank
0's clock.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="2,3", help="process counts")
    ap.add_argument("--iters", type=int, default=2000, help="timed calls per world size")
    ap.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def sdxl_call(config):
    """A ``Call`` as the denoiser hook makes it for SDXL, 1024 px, CFG, 50 steps."""
    import torch

    from asyncdiff import _core
    from asyncdiff.step import Call

    f32 = torch.float16
    inputs = (("sample", None, (2, 4, 128, 128), f32), ("encoder_hidden_states", None, (2, 77, 2048), f32),
              ("added_cond_kwargs", "text_embeds", (2, 1280), f32), ("added_cond_kwargs", "time_ids", (2, 6), f32))
    timesteps = torch.linspace(999, 0, 50).round().long()
    schedule = _core.Schedule(config.model_n, config.stride, config.warm_up, int(config.time_shift), 50)
    return Call(object(), timesteps, schedule, inputs, config)


def rank_main(args):
    import os

    from asyncdiff import launch
    from asyncdiff.config import AsyncDiffConfig
    from asyncdiff.rank import RankStep
    from asyncdiff.transport import ShmTransport

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    board = launch.join(launch.from_env(), "bench/", 120.0)
    shm = ShmTransport(rank, world, 120.0, board)
    step = RankStep(rank, {}, shm, board)
    call = sdxl_call(AsyncDiffConfig(model_n=world, warm_up=1))
    times = []
    for i in range(args.iters + 50):
        shm.barrier()
        start = time.perf_counter()
        step._agree(call, call.config)
        if i >= 50:
            times.append(time.perf_counter() - start)
    shm.close()
    times.sort()
    _util.rank_result({"median_us": statistics.median(times) * 1e6,
                       "p99_us": times[int(0.99 * (len(times) - 1))] * 1e6})


def main(argv=None):
    args = parse_args(argv)
    if args.rank:
        return rank_main(args)
    _util.preamble("Per-call agreement of the ranks (RankStep._agree) on the shm transport", threads=1)
    rows = []
    for world in map(int, args.worlds.split(",")):
        results = _util.launch(Path(__file__), ["--rank", "--iters", str(args.iters)], world)
        zero = results[0]
        rows.append([world, f"{zero['median_us']:.1f}", f"{zero['p99_us']:.1f}"])
    print(_util.table(["processes", "median per call (µs)", "p99 per call (µs)"], rows))


if __name__ == "__main__":
    main()
