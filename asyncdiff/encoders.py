"""The text encoders on rank 0 only (``encoders="rank0"``; docs/design.md §6.6).

The text encoders run once per pipeline call, before the denoising loop, and
every rank would compute the same prompt embeddings.  With ``encoders="rank0"``
rank 0 runs the pipeline's ``encode_prompt`` and posts what it returned to the
launch store; every other rank's ``encode_prompt`` is replaced by reading that,
and its text encoders are dropped (the components become None; Flux's
T5-XXL: about 9 GB per rank saved).  The embeddings are rank 0's bit for bit, which every rank would
have computed anyway, so no output changes.

Posts are numbered by ``encode_prompt`` call (every rank's pipeline makes the
same calls); rank 0 deletes a post when it makes the next one, by which time
every rank has read it (the ranks met in the denoiser calls in between).  A
failure of rank 0's ``encode_prompt`` is posted as its error, so the other
ranks raise ``AsyncDiffPeerError`` instead of waiting.
"""

from __future__ import annotations

import functools
import io

import torch

CHOICES = ("all", "rank0")
_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")


def text_encoders(pipeline) -> dict:
    """The pipeline's text encoder modules by component name."""
    return {n: m for n in _NAMES if isinstance(m := getattr(pipeline, n, None), torch.nn.Module)}


def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(_map(obj, lambda t: t.detach().cpu()), buf)
    return buf.getvalue()


def _map(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return type(obj)((k, _map(v, fn)) for k, v in obj.items())
    return obj


class PromptRelay:
    """Installed on the pipeline of one rank by ``AsyncDiff(..., encoders="rank0")``."""

    def __init__(self, pipeline, board, device):
        if not callable(getattr(pipeline, "encode_prompt", None)):
            raise ValueError(f"encoders: {type(pipeline).__name__} has no encode_prompt method; "
                             "use encoders='all'")
        self.pipeline, self.board, self.device = pipeline, board, device
        self.calls = 0
        self.freed = 0
        original = pipeline.encode_prompt

        @functools.wraps(original)
        def encode_prompt(*args, **kwargs):
            return self._encode(original, args, kwargs)

        pipeline.encode_prompt = encode_prompt
        if board.rank != 0:
            # dropped, not moved to the meta device: a pipeline infers its device from its first module
            for name, module in text_encoders(pipeline).items():
                self.freed += sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]
                                  if not t.is_meta)
                setattr(pipeline, name, None)

    def _encode(self, original, args, kwargs):
        key = f"encode_prompt/{self.calls}"
        self.calls += 1
        if self.board.rank == 0:
            try:
                result = original(*args, **kwargs)
                if self.calls > 1:
                    try:
                        self.board.store.delete_key(f"encode_prompt/{self.calls - 2}")
                    except Exception:  # noqa: BLE001 - a store without delete keeps the old post
                        pass
                self.board.set(key, _to_bytes(result))
            except BaseException as exc:
                self.board.fail(exc)  # the other ranks raise instead of waiting for the post
                raise
            return result
        got = torch.load(io.BytesIO(self.board.get(key)), weights_only=False)
        return _map(got, lambda t: t.to(self.device))

    def remove(self) -> None:
        """Rank 0: the pipeline's own ``encode_prompt`` again.  Another rank has no
        text encoders left: its ``encode_prompt`` says so."""
        if self.board.rank == 0:
            self.pipeline.__dict__.pop("encode_prompt", None)
            return

        def freed(*_args, **_kwargs):
            raise RuntimeError("this pipeline's text encoders were dropped by AsyncDiff(encoders='rank0') on a "
                               "rank other than 0; reload the pipeline")

        self.pipeline.encode_prompt = freed
