"""Stable Diffusion 3 (MMDiT transformer) with AsyncDiff.

    torchrun --nproc_per_node=2 examples/run_sd3.py --model_n 2 --stride 1
    torchrun --nproc_per_node=2 examples/run_sd3.py --model /models/sd3-medium-diffusers
    python examples/run_sd3.py           # one process plays every rank (emulation)

The transformer's joint blocks are split into model_n equal runs.  Without
--model a tiny built-in SD3-shaped pipeline (random weights) runs offline on
a CPU.  Rank 0 saves the image (default out/sd3.png).
"""

import harness


def main(argv=None):
    p = harness.parser(__doc__, tiny="sd3", warm_up=1, steps=28, guidance=7.0,
                   prompt="A cat holding a sign that says hello world", negative_prompt="")
    args = harness.parse(p, argv)
    pipe = harness.load(args, "StableDiffusion3Pipeline")
    return harness.run(pipe, harness.call_kwargs(args), args)


if __name__ == "__main__":
    main()
