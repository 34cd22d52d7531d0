"""CFG parallel: the two halves of the classifier-free-guidance batch on two groups of ranks.

With classifier-free guidance a diffusers pipeline calls the denoiser once
per step on a batch that is two independent halves stacked, unconditional
first, conditional second (``torch.cat([negative, positive])``).
``cfg_parallel=True`` gives each half its own group of ``model_n + stride -
1`` ranks.  Every group runs the asynchronous schedule on its half exactly
as a whole run would on a whole batch (its own caches, its own exchanges),
and after every denoiser call each rank swaps its half of the output with
its *twin*, the rank of the same place in the other group, so that every
rank returns the whole batch and the pipeline's guidance arithmetic sees
the numbers it would see without the split.  See docs/design.md §6.7.

``Halves`` is what the denoiser hook calls instead of the ``Loop``: it cuts
the call's arguments to a half, runs the loop of each half this process
plays (both in emulation, its own on a rank), and joins their outputs (in
emulation; a rank's loop has joined with its twin already, ``RankStep``).
"""

from __future__ import annotations

import inspect
import time

import torch

from .outputs import flatten, unflatten

GROUPS = 2  # unconditional, conditional


def refuse(denoiser: torch.nn.Module) -> None:
    """A ValueError naming ``cfg_parallel`` for denoisers whose guidance is
    not a batch of two halves."""
    name = type(denoiser).__name__
    if name.startswith("Flux"):
        raise ValueError(f"cfg_parallel: {name} (Flux) uses distilled guidance, a guidance embedding on a batch "
                         "of one prompt, so there are no two halves to split; drop cfg_parallel (Flux's "
                         "true_cfg_scale calls the transformer twice per step, which AsyncDiff does not support)")


def batch_of(bound, first: str) -> int:
    """The batch of the denoiser call: the first dimension of its first argument."""
    sample = bound.arguments[first]
    if not isinstance(sample, torch.Tensor) or sample.dim() == 0:
        raise TypeError(f"cfg_parallel: the denoiser's first argument {first!r} is not a batch of tensors")
    return sample.shape[0]


def _cut(value, batch: int, lo: int, hi: int):
    """``value`` with every tensor whose first dimension is the batch cut to rows
    lo:hi (lists, tuples and dicts followed; anything else kept)."""
    if isinstance(value, torch.Tensor):
        return value[lo:hi] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_cut(v, batch, lo, hi) for v in value)
    if type(value) is dict:
        return {k: _cut(v, batch, lo, hi) for k, v in value.items()}
    return value


def _join(outs: list):
    """The denoiser outputs of the halves, in group order, as one output:
    every tensor concatenated along the batch, on the first half's device."""
    spec, first = flatten(outs[0])
    rest = [flatten(o)[1] for o in outs[1:]]
    return unflatten(spec, [torch.cat([t, *(r[i].to(t.device) for r in rest)]) for i, t in enumerate(first)])


class Halves:
    """The denoiser hook's body under ``cfg_parallel``.

    loops: (group, Loop) for every group this process plays: both in
    emulation, one on a rank.  pipeline: read for
    ``do_classifier_free_guidance``, so a call without guidance fails with
    the reason instead of running on a batch that is not two halves."""

    def __init__(self, loops: list, pipeline, signature, first: str, together: bool = False):
        self.loops = loops
        self.together = together  # devices= in one process: both groups' forwards at the same time
        self.pipeline = pipeline
        self.signature = signature
        self.first = first

    def _check(self, bound) -> int:
        if getattr(self.pipeline, "do_classifier_free_guidance", True) is False:
            raise ValueError("cfg_parallel: this pipeline call does no classifier-free guidance (guidance_scale "
                             "<= 1, or a model without it), so there is no batch of two halves to split; "
                             "raise guidance_scale, or attach AsyncDiff without cfg_parallel")
        if bound.arguments.get("skip_layers") is not None:
            raise ValueError("cfg_parallel: skip-layer guidance (SD3's skip_guidance_layers) calls the "
                             "denoiser a second time per step on the conditional half only; drop "
                             "skip_guidance_layers or cfg_parallel")
        batch = batch_of(bound, self.first)
        if batch % GROUPS:
            raise ValueError(f"cfg_parallel: the denoiser got a batch of {batch}, which is not the two halves "
                             "(unconditional, conditional) of classifier-free guidance")
        return batch

    def __call__(self, forward, args, kwargs):
        try:
            bound = self.signature.bind(*args, **kwargs)
            batch = self._check(bound)
            half = batch // GROUPS
            cuts = []
            for group, _ in self.loops:  # one binding, cut once per group this process plays
                lo, hi = group * half, (group + 1) * half
                cut = inspect.BoundArguments(self.signature, {name: _cut(value, batch, lo, hi)
                                                              for name, value in bound.arguments.items()})
                cuts.append((cut.args, cut.kwargs))
            if self.together:
                outs = self._together(forward, cuts)
            else:
                outs = [loop(forward, a, kw) for (_, loop), (a, kw) in zip(self.loops, cuts)]
        except BaseException as exc:
            for _, loop in self.loops:  # the other ranks learn it at once (docs/design.md §8); the next
                loop.mode.fail(exc)     # pipeline call starts afresh in every group
                loop.reset()
            raise
        return outs[0] if len(outs) == 1 else _join(outs)

    def _together(self, forward, cuts) -> list:
        """Both groups' passes of this call in one round of worker threads
        (``threads.run_all``), then each loop finishes its own call."""
        from .threads import run_all

        staged = []
        for (_, loop), (a, kw) in zip(self.loops, cuts):
            t0 = time.perf_counter()
            call, k, runs = loop._begin(forward, a, kw)
            staged.append((loop, call, k, runs, t0, time.perf_counter()))
        t1 = time.perf_counter()
        outs = run_all([(loop.mode, run) for loop, _, _, runs, _, _ in staged for run in runs], forward,
                       self.loops[0][1].state)
        computed = time.perf_counter() - t1
        results, at = [], 0
        for loop, call, k, runs, t0, begun in staged:
            t2 = time.perf_counter()
            results.append(loop._finish(call, k, [p for p, _, _ in runs], outs[at:at + len(runs)]))
            at += len(runs)
            loop._time(runs, t0, begun, begun + computed, begun + computed + time.perf_counter() - t2)
        return results
