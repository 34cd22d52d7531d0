"""SDXL inpainting with AsyncDiff (the SDXL UNet presets).

    torchrun --nproc_per_node=2 examples/run_sdxl_inpaint.py --model_n 2 --stride 1
    torchrun --nproc_per_node=2 examples/run_sdxl_inpaint.py --model /models/sdxl-inpainting \\
        --image photo.png --mask mask.png
    python examples/run_sdxl_inpaint.py  # one process plays every rank (emulation)

The mask is white where the image is repainted.  Without --model a tiny
built-in SDXL-inpainting-shaped pipeline (random weights) repaints the centre
of a test pattern, offline on a CPU.  Rank 0 saves the image (default
out/sdxl_inpaint.png).
"""

import harness


def main(argv=None):
    p = harness.parser(__doc__, tiny="sdxl_inpaint", warm_up=1, steps=30, guidance=8.0,
                   prompt="a tiger sitting on a park bench", image=True, mask=True)
    p.add_argument("--strength", type=float, default=0.99,
                   help="how much of the image is renoised (1.0: all of it)")
    args = harness.parse(p, argv)
    pipe = harness.load(args, "StableDiffusionXLInpaintPipeline")
    kwargs = harness.call_kwargs(args)
    kwargs["strength"] = args.strength
    return harness.run(pipe, kwargs, args)


if __name__ == "__main__":
    main()
