"""ControlNet-SDXL with AsyncDiff (the UNet is split; the ControlNet runs whole).

    torchrun --nproc_per_node=2 examples/run_sdxl_controlnet.py --model_n 2 --stride 1
    torchrun --nproc_per_node=2 examples/run_sdxl_controlnet.py --model /models/sdxl-base-1.0 \\
        --controlnet /models/controlnet-canny-sdxl-1.0 --image edges.png
    python examples/run_sdxl_controlnet.py   # one process plays every rank (emulation)

--image is the conditioning image itself (for a Canny ControlNet: the edge
map).  Without --model a tiny built-in SDXL + ControlNet pair (random weights)
runs on a line drawing, offline on a CPU.  Rank 0 saves the image (default
out/sdxl_controlnet.png).
"""

import harness


def main(argv=None):
    p = harness.parser(__doc__, tiny="sdxl_controlnet", warm_up=3, steps=50, guidance=5.0,
                   prompt="aerial view, a futuristic research complex in a bright foggy jungle, hard lighting",
                   negative_prompt="low quality, bad quality, sketches", image=True)
    p.add_argument("--controlnet", default=None, metavar="DIR", help="local ControlNet folder (needed with --model)")
    p.add_argument("--conditioning_scale", type=float, default=0.5, help="controlnet_conditioning_scale")
    args = harness.parse(p, argv)
    if args.model is not None and args.controlnet is None:
        p.error("--controlnet is required with --model")
    extra = {}
    if args.model is not None:
        extra["controlnet"] = harness.load_component(args, "ControlNetModel", args.controlnet)
    pipe = harness.load(args, "StableDiffusionXLControlNetPipeline", **extra)
    kwargs = harness.call_kwargs(args)
    kwargs["controlnet_conditioning_scale"] = args.conditioning_scale
    return harness.run(pipe, kwargs, args)


if __name__ == "__main__":
    main()
