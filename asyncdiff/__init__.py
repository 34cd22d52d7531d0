"""asyncdiff: asynchronous denoising (AsyncDiff) for diffusers pipelines.

``AsyncDiff(pipe, model_n=2, stride=1, warm_up=1, time_shift=False)`` cuts the
pipeline's denoiser into ``model_n`` components, one per rank, and runs them
at the same time after ``warm_up`` steps.  Launched with
``torchrun --nproc_per_node=model_n+stride-1`` each process is one rank;
without torchrun one process plays every rank in turn (emulation).
"""

from ._core import AsyncDiffError, AsyncDiffPeerError
from ._version import __version__
from .attach import AsyncDiff
from .config import AsyncDiffConfig

__all__ = ["AsyncDiff", "AsyncDiffConfig", "AsyncDiffError", "AsyncDiffPeerError", "__version__"]
