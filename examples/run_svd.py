"""Stable Video Diffusion (image to video) with AsyncDiff.

    torchrun --nproc_per_node=2 examples/run_svd.py --model_n 2 --stride 1
    torchrun --nproc_per_node=3 examples/run_svd.py --model_n 3 --model /models/svd-img2vid-xt \\
        --image rocket.png --width 1024 --height 576
    python examples/run_svd.py           # one process plays every rank (emulation)

Without --model a tiny built-in SVD-shaped pipeline (random weights) animates
a test pattern into 3 frames, offline on a CPU.  Rank 0 saves the frames as a
GIF (default out/svd.gif; an --out ending in .png gets a strip of the frames).
"""

import harness


def main(argv=None):
    p = harness.parser(__doc__, tiny="svd", warm_up=1, steps=50, image=True, frames=True)
    p.add_argument("--fps", type=int, default=7)
    p.add_argument("--motion_bucket_id", type=int, default=127)
    p.add_argument("--noise_aug_strength", type=float, default=0.02)
    p.add_argument("--decode_chunk_size", type=int, default=8, help="frames the VAE decodes at once")
    args = harness.parse(p, argv)
    pipe = harness.load(args, "StableVideoDiffusionPipeline")
    kwargs = harness.call_kwargs(args)
    kwargs.update(fps=args.fps, motion_bucket_id=args.motion_bucket_id,
                  noise_aug_strength=args.noise_aug_strength, decode_chunk_size=args.decode_chunk_size)
    return harness.run(pipe, kwargs, args, fps=args.fps)


if __name__ == "__main__":
    main()
