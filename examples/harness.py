"""What every example script shares: flags, loading, placement, the timed run.

An example script describes its pipeline family and nothing else::

    p = cli.parser(__doc__, tiny="sdxl", warm_up=9, steps=50, prompt="...")
    args = cli.parse(p, argv)
    pipe = cli.load(args, "StableDiffusionXLPipeline")
    return cli.run(pipe, cli.call_kwargs(args), args)

Flags kept from the original project's scripts: ``--model``, ``--prompt``,
``--seed``, ``--model_n``, ``--stride``, ``--warm_up``, ``--time_shift``.
Unlike there, ``--time_shift`` is a real boolean (``--time_shift false`` is
False) and ``--model`` is a *local* diffusers folder: nothing is downloaded.
Without ``--model`` the family's tiny built-in pipeline (``asyncdiff.testing.tiny``,
random weights) runs, with its own small sizes and inputs, so every example
works offline on a CPU.

Launch under ``torchrun --nproc_per_node=M`` (``M = model_n + stride - 1``),
or as a plain ``python`` process, which plays every rank in turn.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from asyncdiff import AsyncDiff, launch
from asyncdiff.config import add_arguments, from_args, int_at_least, str2bool

__all__ = ["str2bool", "parser", "parse", "load", "load_component", "load_image", "call_kwargs", "run", "save"]

TINY_STEPS = 12  # default step count for the tiny models (past the largest default warm-up, 9)

_positive_int = int_at_least(1)
_count = int_at_least(0)


# ---------------------------------------------------------------- the parser
def parser(
    description: str | None,
    *,
    tiny: str | tuple[str, ...],
    warm_up: int,
    steps: int,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    guidance: float | None = None,
    image: bool = False,
    mask: bool = False,
    size: bool = True,
    frames: bool = False,
    out: str | None = None,
) -> argparse.ArgumentParser:
    """The shared flags, with this family's defaults.

    tiny: the ``asyncdiff.testing.tiny`` arch used without ``--model`` (a tuple offers
        a ``--tiny`` choice, the first being the default).
    warm_up, steps: defaults for a real model (the original scripts' values);
        the tiny models default to :data:`TINY_STEPS` steps.
    prompt: the default prompt, or None for a family that takes none.
    image, mask: the family takes an input image (``--image``), a mask (``--mask``).
    size: offer ``--height``/``--width``; frames: offer ``--num_frames``.
    out: the default output file (its stem; the suffix follows the result).
    """
    archs = (tiny,) if isinstance(tiny, str) else tuple(tiny)
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.set_defaults(tiny=archs[0], has_prompt=prompt is not None, has_image=image, has_mask=mask)

    g = ap.add_argument_group("model and inputs")
    g.add_argument("--model", default=None, metavar="DIR",
                   help="local diffusers folder (default: the tiny built-in %s pipeline, random weights)" % archs[0])
    if len(archs) > 1:
        g.add_argument("--tiny", choices=archs, default=archs[0], help="which tiny model without --model")
    if prompt is not None:
        g.add_argument("--prompt", default=prompt)
        g.add_argument("--negative_prompt", default=negative_prompt)
    if image:
        g.add_argument("--image", default=None, metavar="FILE",
                       help="input image (default without --model: the tiny model's test pattern)")
    if mask:
        g.add_argument("--mask", default=None, metavar="FILE", help="inpainting mask, white = repaint")
    g.add_argument("--seed", type=int, default=20)
    g.add_argument("--steps", type=_positive_int, default=None,
                   help=f"denoising steps (default: {steps}, or {TINY_STEPS} with the tiny model)")
    if guidance is not None:
        g.add_argument("--guidance_scale", type=float, default=guidance)
    if size:
        g.add_argument("--height", type=_positive_int, default=None, help="default: the pipeline's (tiny: 128)")
        g.add_argument("--width", type=_positive_int, default=None, help="default: the pipeline's (tiny: 128)")
    if frames:
        g.add_argument("--num_frames", type=_positive_int, default=None,
                       help="default: the family's (tiny: 3)")
    g.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                   help="weights of --model: auto = fp16 on CUDA, fp32 on CPU")

    add_arguments(ap, warm_up=warm_up)

    r = ap.add_argument_group("run")
    r.add_argument("--out", default=None, metavar="FILE",
                   help=f"where rank 0 saves the result (default: out/{out or archs[0]}.<png|gif|pt>)")
    r.add_argument("--output_type", choices=("pil", "latent"), default="pil",
                   help="latent: skip the VAE decode and save the latents (.pt)")
    r.add_argument("--threads", type=_positive_int, default=None, help="torch intra-op threads (default: torch's)")
    r.add_argument("--prerun", type=_count, default=None,
                   help="untimed calls before the timed one (default: 1 on CUDA, 0 on CPU)")
    ap.set_defaults(family_steps=steps, out_stem=out or archs[0])
    return ap


def parse(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, check what needs a real model, fill in the defaults that depend on it."""
    args = ap.parse_args(argv)
    args.asyncdiff = from_args(ap, args)  # every AsyncDiff flag checked before any model is loaded
    if args.model is not None:
        if args.has_image and args.image is None:
            ap.error("--image is required with --model")
        if args.has_mask and args.mask is None:
            ap.error("--mask is required with --model")
    if args.steps is None:
        args.steps = args.family_steps if args.model is not None else TINY_STEPS
    if args.prerun is None:
        args.prerun = 1 if torch.cuda.is_available() else 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


# ------------------------------------------------------------------- loading
def device() -> torch.device:
    """This rank's device (``cuda:LOCAL_RANK`` when CUDA is available, else the CPU)."""
    return launch.rank_device()


def dtype(args) -> torch.dtype:
    named = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if args.dtype in named:
        return named[args.dtype]
    return torch.float16 if torch.cuda.is_available() else torch.float32


def _dtype_keyword() -> str:
    """``dtype`` where diffusers takes it (``torch_dtype`` is deprecated there), else ``torch_dtype``."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:  # pragma: no cover - older diffusers
        return "torch_dtype"
    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _from_pretrained(cls, path: str, args, **extra):
    extra[_dtype_keyword()] = dtype(args)
    return cls.from_pretrained(path, local_files_only=True, **extra)


def load_component(args, class_name: str, path: str):
    """A model (ControlNet, motion adapter, ...) from a local folder."""
    import diffusers

    cls = getattr(diffusers, class_name)
    return _from_pretrained(cls, path, args)


def load(args, class_name: str, **components):
    """The family's pipeline on this rank's device: ``class_name.from_pretrained(--model)``
    (extra ``components`` passed through), or the tiny built-in pipeline."""
    if args.model is None:
        from asyncdiff.testing import tiny

        pipe = tiny.build_pipeline(args.tiny, seed=0)
    else:
        import diffusers

        cls = getattr(diffusers, class_name)
        pipe = _from_pretrained(cls, args.model, args, **components)
    pipe.set_progress_bar_config(disable=True)
    dev = device()
    if dev.type == "cuda":
        pipe.to(dev)
    return pipe


def load_image(path: str, mode: str = "RGB"):
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        return ImageOps.exif_transpose(img).convert(mode)


def call_kwargs(args) -> dict:
    """The pipeline-call arguments every family shares.

    Without ``--model`` they start from the tiny model's own (its sizes and
    deterministic input images); the flags given here override them.  The
    example adds its family's own arguments on top."""
    kw: dict = {}
    tiny_image_size = None
    if args.model is None:
        from asyncdiff.testing import tiny

        kw.update(tiny.default_call_kwargs(args.tiny, seed=0))
        if "image" in kw and hasattr(kw["image"], "size"):
            tiny_image_size = kw["image"].size
    torch.manual_seed(args.seed)
    kw["generator"] = torch.Generator("cpu").manual_seed(args.seed)
    kw["num_inference_steps"] = args.steps
    kw["output_type"] = args.output_type
    if args.has_prompt:
        kw["prompt"] = args.prompt
        if args.negative_prompt is not None:
            kw["negative_prompt"] = args.negative_prompt
    if getattr(args, "guidance_scale", None) is not None:
        kw["guidance_scale"] = args.guidance_scale
    for name in ("height", "width", "num_frames"):
        if getattr(args, name, None) is not None:
            kw[name] = getattr(args, name)
    if args.has_image and args.image is not None:
        img = load_image(args.image)
        kw["image"] = img.resize(tiny_image_size) if tiny_image_size else img
    if args.has_mask and args.mask is not None:
        m = load_image(args.mask, "L")
        kw["mask_image"] = m.resize(tiny_image_size) if tiny_image_size else m
    return kw


# ------------------------------------------------------------------ the run
def _sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _result(output):
    """(kind, payload) of a pipeline output: ("image", PIL), ("video", [PIL...])
    or ("latent", tensor)."""
    frames = getattr(output, "frames", None)
    if frames is not None:
        if isinstance(frames, torch.Tensor):
            return "latent", frames
        return "video", list(frames[0])
    images = output.images
    if isinstance(images, torch.Tensor):
        return "latent", images
    if not isinstance(images, list):  # numpy
        from diffusers.utils import numpy_to_pil

        images = numpy_to_pil(images)
    return "image", images[0]


_SUFFIX = {"image": ".png", "video": ".gif", "latent": ".pt"}
_ALLOWED = {"image": (".png", ".jpg", ".jpeg", ".webp", ".bmp"), "video": (".gif", ".png"), "latent": (".pt",)}


def save(output, path: str | os.PathLike, fps: int = 8) -> Path:
    """Save a pipeline output: an image as PNG (or the suffix given), a video
    as a GIF (or, for ``.png``, a strip of its frames side by side), latents
    as a ``.pt`` tensor file.  A suffix that does not fit the result is
    replaced.  Returns the path written."""
    kind, payload = _result(output)
    path = Path(path)
    if path.suffix.lower() not in _ALLOWED[kind]:
        path = path.with_suffix(_SUFFIX[kind])
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "latent":
        torch.save(payload.detach().to("cpu"), path)
    elif kind == "image":
        payload.save(path)
    elif path.suffix.lower() == ".png":
        from PIL import Image

        w, h = payload[0].size
        strip = Image.new("RGB", (w * len(payload), h))
        for i, frame in enumerate(payload):
            strip.paste(frame.convert("RGB"), (i * w, 0))
        strip.save(path)
    else:
        payload[0].save(path, save_all=True, append_images=payload[1:], duration=round(1000 / fps), loop=0)
    return path


def run(pipe, kwargs: dict, args, *, fps: int = 8) -> Path | None:
    """Attach AsyncDiff, time one pipeline call, print one line per rank,
    save the result on rank 0, detach.  Returns the saved path (None on the
    other ranks)."""
    c = args.asyncdiff
    ad = AsyncDiff(pipe, c.model_n, c.stride, c.warm_up, c.time_shift, split=c.split, transport=c.transport,
                   timeout=c.timeout, keep_weights=c.keep_weights, encoders=c.encoders, cfg_parallel=c.cfg_parallel)
    dev = device()
    try:
        for _ in range(args.prerun):
            pipe(**{**kwargs, "generator": torch.Generator("cpu").manual_seed(args.seed)})
        kwargs = {**kwargs, "generator": torch.Generator("cpu").manual_seed(args.seed)}
        _sync(dev)
        start = time.perf_counter()
        output = pipe(**kwargs)
        _sync(dev)
        elapsed = time.perf_counter() - start
        path = None
        if ad.rank == 0:
            path = save(output, args.out or f"out/{args.out_stem}{_SUFFIX[_result(output)[0]]}", fps=fps)
        split = f"{ad.split.source}: {ad.split}" if ad.split is not None else "none"
        tail = f" -> {path}" if path is not None else ""
        print(f"rank {ad.rank}/{ad.world_size} ({ad.mode}, split: {split}): {elapsed:.2f} s{tail}", flush=True)
        return path
    finally:
        ad.remove()
