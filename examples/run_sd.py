"""Stable Diffusion 1.x / 2.x with AsyncDiff.

    torchrun --nproc_per_node=2 examples/run_sd.py --model_n 2 --stride 1
    torchrun --nproc_per_node=4 examples/run_sd.py --model_n 3 --stride 2 --model /models/sd-2-1
    python examples/run_sd.py            # one process plays every rank (emulation)

Without --model a tiny built-in SD 1.5-shaped pipeline (random weights;
--tiny sd21 for the SD 2.x shape) runs offline on a CPU.  --model is a local
diffusers folder.  Rank 0 saves the image (default out/sd.png).
"""

import harness


def main(argv=None):
    p = harness.parser(__doc__, tiny=("sd15", "sd21"), out="sd", warm_up=9, steps=50,
                   prompt="A kitten that is sitting down by a door", guidance=7.5)
    args = harness.parse(p, argv)
    pipe = harness.load(args, "StableDiffusionPipeline")
    return harness.run(pipe, harness.call_kwargs(args), args)


if __name__ == "__main__":
    main()
