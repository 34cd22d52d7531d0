"""A small trained diffusion model that ships with the package: handwritten digits.

The weights in ``asyncdiff/demo/weights/`` were trained by
``examples/train_digits.py`` on scikit-learn's handwritten digits (8x8,
upsampled to 16x16, scaled to [-1, 1]).  Loading them needs no network and no
scikit-learn.

* :func:`load_pipeline` gives a :class:`DigitsPipeline`, a thin diffusers
  ``DiffusionPipeline`` (``unet`` + ``scheduler``, like ``DDIMPipeline``) whose
  call takes the digit labels to draw.  Its denoiser is a class-conditional
  ``UNet2DModel`` (class 10 = "no label", for classifier-free guidance); its
  scheduler is ``DDIMScheduler`` built from the saved config.  Every denoising
  step makes exactly one denoiser call (guidance is batched into it), so
  ``AsyncDiff`` attaches to it like to any diffusers pipeline.
* :func:`classifier` gives a tiny MLP digit classifier trained on the same
  images, to measure sample quality (:meth:`DigitClassifier.classify`).
* :func:`to_grid` lays images out in a PIL grid.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

__all__ = [
    "RESOLUTION",
    "NUM_CLASSES",
    "WEIGHTS",
    "DigitsPipeline",
    "DigitClassifier",
    "load_pipeline",
    "classifier",
    "psnr",
    "to_grid",
    "to_tensor01",
    "load_digit_images",
]

RESOLUTION = 16
NUM_CLASSES = 10
WEIGHTS = Path(__file__).resolve().parent / "weights"
UNET_DIR = "digits-unet"
SCHEDULER_DIR = "digits-scheduler"
CLASSIFIER_FILE = "digits-classifier.safetensors"
DEFAULT_GUIDANCE = 2.0


# ------------------------------------------------------------------ pipeline
class DigitsPipeline(DiffusionPipeline):
    """Class-conditional digit sampling: ``pipe([3, 1, 4], num_inference_steps=50)``.

    ``unet`` is a ``UNet2DModel`` with ``num_class_embeds = NUM_CLASSES + 1``
    (the last class means "no label"); ``scheduler`` any diffusers scheduler
    (``load_pipeline`` uses DDIM).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def null_class(self) -> int:
        return int(self.unet.config.num_class_embeds) - 1

    def _labels(self, labels) -> torch.Tensor:
        if isinstance(labels, int):
            labels = [labels]
        y = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
        if y.numel() == 0:
            raise ValueError("labels: need at least one label")
        if int(y.min()) < 0 or int(y.max()) >= self.null_class:
            raise ValueError(f"labels: digits must be in 0..{self.null_class - 1}, got {y.tolist()}")
        return y

    @torch.no_grad()
    def __call__(
        self,
        labels,
        num_inference_steps: int = 50,
        generator: torch.Generator | list | None = None,
        guidance_scale: float = DEFAULT_GUIDANCE,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Draw one image per label.

        ``guidance_scale > 1`` applies classifier-free guidance (the labelled
        and the unlabelled halves go through the denoiser in one batched
        call).  ``output_type``: ``"pil"`` (list of grey PIL images),
        ``"np"`` (float array ``(B, H, W, 1)`` in [0, 1]) or ``"pt"`` (tensor
        ``(B, 1, H, W)`` in [0, 1]).
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type: expected 'pil', 'np' or 'pt', got {output_type!r}")
        y = self._labels(labels)
        guided = guidance_scale > 1.0
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
        hw = (size, size) if isinstance(size, int) else size
        shape = (len(y), cfg.in_channels, *hw)
        device, dtype = self._execution_device, self.unet.dtype
        sample = randn_tensor(shape, generator=generator, device=device, dtype=dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        sample = sample * self.scheduler.init_noise_sigma
        cond = y.to(device)
        if guided:
            cond = torch.cat([cond, torch.full_like(cond, self.null_class)])
        accepted = inspect.signature(self.scheduler.step).parameters
        step_kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}

        for t in self.progress_bar(self.scheduler.timesteps):
            x = torch.cat([sample, sample]) if guided else sample
            x = self.scheduler.scale_model_input(x, t)
            eps = self.unet(x, t, class_labels=cond).sample  # the one denoiser call of this step
            if guided:
                eps_c, eps_u = eps.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            sample = self.scheduler.step(eps, t, sample, **step_kwargs).prev_sample

        images = (sample.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            out = images
        else:
            out = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                out = self.numpy_to_pil(out)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (out,)
        return ImagePipelineOutput(images=out)


def load_pipeline(device="cpu", dtype=torch.float32, weights: str | Path | None = None) -> DigitsPipeline:
    """The shipped digits model as a :class:`DigitsPipeline` (offline: only local files are read)."""
    root = Path(weights) if weights is not None else WEIGHTS
    unet_dir, sched_dir = root / UNET_DIR, root / SCHEDULER_DIR
    for d in (unet_dir, sched_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"digits model: {d} is missing (train it with examples/train_digits.py)")
    unet = UNet2DModel.from_pretrained(unet_dir, torch_dtype=dtype, local_files_only=True, low_cpu_mem_usage=False)
    scheduler = DDIMScheduler.from_pretrained(sched_dir, local_files_only=True)
    pipe = DigitsPipeline(unet=unet.eval(), scheduler=scheduler)
    return pipe.to(device)


# ---------------------------------------------------------------- classifier
class DigitClassifier(nn.Module):
    """MLP on ``resolution x resolution`` grey images in [0, 1]."""

    def __init__(self, resolution: int = RESOLUTION, hidden: int = 64, classes: int = NUM_CLASSES):
        super().__init__()
        self.resolution, self.hidden, self.classes = resolution, hidden, classes
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(resolution * resolution, hidden),
            nn.GELU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(len(x), -1))

    @torch.no_grad()
    def classify(self, images) -> torch.Tensor:
        """Predicted digit per image (long tensor); images as for :func:`to_tensor01`."""
        x = to_tensor01(images)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = nn.functional.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", align_corners=False)
        p = next(self.parameters())
        return self(x.to(p.device, p.dtype)).argmax(1).cpu()

    @torch.no_grad()
    def accuracy(self, images, labels) -> float:
        y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        return (self.classify(images) == y).float().mean().item()

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        meta = {"resolution": str(self.resolution), "hidden": str(self.hidden), "classes": str(self.classes)}
        meta.update({k: str(v) for k, v in (extra or {}).items()})
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "DigitClassifier":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        model = cls(int(meta.get("resolution", RESOLUTION)), int(meta.get("hidden", 64)),
                    int(meta.get("classes", NUM_CLASSES)))
        model.load_state_dict(load_file(str(path)))
        return model.eval()


def classifier(weights: str | Path | None = None) -> DigitClassifier:
    """The shipped digit classifier (CPU, eval mode)."""
    root = Path(weights) if weights is not None else WEIGHTS
    return DigitClassifier.load(root / CLASSIFIER_FILE)


# -------------------------------------------------------------------- images
def to_tensor01(images) -> torch.Tensor:
    """Grey images as a float tensor ``(B, 1, H, W)`` in [0, 1].

    Accepts a list of PIL images, an array ``(B, H, W)`` / ``(B, H, W, C)``
    (numpy, channels last, as diffusers' ``"np"`` output) or a tensor
    ``(B, C, H, W)`` / ``(B, H, W)`` (torch, channels first, as ``"pt"``),
    floats in [0, 1] or uint8.  Colour is averaged to grey.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images: empty")
        if all(hasattr(im, "convert") for im in images):
            arr = np.stack([np.asarray(im.convert("L"), dtype=np.float32) / 255.0 for im in images])
            return torch.from_numpy(arr)[:, None]
        images = np.stack([np.asarray(im) for im in images])
    if isinstance(images, np.ndarray):
        arr = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
        if arr.ndim == 3:
            arr = arr[..., None]
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        x = images.detach().cpu()
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.ndim == 3:
            x = x[:, None]
    else:
        raise TypeError(f"images: expected PIL images, an array or a tensor, got {type(images).__name__}")
    if x.ndim != 4:
        raise ValueError(f"images: expected a batch of images, got shape {tuple(x.shape)}")
    if x.shape[1] != 1:
        x = x.mean(1, keepdim=True)
    return x


def psnr(a, b, peak: float = 1.0, per_image: bool = False):
    """PSNR in dB between images in [0, peak] (arrays or CPU tensors of the
    same shape): of the whole batch (one mean squared error), or of each
    image (``per_image``: an array, first axis); inf where they are equal."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    err = (a - b) ** 2
    mse = err.reshape(len(a), -1).mean(axis=1) if per_image else err.mean()
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(peak * peak / mse)


def to_grid(images, nrow: int, scale: int = 4, pad: int = 1):
    """PIL grid of ``images`` (as for :func:`to_tensor01`, grey or RGB), ``nrow`` per row.

    Each image is enlarged ``scale`` times (nearest neighbour) and framed by
    ``pad`` pixels of mid grey.
    """
    from PIL import Image

    if nrow < 1:
        raise ValueError(f"nrow: must be >= 1, got {nrow}")
    rgb = _to_rgb_uint8(images)  # (B, H, W, 3)
    b, h, w, _ = rgb.shape
    if scale > 1:
        rgb = rgb.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    cols = min(nrow, b)
    rows = (b + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 128, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = rgb[i]
    return Image.fromarray(grid)


def _to_rgb_uint8(images) -> np.ndarray:
    if isinstance(images, (list, tuple)) and images and all(hasattr(im, "convert") for im in images):
        return np.stack([np.asarray(im.convert("RGB")) for im in images])
    if isinstance(images, torch.Tensor):
        x = images.detach().cpu().float()
        if x.ndim == 3:
            x = x[:, None]
        arr = x.permute(0, 2, 3, 1).numpy()
    else:
        arr = np.asarray(images)
        if arr.ndim == 3:
            arr = arr[..., None]
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr[..., :3]


# ---------------------------------------------------------------------- data
def load_digit_images(resolution: int = RESOLUTION):
    """scikit-learn's digits upsampled to ``resolution`` (bilinear): ``(images (N,1,R,R) in [0,1], labels)``.

    Needs scikit-learn (only the training script and optional checks use it).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("load_digit_images needs scikit-learn: pip install scikit-learn") from exc
    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]
    if resolution != x.shape[-1]:
        x = nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).contiguous(), torch.from_numpy(data.target.astype(np.int64))


def training_info(weights: str | Path | None = None) -> dict:
    """What ``examples/train_digits.py`` recorded about the shipped weights ({} when absent)."""
    path = (Path(weights) if weights is not None else WEIGHTS) / "digits-training.json"
    return json.loads(path.read_text()) if path.is_file() else {}
