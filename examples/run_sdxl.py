"""Stable Diffusion XL with AsyncDiff.

    torchrun --nproc_per_node=2 examples/run_sdxl.py --model_n 2 --stride 1
    torchrun --nproc_per_node=4 examples/run_sdxl.py --model_n 4 --stride 1 --model /models/sdxl-base-1.0
    python examples/run_sdxl.py          # one process plays every rank (emulation)

Without --model a tiny built-in SDXL-shaped pipeline (random weights) runs
offline on a CPU.  --model is a local diffusers folder.  Rank 0 saves the
image (default out/sdxl.png).
"""

import harness


def main(argv=None):
    p = harness.parser(__doc__, tiny="sdxl", warm_up=9, steps=50, guidance=5.0,
                   prompt="a woman with white crystal skin and an ice crown, fantasy art")
    args = harness.parse(p, argv)
    pipe = harness.load(args, "StableDiffusionXLPipeline")
    return harness.run(pipe, harness.call_kwargs(args), args)


if __name__ == "__main__":
    main()
