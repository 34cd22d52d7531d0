"""Stable Diffusion x4 upscaler with AsyncDiff.

    torchrun --nproc_per_node=2 examples/run_upscaler.py --model_n 2 --stride 1
    torchrun --nproc_per_node=2 examples/run_upscaler.py --model /models/sd-x4-upscaler --image cat_128.png
    python examples/run_upscaler.py      # one process plays every rank (emulation)

--image is the low-resolution image (the output is 4x its size).  Without
--model a tiny built-in upscaler-shaped pipeline (random weights) enlarges a
16x16 test pattern, offline on a CPU.  Rank 0 saves the image (default
out/upscaler.png).
"""

import harness


def main(argv=None):
    p = harness.parser(__doc__, tiny="upscaler", warm_up=1, steps=75, guidance=9.0,
                   prompt="a white cat", image=True, size=False)
    p.add_argument("--noise_level", type=int, default=20, help="noise added to the low-resolution image")
    args = harness.parse(p, argv)
    pipe = harness.load(args, "StableDiffusionUpscalePipeline")
    kwargs = harness.call_kwargs(args)
    kwargs["noise_level"] = args.noise_level
    return harness.run(pipe, kwargs, args)


if __name__ == "__main__":
    main()
