"""Stable Diffusion (1.x / 2.x) with AsyncDiff.

    torchrun --nproc_per_node=2 examples/run_sd.py --model_n 2 --stride 1
    python examples/run_sd.py                      # one process emulates every rank

Without --model a tiny built-in SD 1.5-topology pipeline (random weights) is
used, so the script runs offline on a CPU.  With --model PATH a local
diffusers folder is loaded.  Rank 0 saves the image.
"""

import argparse
import os
import time

import torch

from asyncdiff import AsyncDiff


def str2bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "y", "on"):
        return True
    if low in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="local diffusers folder (default: tiny built-in model)")
    ap.add_argument("--prompt", default="a photograph of a kitten sitting by a door")
    ap.add_argument("--seed", type=int, default=20)
    ap.add_argument("--model_n", type=int, default=2)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--warm_up", type=int, default=1)
    ap.add_argument("--time_shift", type=str2bool, default=False)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--split", default=None, help="'auto', 'paper' or an explicit split (default: paper preset)")
    ap.add_argument("--out", default="output.png")
    args = ap.parse_args(argv)

    if args.model is None:
        from asyncdiff import tiny

        pipe = tiny.build_pipeline("sd15")
        extra = {k: v for k, v in tiny.default_call_kwargs("sd15").items()
                 if k in ("height", "width", "guidance_scale")}
    else:
        from diffusers import StableDiffusionPipeline

        dtype = torch.float16 if torch.cuda.is_available() else torch.float32
        pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, local_files_only=True)
        extra = {}
    if torch.cuda.is_available():
        pipe.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")

    ad = AsyncDiff(pipe, model_n=args.model_n, stride=args.stride, warm_up=args.warm_up,
                   time_shift=args.time_shift, split=args.split)
    start = time.perf_counter()
    image = pipe(args.prompt, num_inference_steps=args.steps,
                 generator=torch.Generator("cpu").manual_seed(args.seed), **extra).images[0]
    elapsed = time.perf_counter() - start
    print(f"rank {ad.rank}/{ad.world_size} ({ad.mode}, split: {ad.split}): {elapsed:.2f} s", flush=True)
    if ad.rank == 0:
        image.save(args.out)
        print(f"saved {args.out}")
    ad.remove()


if __name__ == "__main__":
    main()
