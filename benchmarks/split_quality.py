"""Evidence for the default split: is a faster split also as good?

AsyncDiff's default split today is the paper preset where one exists, else
``"auto"``.  The rule for changing it: the default should be the split that
is faster without measurably worse quality.  This script gathers both halves
of that evidence, one table per part:

1. **Quality, tiny SD-family pipelines** (``asyncdiff.testing.tiny``: the
   real models' module trees with tiny widths and random weights), in
   emulation (one process, the same images as a multi-process run), for
   ``--n`` and every split of ``--splits``: the relative difference
   ``|out - sequential| / |sequential|`` of the output latents, where
   sequential is the plain pipeline (no AsyncDiff) with the same seed; mean,
   spread and per-seed values over ``--seeds``, and the paired difference to
   the paper preset seed by seed.  ``split="time"`` is measured here, on the
   tiny model (once per model: ``splits.count_times`` caches it), so it may
   differ from run to run; the split each run chose is printed.
2. **Quality and speed, the trained digits model** (``asyncdiff.demo.digits``;
   no paper preset exists for its generic ``UNet2DModel``): PSNR of
   AsyncDiff's images vs the sequential images of the same seed (over
   ``--digits-seeds``), the shipped digit classifier's accuracy on the
   requested labels, per split and N, S = 1; and each split's balance on
   this model by FLOPs and by measured time (a timing run made after the
   time split was chosen, as ``split_basis.py`` does).
3. **Speed, real sizes** (meta device, nothing computed): each split's
   balance by FLOPs (largest / mean component) and the ideal speed-up
   ``total / largest component`` (as ``partition_balance.py``), plus the
   balance by weight bytes.  ``split="time"`` needs real forwards, so it
   has no row here; for SD 1.5 the measured-time balance is in
   ``benchmarks/results/split_basis.md`` and the measured end-to-end run in
   ``benchmarks/results/end_to_end_breakdown.md``.

Part 1 resolves ``split=`` on the tiny model, whose FLOP and time
proportions are not the real model's; it therefore also runs, as explicit
splits, what a real deployment would get: ``auto-real`` and ``memory-real``
(``split="auto"`` / ``"memory"`` resolved on the real-size model of part 3)
and, for SD 1.5, ``time-real`` (the splits ``split="time"`` chose for the
real SD 1.5 config at 128 px on a CPU, as recorded in
``benchmarks/results/split_basis.md``; part 3 judges them by FLOPs too).
``--no-real`` leaves these rows out.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

TINY_ARCHS = "sd15,sd21,sdxl,sd3"
SPLITS = "paper,auto,time,memory"
NAMES = {"sd15": "SD 1.5", "sd21": "SD 2.1", "sdxl": "SDXL", "sd3": "SD3"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="1,2,3", help="which parts to run (1 tiny quality, 2 digits, 3 real balance)")
    ap.add_argument("--archs", default=TINY_ARCHS, help=f"tiny pipelines for part 1 (of {TINY_ARCHS})")
    ap.add_argument("--real-archs", default=TINY_ARCHS, help="real-size configs for part 3 (any of _models.NAMES)")
    ap.add_argument("--n", default="2,3,4", help="model_n values")
    ap.add_argument("--splits", default=SPLITS, help=f"splits to compare (of {SPLITS})")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps of the tiny pipelines")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of part 1")
    ap.add_argument("--digits-seeds", default="0,1", help="seeds of part 2 (each draws --per-label x 10 images)")
    ap.add_argument("--per-label", type=int, default=2, help="digits images per label (x 10 labels) per seed")
    ap.add_argument("--digits-steps", type=int, default=50, help="DDIM steps of the digits model")
    ap.add_argument("--warm-up", type=int, default=1, help="AsyncDiff warm_up")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--no-real", action="store_true",
                    help="skip the *-real rows (the real-size models' auto / memory splits, and SD 1.5's time "
                         "splits recorded in results/split_basis.md, run as explicit splits)")
    return ap.parse_args(argv)


def _mean_sd(xs):
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt(x: float, digits: int = 5) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _paired(xs, ref, digits: int = 5) -> str:
    """mean (min..max) of xs[i] - ref[i]: the split's effect, seed by seed."""
    if ref is None or any(math.isnan(v) or math.isinf(v) for v in (*xs, *ref)):
        return "—"
    d = [a - b for a, b in zip(xs, ref)]
    return f"{statistics.fmean(d):+.{digits}f} ({min(d):+.{digits}f}..{max(d):+.{digits}f})"


def recorded_time_splits(path=_util.ROOT / "benchmarks" / "results" / "split_basis.md") -> dict:
    """{N: split text} of the time splits that split_basis.py chose for the real SD 1.5 config (CPU, 128 px),
    as recorded in its results file ("- N=2 time: `...`"); {} when the file is missing."""
    import re

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return {}
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^- N=(\d+) time: `([^`]+)`", text, re.MULTILINE)}


def _attach(pipe, n, split, warm):
    """AsyncDiff in emulation, or None when ``split="paper"`` and the model has no preset."""
    from asyncdiff import AsyncDiff

    try:
        return AsyncDiff(pipe, model_n=n, stride=1, warm_up=warm, split=split, transport="emulate")
    except ValueError:
        if split == "paper":
            return None
        raise


def _digest(tensor) -> str:
    import hashlib

    return hashlib.sha1(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class Runs:
    """The runs of one model and N: each distinct split is run once.

    ``run(label, split, seeds, measure)`` attaches AsyncDiff with ``split``,
    calls ``measure(seed) -> (output tensor, result)`` for every seed and
    returns ``{"text", "results", "same"}`` (None: no paper preset).  A split
    known at attach (paper, memory, explicit) that was run already is not run
    again; one decided at the first call (auto, time) stops after the first
    seed when it turns out to be a split run already.  ``same`` names the
    earlier label with the same split, or with bitwise the same outputs
    ("<label> (same output)"): splits that differ only in where a unit that
    does not read the timestep (an attention, a down/upsampler) sits at a
    boundary give the same result."""

    def __init__(self, pipe, n: int, warm: int):
        self.pipe, self.n, self.warm = pipe, n, warm
        self.done: dict = {}  # label -> {"text", "results", "digests"}

    def _same_text(self, text):
        return next((lab for lab, d in self.done.items() if d["text"] == text), None)

    def run(self, label, split, seeds, measure):
        ad = _attach(self.pipe, self.n, split, self.warm)
        if ad is None:
            return None
        results, digests, same = [], [], None
        try:
            if ad.split is not None:
                same = self._same_text(str(ad.split))
            for i, seed in enumerate(seeds):
                if same is not None:
                    break
                out, res = measure(seed)
                results.append(res)
                digests.append(_digest(out))
                if i == 0:
                    same = self._same_text(str(ad.split))
            text = str(ad.split)
        finally:
            ad.remove()
        if same is not None:
            got = dict(self.done[same])
        else:
            got = {"text": text, "results": results, "digests": digests}
            twin = next((lab for lab, d in self.done.items() if d["digests"] == digests), None)
            if twin is not None:
                same = f"{twin} (same output)"
        self.done[label] = got
        return {**got, "same": same}


_REAL: dict = {}


def real_model(arch: str):
    """(case, fine-unit order, FLOPs) of the real-size model on the meta device (``_models``), cached."""
    import _models

    from asyncdiff import splits

    if arch not in _REAL:
        c = _models.case(arch)
        _REAL[arch] = (c, *splits.count_costs(c.layout, c.model, c.args, c.kwargs))
    return _REAL[arch]


def real_speedup(arch: str, text: str) -> float:
    """Ideal speed-up (total FLOPs / largest component) of a split, given as text, on the real-size model."""
    from asyncdiff import splits

    c, order, costs = real_model(arch)
    comps = splits.parse(text)
    sp = splits.validate(c.layout, comps, len(comps), "explicit")
    per = splits.component_costs(c.layout, sp, order, costs)
    return sum(costs) / max(per)


def real_split_texts(arch: str, n: int) -> dict:
    """{"auto-real": ..., "memory-real": ...}: what split="auto" and split="memory" give the REAL-size model."""
    from asyncdiff import splits

    c, order, costs = real_model(arch)
    return {"auto-real": str(splits.auto(c.layout, n, order, costs)),
            "memory-real": str(splits.resolve_static(c.layout, n, "memory", c.model))}


# ------------------------------------------------------------------ part 1
def part_tiny(args, ns, names, seeds):
    import torch

    from asyncdiff.testing import tiny

    _util.preamble(
        "Part 1: split vs quality, tiny SD-family pipelines (emulation)",
        threads=args.threads,
        notes=[f"tiny pipelines (`asyncdiff.testing.tiny.build_pipeline(arch)`, seed-0 random weights, the real "
               f"models' module trees), `tiny.default_call_kwargs(arch, seed)` (128x128 px, latent 16x16, "
               f"guidance 5.0, output_type=latent) with {args.steps} steps; seeds {', '.join(map(str, seeds))}",
               f"AsyncDiff(model_n=N, stride=1, warm_up={args.warm_up}, split=..., transport='emulate')",
               "rel. diff = ‖latents − sequential‖ / ‖sequential‖ (sequential: the plain pipeline, same seed); "
               "mean and sd over the seeds; per seed in seed order",
               "paired Δ vs paper = rel. diff − the paper preset's rel. diff, seed by seed: mean (min..max); "
               "a split's effect on quality beyond seed noise shows as a Δ whose min..max excludes 0",
               "same as: the same split as that row (not run again), or '(same output)': another split whose "
               "latents are bitwise the same (it differs only in where a unit that does not read the timestep, "
               "an attention or a down/upsampler, sits at a boundary)",
               "paper, auto, time, memory: `split=` as given, resolved on the TINY model; auto counts the tiny "
               "model's FLOPs, whose proportions are not the real model's (tiny widths, 16x16 latent), so it may "
               "pick another split than on the real model; time is measured on the tiny model in this run "
               "(fastest of 2 forwards per unit, 1 thread, shared machine), so it may change between runs",
               "auto-real, memory-real: the split `split='auto'` / `'memory'` gives the REAL-size model (meta "
               "device, the inputs of part 3), given as an explicit split: the quality of the split a real "
               "deployment runs with (the tiny model has the same units)",
               "time-real (SD 1.5 only): the split that split='time' chose for the real SD 1.5 config (128 px, "
               "CPU, 1 thread), read from `benchmarks/results/split_basis.md`, given as an explicit split",
               "real speed-up: the row's split applied to the REAL-size model (same units), ideal speed-up by "
               "FLOPs = total / largest component (part 3's measure)"],
    )
    rows, chosen = [], []
    recorded = recorded_time_splits()
    for arch in names:
        t_arch = time.perf_counter()
        pipe = tiny.build_pipeline(arch)

        def call(seed, arch=arch, pipe=pipe):
            kw = tiny.default_call_kwargs(arch, seed)
            kw["num_inference_steps"] = args.steps
            with torch.no_grad():
                return pipe(**kw).images

        refs = {s: call(s).to(torch.float64) for s in seeds}

        def measure(seed, call=call, refs=refs):
            out = call(seed)
            ref = refs[seed]
            return out, float((out.to(torch.float64) - ref).norm() / ref.norm())

        for n in ns:
            runs = Runs(pipe, n, args.warm_up)
            todo = [(split, split) for split in args.split_list]
            if not args.no_real:
                todo += [(k, v) for k, v in real_split_texts(arch, n).items() if k.split("-")[0] in args.split_list]
                if arch == "sd15" and "time" in args.split_list and n in recorded:
                    todo.append(("time-real", recorded[n]))
            for label, split in todo:
                got = runs.run(label, split, seeds, measure)
                if got is None:
                    rows.append([NAMES[arch], n, label, "—", "—", "—", "—", "—", "no preset"])
                    continue
                vals = got["results"]
                m, sd = _mean_sd(vals)
                paper = runs.done.get("paper")
                rows.append([NAMES[arch], n, label, _fmt(m), _fmt(sd), " / ".join(_fmt(v) for v in vals),
                             "" if label == "paper" else _paired(vals, paper and paper["results"]),
                             f"{real_speedup(arch, got['text']):.2f}", got["same"] or ""])
                if got["same"] is None:
                    chosen.append(f"{NAMES[arch]} N={n} {label}: `{got['text']}`")
        print(f"  part 1: {arch} {time.perf_counter() - t_arch:.0f} s", file=sys.stderr, flush=True)
    print(_util.table(["model", "N", "split", "rel. diff mean", "sd (seeds)", "per seed", "paired Δ vs paper",
                       "real speed-up", "same as"], rows, align="lrlllllrl"))
    print()
    print("Splits (each distinct one once):\n")
    for line in chosen:
        print(f"- {line}")
    print(flush=True)


# ------------------------------------------------------------------ part 2
def part_digits(args, ns, seeds):
    import numpy as np
    import torch

    from asyncdiff import arch, splits
    from asyncdiff.demo import digits

    try:
        pipe = digits.load_pipeline()
        clf = digits.classifier()
    except (FileNotFoundError, OSError) as exc:
        print(f"Part 2 skipped: the digits weights are missing ({exc})\n")
        return
    pipe.set_progress_bar_config(disable=True)
    labels = [d for d in range(10) for _ in range(args.per_label)]
    y = torch.tensor(labels)
    steps, warm = args.digits_steps, args.warm_up

    def draw(seed):
        with torch.no_grad():
            return pipe(labels, num_inference_steps=steps, output_type="pt",
                        generator=torch.Generator().manual_seed(seed)).images.float().cpu()

    captured = {}
    def capture(_module, a, k):  # returns None: the call's inputs are left as they are
        captured.setdefault("call", (a, k))

    hook = pipe.unet.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        refs = {s: draw(s) for s in seeds}
    finally:
        hook.remove()
    ref_acc = float(np.mean([(clf.classify(refs[s]) == y).float().mean() for s in seeds]))

    def measure(seed):
        out = draw(seed)
        p = digits.psnr(out, refs[seed], per_image=True)
        return out, (p, float((clf.classify(out) == y).float().mean()))

    results = []  # (n, label, got)
    for n in ns:
        runs = Runs(pipe, n, warm)
        for split in args.split_list:
            results.append((n, split, runs.run(split, split, seeds, measure)))
            print(f"  part 2: N={n} {split}", file=sys.stderr, flush=True)

    # speed on this model: FLOPs (meta trace) and measured time, judged on a fresh timing run (the time
    # split's own run is not used to judge it), like split_basis.py
    layout = arch.describe(pipe.unet)
    c_args, c_kwargs = captured["call"]
    order, flops = splits.count_costs(layout, pipe.unet, c_args, c_kwargs)
    splits._TIMES.clear()
    t_order, secs = splits.count_times(layout, pipe.unet, c_args, c_kwargs, repeat=3)
    assert t_order == order, "the timing run and the FLOP count disagree on the order of the units"

    _util.preamble(
        "Part 2: split vs quality, the trained digits model (emulation)",
        threads=args.threads,
        notes=[f"{len(labels)} images per seed ({args.per_label} per digit) x seeds {', '.join(map(str, seeds))} "
               f"= {len(labels) * len(seeds)} images per row; {steps} DDIM steps; guidance: the "
               f"pipeline's default; S=1, warm_up={warm}",
               "PSNR vs the sequential images of the same seed, per image, [0, 1] range (mean over all images; "
               "per seed: that seed's mean; min: worst image); accuracy: the shipped digit classifier vs the "
               "requested labels, over all images",
               "paired Δ vs auto = PSNR mean − auto's PSNR mean, seed by seed: mean (min..max)",
               "paper: the digits model is a generic `UNet2DModel` (family `generic`): the original AsyncDiff "
               "has no preset for it, so split='paper' is refused (shown as 'no preset')",
               f"speed, this model at its real size (batch {2 * len(labels)} with guidance, CPU, {args.threads} "
               f"thread): max/mean FLOPs (splits.count_costs) and max/mean time (splits.count_times, fastest of 3 "
               f"forwards per unit, a timing run made after the time split was chosen); ideal speed-up by time = "
               f"L / (W + (L − W) · max / total), L={steps}, W={warm}, glue and communication ignored; "
               f"{sum(secs) * 1e3:.0f} ms per denoiser call in units"],
    )
    rows = [["sequential", "—", "", "inf", "—", "—", "inf", _fmt(ref_acc, 3), "", "", "", "", ""]]
    chosen = []
    auto_seeds = {}
    for n, split, got in results:
        if got is None:
            rows.append(["AsyncDiff", n, split, "—", "—", "—", "—", "—", "—", "—", "—", "—", "no preset"])
            continue
        ps = np.concatenate([p for p, _ in got["results"]])
        per_seed = [float(p.mean()) for p, _ in got["results"]]
        acc = float(np.mean([a for _, a in got["results"]]))
        if split == "auto":
            auto_seeds[n] = per_seed
        sp = splits.validate(layout, splits.parse(got["text"]), n, "explicit")
        f = splits.component_costs(layout, sp, order, flops)
        t = splits.component_costs(layout, sp, order, secs)
        ideal = steps / (warm + (steps - warm) * max(t) / sum(t))
        rows.append(["AsyncDiff", n, split, f"{np.mean(ps):.2f}", f"{_mean_sd(per_seed)[1]:.2f}",
                     " / ".join(f"{v:.2f}" for v in per_seed), f"{np.min(ps):.2f}", _fmt(acc, 3),
                     "" if split == "auto" or n not in auto_seeds else _paired(per_seed, auto_seeds[n], 2),
                     f"{max(f) / (sum(f) / n):.2f}", f"{max(t) / (sum(t) / n):.2f}", f"{ideal:.2f}",
                     got["same"] or ""])
        if got["same"] is None:
            chosen.append(f"digits N={n} {split}: `{got['text']}`")
    print(_util.table(["config", "N", "split", "PSNR mean dB", "sd (seeds)", "per seed", "PSNR min dB", "accuracy",
                       "paired Δ vs auto dB", "max/mean FLOPs", "max/mean time", "ideal speed-up (time)",
                       "same as"], rows, align="lrlrrlrrlrrrl"))
    print()
    for line in chosen:
        print(f"- {line}")
    print(flush=True)


# ------------------------------------------------------------------ part 3
def part_real(args, ns):
    import _models

    from asyncdiff import splits

    archs = [a.strip() for a in args.real_archs.split(",") if a.strip()]
    recorded = recorded_time_splits()
    _util.preamble(
        "Part 3: split vs speed, real sizes (meta device, FLOPs and weight bytes)",
        threads=None,
        notes=["real configs on the meta device (nothing computed), fp16, batch 2, inputs of "
               "`benchmarks/_models.py` (SD 1.5 512 px, SD 2.1 768 px, SDXL and SD3 1024 px)",
               "max/mean FLOPs: largest component's FLOPs / the average (1.00 = perfect); ideal speed-up = "
               "total unit FLOPs / largest component (as partition_balance.py: no warm-up, glue or "
               "communication); max/mean bytes: the same for weight bytes (per-rank memory when sharded)",
               "time-real (SD 1.5): the time splits recorded in `benchmarks/results/split_basis.md` (chosen at "
               "128 px on a CPU), judged here by FLOPs at 512 px",
               "time: needs real forwards, so no row here.  SD 1.5 measured-time balance (real config, 128 px, "
               "CPU, 1 thread): `benchmarks/results/split_basis.md` (as recorded there: ideal speed-up at L=20, "
               "W=1 by measured time, N=2/3/4: paper 1.53/1.43/1.68, auto 1.36/1.60/1.61, time 1.63/2.51/2.89); "
               "measured end to end, N=2, 2 rank processes: `benchmarks/results/end_to_end_breakdown.md` (paper "
               "1.53x, time 1.57x, separate runs on a shared machine)"],
    )
    rows, notes = [], []
    for arch in archs:
        c, order, costs = real_model(arch)
        border, bcosts = splits.count_bytes(c.layout, c.model)
        total = sum(costs)
        for n in ns:
            todo = list(args.split_list)
            if arch == "sd15" and "time" in todo and not args.no_real and n in recorded:
                todo.append("time-real")
            texts = {}
            for which in todo:
                if which == "time":
                    rows.append([_models.NAMES[arch], n, which, "—", "—", "—", "needs real forwards"])
                    continue
                if which == "paper":
                    sp = splits.resolve_static(c.layout, n, "paper") if splits.preset(c.layout, n) else None
                elif which == "auto":
                    sp = splits.auto(c.layout, n, order, costs)
                elif which == "time-real":
                    sp = splits.resolve_static(c.layout, n, recorded[n])
                else:
                    sp = splits.resolve_static(c.layout, n, "memory", c.model)
                if sp is None:
                    rows.append([_models.NAMES[arch], n, which, "—", "—", "—", "no preset"])
                    continue
                same = next((k for k, t in texts.items() if t == str(sp)), None)
                texts[which] = str(sp)
                f = splits.component_costs(c.layout, sp, order, costs)
                b = splits.component_costs(c.layout, sp, border, bcosts)
                rows.append([_models.NAMES[arch], n, which, max(f) / (sum(f) / n), total / max(f),
                             max(b) / (sum(b) / n), f"same as {same}" if same else ""])
                if which in ("auto", "memory") and same is None:
                    notes.append(f"{_models.NAMES[arch]} N={n} {which}: `{sp}`")
        print(f"  part 3: {arch}", file=sys.stderr, flush=True)
    print(_util.table(["model", "N", "split", "max/mean FLOPs", "ideal speed-up (FLOPs)", "max/mean bytes", "note"],
                      rows, align="lrlrrrl"))
    print()
    for line in notes:
        print(f"- {line}")
    print(flush=True)


def main(argv=None):
    args = parse_args(argv)
    _util.set_threads(args.threads)
    import warnings

    from diffusers.utils import logging as diffusers_logging

    warnings.filterwarnings("ignore", message=".*torchvision.*")
    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32" (the fp16 meta models)
    args.split_list = [s.strip() for s in args.splits.split(",") if s.strip()]
    ns = _util.int_list(args.n)
    seeds = _util.int_list(args.seeds)
    parts = set(_util.int_list(args.parts))
    t0 = time.perf_counter()
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    for part, fn in ((1, lambda: part_tiny(args, ns, archs, seeds)),
                     (2, lambda: part_digits(args, ns, _util.int_list(args.digits_seeds))),
                     (3, lambda: part_real(args, ns))):
        if part in parts:
            t = time.perf_counter()
            fn()
            print(f"  part {part} done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    print(f"  total {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
