"""asyncdiff: asynchronous denoising (AsyncDiff) for diffusers pipelines.

``AsyncDiff(pipe, model_n=2, stride=1, warm_up=1, time_shift=False)`` cuts the
pipeline's denoiser into ``model_n`` components, one per rank, and runs them
at the same time after ``warm_up`` steps.  Launched with
``torchrun --nproc_per_node=model_n+stride-1`` each process is one rank;
without torchrun one process plays every rank in turn (emulation).
"""

from .attach import AsyncDiff

__all__ = ["AsyncDiff"]
__version__ = "0.1.0"
