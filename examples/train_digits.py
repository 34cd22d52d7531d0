"""Train the built-in digits model shipped in ``asyncdiff/demo/weights/``.

    python examples/train_digits.py                  # ~9 CPU-minutes on one core
    python examples/train_digits.py --steps 50 --out /tmp/w   # quick smoke run

What it trains, from scikit-learn's handwritten digits (``load_digits``: 1797
grey 8x8 images, bundled with scikit-learn, no download):

* a class-conditional DDPM denoiser (diffusers ``UNet2DModel``, epsilon
  prediction, 1000 training timesteps) on the digits upsampled to 16x16 and
  scaled to [-1, 1].  Class 10 is the "no label" class: labels are dropped
  to it at random during training so that sampling can use classifier-free
  guidance.  The exponential moving average of the weights is what is saved,
  in float16, with ``save_pretrained(..., safe_serialization=True)``;
* a small MLP digit classifier on the same 16x16 images, used to score the
  samples (``asyncdiff.demo.digits.classifier``).

The shipped weights come from the defaults (1500 steps of 64 images, one
torch thread): 538 s of CPU time, 12 min 44 s of wall time on a 2-core machine
shared with other jobs.  One thread is deliberate: on a busy CPU two threads
made each step several times slower.

Everything is seeded; with the same ``--steps``, ``--batch`` and thread count
two runs give the same weights.  scikit-learn is needed here only: the
package itself loads the shipped files.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from asyncdiff.demo import digits

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "asyncdiff" / "weights"

# The denoiser: three resolutions (16, 8, 4), self-attention at 8x8 and 4x4.
UNET_CONFIG = dict(
    sample_size=digits.RESOLUTION,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=16,
    attention_head_dim=32,
    num_class_embeds=digits.NUM_CLASSES + 1,  # + the "no label" class
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    clip_sample=True,
    clip_sample_range=1.0,
    timestep_spacing="trailing",
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def shift_batch(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Move every image by up to ``max_shift`` pixels in each direction (zero fill = background)."""
    if max_shift <= 0:
        return x
    pad = F.pad(x, (max_shift,) * 4, value=float(x.min()))
    n, _, h, w = x.shape
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return out


# ---------------------------------------------------------------- classifier
def train_classifier(images01: torch.Tensor, labels: torch.Tensor, seed: int, epochs: int):
    """MLP on [0, 1] images; trained on 80 %, accuracy reported on the held-out 20 %."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(len(labels), generator=gen)
    n_test = len(labels) // 5
    test, train = perm[:n_test], perm[n_test:]
    model = digits.DigitClassifier(digits.RESOLUTION, hidden=64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    xs, ys = images01[train], labels[train]
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(ys), generator=gen)
        for i in range(0, len(ys), 64):
            idx = order[i:i + 64]
            x = shift_batch(xs[idx], gen, 1)
            x = (x + 0.08 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
            loss = F.cross_entropy(model(x), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(images01[test]).argmax(1) == labels[test]).float().mean().item()
    return model, acc


# ------------------------------------------------------------------ denoiser
def train_denoiser(images: torch.Tensor, labels: torch.Tensor, args):
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    unet = UNet2DModel(**UNET_CONFIG)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    n_params = sum(p.numel() for p in unet.parameters())
    log(f"UNet2DModel: {n_params:,} parameters ({n_params * 2 / 2**20:.2f} MiB in float16)")
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    null = digits.NUM_CLASSES
    warm = min(100, args.steps // 10 + 1)

    def lr_at(step):
        if step < warm:
            return args.lr * (step + 1) / warm
        frac = (step - warm) / max(1, args.steps - warm)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    n = len(labels)
    order = torch.randperm(n, generator=gen)
    pos = 0
    start = time.perf_counter()
    running = None
    unet.train()
    for step in range(args.steps):
        if pos + args.batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + args.batch]
        pos += args.batch
        x0 = images[idx]
        y = labels[idx].clone()
        y[torch.rand(len(y), generator=gen) < args.p_uncond] = null
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(y),), generator=gen)
        xt = sched.add_noise(x0, noise, t)
        loss = F.mse_loss(unet(xt, t, class_labels=y).sample, noise)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            el = time.perf_counter() - start
            log(f"step {step:5d}/{args.steps}  loss {running:.4f}  lr {lr_at(step):.2e}  {el:6.0f} s")
        if args.max_minutes and time.perf_counter() - start > args.max_minutes * 60:
            log(f"time limit reached at step {step + 1}; stopping (weights not reproducible from --steps)")
            break
    return ema, sched, time.perf_counter() - start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500, help="optimiser steps of the denoiser")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved weights")
    ap.add_argument("--p_uncond", type=float, default=0.1, help="label dropout (classifier-free guidance)")
    ap.add_argument("--classifier_epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    ap.add_argument("--max_minutes", type=float, default=0.0, help="stop early after this long (0: never)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    images01, labels = digits.load_digit_images()  # needs scikit-learn
    log(f"digits: {tuple(images01.shape)} images, labels {labels.min().item()}..{labels.max().item()}")

    clf, acc = train_classifier(images01, labels, args.seed, args.classifier_epochs)
    log(f"classifier: held-out accuracy {acc:.4f}")

    ema, sched, dt = train_denoiser(images01 * 2 - 1, labels, args)
    log(f"denoiser trained in {dt:.0f} s")

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # casting the EMA copy to float16 for storage is intended
    try:
        ema.to(torch.float16).save_pretrained(out / digits.UNET_DIR, safe_serialization=True)
    finally:
        dlog.set_verbosity(level)
    sched.save_pretrained(out / digits.SCHEDULER_DIR)
    clf.save(out / digits.CLASSIFIER_FILE, extra={"heldout_accuracy": f"{acc:.4f}"})
    info = {
        "denoiser_steps": args.steps, "batch": args.batch, "lr": args.lr, "ema": args.ema,
        "p_uncond": args.p_uncond, "seed": args.seed, "threads": args.threads,
        "classifier_heldout_accuracy": round(acc, 4), "train_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "digits-training.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"saved to {out} ({info['train_seconds']} s in all)")


if __name__ == "__main__":
    main()
