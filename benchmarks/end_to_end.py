"""End-to-end wall time: plain pipeline vs AsyncDiff over rank processes (CPU).

Rows, all measured in one run, each configuration in fresh processes:

* plain pipeline, 1 process x 1 thread (the baseline of the speed-ups);
* plain pipeline, 1 process x M threads (what the same cores give without AsyncDiff);
* AsyncDiff ``model_n=N, stride=S`` over M = N + S - 1 rank processes x 1
  thread each, shared-memory transport, started with the torchrun variables;
* AsyncDiff in-process: the same in one process, ``devices=["cpu"] * M``,
  one worker thread per rank (1 intra-op thread each), no torchrun;
* AsyncDiff with every step a warm-up step (``warm_up = steps``) over the M
  rank processes: with each rank holding only its own blocks, each step is a
  pipeline through the owners, i.e. one sequential step plus the copies (its
  time against the 1x1 row is the cost of warm-up with sharding);
* CFG parallel alone: ``model_n=1, cfg_parallel=True`` over 2 rank
  processes x 1 thread, each the whole UNet on its half of the guidance
  batch, the halves swapped after every step;
* CFG parallel alone in one process: ``model_n=1, cfg_parallel=True,
  devices=["cpu", "cpu"]``, one worker thread per half;
* (only when named in ``--rows``) ``asyncdiff-cfg``: ``model_n=N,
  cfg_parallel=True`` over 2 M rank processes x 1 thread (on a machine with
  fewer than 2 M cores it measures oversubscription, not the method).

Models:

* ``sd15``: a StableDiffusionPipeline whose UNet has the real SD 1.5
  configuration (full channel width, random weights from ``torch.manual_seed``),
  with the tiny text encoder/VAE of ``asyncdiff.testing.tiny`` (unused: the prompt
  embeddings are given directly, and ``output_type="latent"`` skips the VAE),
  at a reduced resolution (``--latent``, 16 -> 128x128 px), classifier-free
  guidance on (batch 2 per UNet call);
* ``digits``: the trained digits model (``asyncdiff.demo.digits``), skipped with a
  note when it is not available.

Time = wall time of the whole pipeline call after untimed warm-up call(s),
median of ``--repeat`` calls; for AsyncDiff from the first rank entering the
call to the last rank leaving it (all ranks meet at a barrier first).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sd15,digits", help="comma list of: sd15, digits")
    ap.add_argument("--latent", type=int, default=16, help="sd15 latent side (x8 = pixels); 16 -> 128x128 px")
    ap.add_argument("--steps", type=int, default=20, help="sd15 denoising steps")
    ap.add_argument("--unet", choices=("real", "tiny"), default="real",
                    help="sd15 UNet width: real (SD 1.5 config) or tiny (smoke tests only)")
    ap.add_argument("--guidance", type=float, default=7.5, help="sd15 guidance scale (> 1: batch 2 per call)")
    ap.add_argument("--digits-steps", type=int, default=50, help="digits denoising steps (DDIM)")
    ap.add_argument("--digits-images", type=int, default=10, help="digits images per call (labels 0..9 cycled)")
    ap.add_argument("--weights", default=None, help="digits weights folder (default: the shipped ones)")
    ap.add_argument("--model-n", type=int, default=2, help="AsyncDiff model_n")
    ap.add_argument("--stride", type=int, default=1, choices=(1, 2), help="AsyncDiff stride")
    ap.add_argument("--warm-up", type=int, default=1, help="AsyncDiff warm_up (the paper's speed-ups use 1)")
    ap.add_argument("--split", default=None, help="AsyncDiff split (default: paper preset, else auto)")
    ap.add_argument("--rows", default=None,
                    help="comma list of rows besides plain 1x1: plain, asyncdiff, threads, warm-up, cfg, cfg-threads, "
                         "asyncdiff-cfg (default: all but asyncdiff-cfg)")
    ap.add_argument("--repeat", type=int, default=3, help="timed pipeline calls per configuration (median)")
    ap.add_argument("--warmup-calls", type=int, default=1, help="untimed pipeline calls before timing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration before giving up")
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)  # set in the worker processes
    return ap.parse_args(argv)


# ------------------------------------------------------------------ worker
def build(model: str, args):
    import torch

    if model == "sd15":
        from diffusers import StableDiffusionPipeline, UNet2DConditionModel

        from asyncdiff.testing import tiny

        small = tiny.build_pipeline("sd15", seed=args.seed)
        cfg = tiny.real_config("sd15") if args.unet == "real" else tiny.tiny_config("sd15")
        torch.manual_seed(args.seed)
        unet = UNet2DConditionModel.from_config(cfg).eval()
        pipe = StableDiffusionPipeline(
            vae=small.vae, text_encoder=small.text_encoder, tokenizer=small.tokenizer, unet=unet,
            scheduler=small.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(args.seed + 1)
        dim = unet.config.cross_attention_dim
        cond = torch.randn(1, 77, dim, generator=g)
        uncond = torch.randn(1, 77, dim, generator=g)
        side = args.latent * pipe.vae_scale_factor

        def call():
            out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=side, width=side,
                       num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="latent",
                       generator=torch.Generator().manual_seed(args.seed))
            return out.images

        return pipe, call
    if model == "digits":
        from asyncdiff.demo import digits

        pipe = digits.load_pipeline(weights=args.weights)
        pipe.set_progress_bar_config(disable=True)
        labels = [i % 10 for i in range(args.digits_images)]

        def call():
            return pipe(labels, num_inference_steps=args.digits_steps, output_type="pt",
                        generator=torch.Generator().manual_seed(args.seed)).images

        return pipe, call
    raise ValueError(f"unknown model {model!r}")


def worker(args):
    import torch

    job = json.loads(args.job)
    _util.set_threads(job["threads"])
    torch.manual_seed(args.seed)
    pipe, call = build(job["model"], args)
    ad, barrier = None, (lambda: None)
    if job["mode"] in ("asyncdiff", "threads", "warm-up", "cfg", "cfg-threads", "asyncdiff-cfg"):
        from asyncdiff import AsyncDiff

        world = args.model_n + args.stride - 1
        # "warm-up": every call a warm-up call, i.e. (sharded) a pipeline through the owners
        warm_up = args.steps if job["mode"] == "warm-up" else args.warm_up
        # "cfg": CFG parallelism alone, one component per guidance half
        n, stride = (1, 1) if job["mode"] in ("cfg", "cfg-threads") else (args.model_n, args.stride)
        devices = {"threads": ["cpu"] * world, "cfg-threads": ["cpu"] * 2}.get(job["mode"])
        ad = AsyncDiff(pipe, model_n=n, stride=stride, warm_up=warm_up, split=None if n == 1 else args.split,
                       timeout=args.timeout, devices=devices,
                       cfg_parallel=job["mode"] in ("cfg", "cfg-threads", "asyncdiff-cfg"))
        # every rank enters each timed call together (the transport's barrier, when it has one)
        link = getattr(getattr(ad, "_mode", None), "transport", None)
        barrier = getattr(link, "barrier", None) or barrier
    with torch.no_grad():
        for _ in range(args.warmup_calls):
            barrier()
            call()
        spans = []
        for _ in range(args.repeat):
            barrier()
            t0 = time.perf_counter()  # CLOCK_MONOTONIC: comparable between the processes of one host
            out = call()
            spans.append((t0, time.perf_counter()))
    out = out.detach().float().cpu()
    result = {"spans": spans, "out": out.reshape(-1).tolist(), "shape": list(out.shape),
              "split": str(ad.split) if ad is not None else None,
              "rank": ad.rank if ad is not None else 0, "stats": ad.stats if ad is not None else {}}
    if ad is not None:
        ad.remove()
    _util.rank_result(result)


# ------------------------------------------------------------------ parent
def available(model: str, args) -> str | None:
    """None when ``model`` can run, else why not."""
    if model != "digits":
        return None
    try:
        from asyncdiff.demo import digits
    except ImportError as exc:
        return f"asyncdiff.demo.digits is missing ({exc})"
    try:
        root = Path(args.weights) if args.weights else digits.WEIGHTS
        for part in (digits.UNET_DIR, digits.SCHEDULER_DIR):
            if not (root / part).is_dir():
                return f"no digits weights in {root} (train them with examples/train_digits.py)"
    except AttributeError as exc:
        return f"asyncdiff.demo.digits has no {exc.name}"
    return None


def run_config(model: str, mode: str, procs: int, threads: int, args) -> dict:
    job = json.dumps({"model": model, "mode": mode, "threads": threads})
    argv = [a for a in sys.argv[1:]]
    results = _util.launch(Path(__file__).resolve(), argv + ["--job", job], world=procs, threads=threads,
                           silence=args.timeout, torchrun_env=mode in ("asyncdiff", "warm-up", "cfg", "asyncdiff-cfg"))
    walls = [max(r["spans"][i][1] for r in results) - min(r["spans"][i][0] for r in results)
             for i in range(args.repeat)]
    import torch

    outs = [torch.tensor(r["out"]) for r in results]
    agree = all(torch.equal(outs[0], o) for o in outs[1:])
    return {"time": _util.summary(walls), "out": outs[0], "agree": agree, "split": results[0]["split"],
            "stats": [(r["rank"], r["stats"]) for r in results]}


def main(argv=None):
    args = parse_args(argv)
    if args.job is not None:
        return worker(args)

    world = args.model_n + args.stride - 1
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in ("sd15", "digits"):
            raise SystemExit(f"--models: unknown model {m!r} (expected sd15, digits)")
    configs = [("plain", 1, 1), ("plain", 1, world), ("asyncdiff", world, 1), ("threads", 1, world),
               ("warm-up", world, 1), ("cfg", 2, 1), ("cfg-threads", 1, 2), ("asyncdiff-cfg", 2 * world, 1)]
    configs = list(dict.fromkeys(configs))  # world 1: the first two are the same
    wanted = {r.strip() for r in args.rows.split(",")} if args.rows else None
    configs = [c for c in configs
               if (c[0] == "plain" and c[2] == 1) or (c[0] in wanted if wanted else c[0] != "asyncdiff-cfg")]
    _util.preamble(
        "End-to-end pipeline wall time: plain vs AsyncDiff",
        threads="per row (procs x threads)",
        notes=[
            f"AsyncDiff: model_n={args.model_n}, stride={args.stride}, warm_up={args.warm_up}, "
            f"split={args.split or 'paper preset, else auto'}, shm transport, {world} rank processes x 1 thread",
            f"time: whole pipeline call, median of {args.repeat} after {args.warmup_calls} untimed call(s); "
            "speed-up vs the 1x1 row of the same model",
            f"sd15: UNet = {'real SD 1.5 config (full width)' if args.unet == 'real' else 'TINY config (smoke test)'}"
            f", random weights (seed {args.seed}), latent {args.latent}x{args.latent} "
            f"({args.latent * 8}x{args.latent * 8} px), {args.steps} DDIM steps, guidance {args.guidance}, "
            "output_type=latent",
            f"digits: {args.digits_images} images per call, {args.digits_steps} DDIM steps",
            "rel. diff = |out - out(1x1)| / |out(1x1)| (AsyncDiff approximates; plain rows should be ~0); "
            "ranks agree = every rank returned the same output",
        ],
    )
    rows, skipped, splits_used, breakdown = [], [], {}, []
    for model in models:
        why = available(model, args)
        if why:
            skipped.append(f"{model}: skipped, {why}")
            continue
        base = None
        for mode, procs, threads in configs:
            label = {"asyncdiff": "AsyncDiff", "threads": f"AsyncDiff in-process, {world} threads",
                     "warm-up": "AsyncDiff, every step a warm-up step (sharded: through the owners)",
                     "cfg": "CFG parallel alone (model_n=1, cfg_parallel)",
                     "cfg-threads": "CFG parallel alone in-process, 2 threads",
                     "asyncdiff-cfg": "AsyncDiff + CFG parallel"}.get(mode, "plain")
            try:
                r = run_config(model, mode, procs, threads, args)
            except _util.LaunchError as exc:
                rows.append([model, label, f"{procs}x{threads}", None, None, None, None, None, "failed"])
                print(str(exc), file=sys.stderr)
                continue
            t = r["time"]
            if base is None and mode == "plain" and threads == 1:
                base = r
            speed = base["time"]["median"] / t["median"] if base else None
            rel = (float((r["out"] - base["out"]).norm() / base["out"].norm().clamp_min(1e-12))
                   if base else None)
            if r["split"]:
                splits_used[model] = r["split"]
            rows.append([model, label, f"{procs}x{threads}", t["median"], t["min"], t["max"],
                         speed, rel, "yes" if r["agree"] else "NO"])
            for rank, stats in r["stats"]:
                for phase, st in stats.items():
                    ms = st["ms per call"]
                    breakdown.append([model, label, rank, phase, st["calls"], ms.get("compute"), ms.get("exchange"),
                                      ms.get("join"), ms.get("publish"), ms.get("fetch"), 1e3 * ms["bookkeeping"],
                                      st["bytes per call"].get("bytes received", 0) / 2**20,
                                      st["events per call"]])
            print(f"  done: {model} {label} {procs}x{threads}: {t['median']:.3f} s", file=sys.stderr, flush=True)
    if rows:
        print(_util.table(["model", "config", "procs x threads", "median s", "min s", "max s",
                           "speed-up vs 1x1", "rel. diff", "ranks agree"], rows,
                          align="lllrrrrrl"))
    if breakdown:
        print("\nWhere a denoiser call's time goes (`AsyncDiff.stats`, every call but the first of each row's "
              "processes; ms per call): compute = the forwards; exchange = transport events (publish: copying "
              "in; fetch: waiting for the owners, then copying out; join: the part of exchange swapping CFG "
              "halves with the twin rank); bookkeeping = hooks, schedule and exchange plan outside both "
              "(us per call)\n")
        print(_util.table(["model", "config", "rank", "phase", "calls", "compute ms", "exchange ms", "join ms",
                           "publish ms", "fetch ms", "bookkeeping us", "MiB received", "events"], breakdown,
                          align="llrlrrrrrrrrr"))
    for model, split in splits_used.items():
        print(f"\n{model} split: `{split}`")
    for note in skipped:
        print(f"\n{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
