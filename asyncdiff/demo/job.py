"""The main job: the same batch sampled sequentially and with AsyncDiff, side by side.

    python -m asyncdiff.demo                                # one process emulates every rank
    torchrun --nproc_per_node=2 -m asyncdiff.demo           # 2 processes, shared-memory transport
    torchrun --nproc_per_node=3 -m asyncdiff.demo --model_n 2 --stride 2
    python -m asyncdiff.demo --model /path/to/stable-diffusion-folder --prompt "a red bicycle"

Without ``--model`` the built-in digits model (``asyncdiff.demo.digits``, trained
weights shipped with the package) draws the digits 0..9, so the job runs
offline on a CPU.  With ``--model`` a local Stable Diffusion folder is loaded
(``local_files_only``) and one image of ``--prompt`` is drawn.

Each process first runs the plain pipeline (sequential: one process does
every step), then attaches ``AsyncDiff`` and runs the same call again with the
same seed; each is timed after one untimed warm-up call.  Under torchrun every
rank runs the sequential baseline too (each its own copy, at the same time),
so the comparison is "1 process sequential vs N processes AsyncDiff".  Without
torchrun one process plays every rank in turn: the images are those of the
multi-process run, the time is not.  Every rank prints its wall times; rank 0
prints the speed-up, the PSNR of the AsyncDiff images against the sequential
ones, the digit classifier's accuracy on both, and writes a PNG grid (top row
sequential, bottom row AsyncDiff).
"""

from __future__ import annotations

import argparse
import hashlib
import time

import numpy as np
import torch

from asyncdiff import AsyncDiff, launch
from asyncdiff.config import add_arguments, from_args, int_at_least

from . import digits


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m asyncdiff.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None,
                    help="local Stable Diffusion folder (default: the built-in digits model)")
    ap.add_argument("--prompt", default="a photograph of a kitten sitting by a door",
                    help="prompt for --model")
    ap.add_argument("--steps", type=int_at_least(1), default=50, help="denoising steps (default 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=None,
                    help="classifier-free guidance scale (default: the model's own default)")
    ap.add_argument("--out", default="demo.png", help="PNG grid written by rank 0 (default demo.png)")
    ap.add_argument("--threads", type=int_at_least(1), default=1, help="torch threads per process (default 1)")
    add_arguments(ap, warm_up=3)
    args = ap.parse_args(argv)
    args.asyncdiff = from_args(ap, args)  # every AsyncDiff flag checked before the sequential baseline runs
    return args


class _Job:
    """One model: how to build it, call it, and score it."""

    def __init__(self, args, device):
        self.args = args
        if args.model is None:
            self.name = "built-in digits model"
            self.pipe = digits.load_pipeline(device=device)
            self.labels = list(range(digits.NUM_CLASSES))
            self.guidance = digits.DEFAULT_GUIDANCE if args.guidance is None else args.guidance
            self.clf = digits.classifier()
            self.nrow = len(self.labels)
            self.what = f"digits {self.labels[0]}..{self.labels[-1]}"
        else:
            from diffusers import StableDiffusionPipeline

            dtype = torch.float16 if device.type == "cuda" else torch.float32
            self.name = f"Stable Diffusion from {args.model}"
            self.pipe = StableDiffusionPipeline.from_pretrained(
                args.model, torch_dtype=dtype, local_files_only=True
            ).to(device)
            self.labels = None
            self.guidance = args.guidance
            self.clf = None
            self.nrow = 1
            self.what = f"prompt {args.prompt!r}"
        self.pipe.set_progress_bar_config(disable=True)
        self.device = device

    def __call__(self):
        gen = torch.Generator("cpu").manual_seed(self.args.seed)
        kw = {} if self.guidance is None else {"guidance_scale": self.guidance}
        if self.labels is not None:
            out = self.pipe(self.labels, num_inference_steps=self.args.steps, generator=gen,
                            output_type="np", **kw)
        else:
            out = self.pipe(self.args.prompt, num_inference_steps=self.args.steps, generator=gen,
                            output_type="np", **kw)
        return np.asarray(out.images, dtype=np.float32)

    def accuracy(self, images):
        if self.clf is None:
            return None
        return self.clf.accuracy(images, self.labels)


def _timed(fn, device):
    fn()  # untimed warm-up call
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    images = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images, time.perf_counter() - start


def _digest(images: np.ndarray) -> str:
    return hashlib.sha1((np.clip(images, 0, 1) * 255).round().astype(np.uint8).tobytes()).hexdigest()[:10]


def _fmt_acc(acc, n):
    return "n/a" if acc is None else f"{acc:.0%} ({round(acc * n)}/{n})"


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = launch.rank_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)

    job = _Job(args, device)

    # 1. the plain pipeline: one process does every step
    seq_images, seq_s = _timed(job, device)

    # 2. the same call with AsyncDiff attached
    c = args.asyncdiff
    ad = AsyncDiff(job.pipe, c.model_n, c.stride, c.warm_up, c.time_shift, split=c.split, transport=c.transport,
                   timeout=c.timeout, keep_weights=c.keep_weights, encoders=c.encoders, cfg_parallel=c.cfg_parallel)
    try:
        async_images, async_s = _timed(job, device)
        split = str(ad.split)
        rank, world, mode = ad.rank, ad.world_size, ad.mode
    finally:
        ad.remove()

    digest = _digest(async_images)
    print(f"rank {rank}/{world} ({mode}): sequential {seq_s:.3f} s, AsyncDiff {async_s:.3f} s, "
          f"AsyncDiff output {digest}", flush=True)

    result = {
        "rank": rank, "world_size": world, "mode": mode, "split": split,
        "sequential_s": seq_s, "asyncdiff_s": async_s, "speedup": seq_s / async_s,
        "psnr_db": digits.psnr(async_images, seq_images), "digest": digest,
        "accuracy_sequential": job.accuracy(seq_images), "accuracy_asyncdiff": job.accuracy(async_images),
        "out": None,
    }
    if rank != 0:
        return result

    grid = digits.to_grid(np.concatenate([seq_images, async_images]), nrow=job.nrow, scale=4 if job.labels else 1)
    grid.save(args.out)
    result["out"] = args.out

    n = len(seq_images)
    if mode == "emulate":
        compared = (f"1 process sequential vs AsyncDiff emulated in 1 process (it plays all {world} ranks in "
                    f"turn: the images of a {world}-process run, not its timing; launch with "
                    f"torchrun --nproc_per_node={world} for the real timing)")
    else:
        compared = (f"1 process sequential vs {world} processes AsyncDiff ({mode} transport); "
                    f"the sequential baseline ran on every rank at once, timed here on rank 0")
    ts = "true" if args.time_shift else "false"
    lines = [
        f"model      : {job.name}, {job.what}, {args.steps} steps, seed {args.seed}"
        + ("" if job.guidance is None else f", guidance {job.guidance:g}")
        + f", {args.threads} torch thread(s) per process, {device.type}",
        f"AsyncDiff  : model_n={args.model_n} stride={args.stride} warm_up={args.warm_up} time_shift={ts}",
        f"split      : {split}",
        f"compared   : {compared}",
        f"sequential : {seq_s:.3f} s",
        f"AsyncDiff  : {async_s:.3f} s",
        f"speed-up   : {result['speedup']:.2f}x",
        f"PSNR       : {result['psnr_db']:.2f} dB (AsyncDiff vs sequential, images in [0, 1])",
        f"classifier : accuracy vs requested labels: sequential {_fmt_acc(result['accuracy_sequential'], n)}, "
        f"AsyncDiff {_fmt_acc(result['accuracy_asyncdiff'], n)}" if job.clf is not None
        else "classifier : n/a (only for the built-in digits model)",
        f"wrote      : {args.out} (top row sequential, bottom row AsyncDiff)",
    ]
    print("\n".join(lines), flush=True)
    return result


if __name__ == "__main__":
    main()
