"""AnimateDiff (text to video on an SD 1.5 base) with AsyncDiff.

    torchrun --nproc_per_node=2 examples/run_animatediff.py --model_n 2 --stride 1
    torchrun --nproc_per_node=2 examples/run_animatediff.py --model /models/epiCRealism \\
        --motion_adapter /models/animatediff-motion-adapter-v1-5-2
    python examples/run_animatediff.py   # one process plays every rank (emulation)

With --model the scheduler is replaced by AnimateDiff's usual DDIM set-up
(linear betas, linspace spacing).  Without --model a tiny built-in
AnimateDiff-shaped pipeline (random weights) makes 3 frames, offline on a
CPU.  Rank 0 saves the frames as a GIF (default out/animatediff.gif).
"""

import harness


def main(argv=None):
    p = harness.parser(__doc__, tiny="animatediff", warm_up=2, steps=50, guidance=7.5, frames=True,
                   prompt="Brilliant fireworks, high quality",
                   negative_prompt="bad quality, worse quality, low resolution")
    p.add_argument("--motion_adapter", default=None, metavar="DIR",
                   help="local MotionAdapter folder (needed with --model)")
    args = harness.parse(p, argv)
    if args.model is None:
        pipe = harness.load(args, "AnimateDiffPipeline")
    else:
        if args.motion_adapter is None:
            p.error("--motion_adapter is required with --model")
        from diffusers import DDIMScheduler

        adapter = harness.load_component(args, "MotionAdapter", args.motion_adapter)
        pipe = harness.load(args, "AnimateDiffPipeline", motion_adapter=adapter)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, beta_schedule="linear",
                                                   timestep_spacing="linspace", clip_sample=False, steps_offset=1)
    kwargs = harness.call_kwargs(args)
    if args.model is not None:
        kwargs.setdefault("num_frames", 16)
    return harness.run(pipe, kwargs, args)


if __name__ == "__main__":
    main()
