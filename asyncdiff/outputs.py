"""Flatten a block's output into tensors and a spec, and rebuild it.

A replayed block must return an object of the same structure as the one it
computed: a tensor, a (nested) tuple or list, a diffusers ``BaseOutput`` or a
dict.  ``flatten`` keeps the tensors in a list (what is cached and sent) and a
small spec describing how to put them back.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

_TENSOR = 0
_SEQ = 1
_MAP = 2
_CONST = 3


def flatten(obj) -> tuple[tuple, list[torch.Tensor]]:
    tensors: list[torch.Tensor] = []
    return _flatten(obj, tensors), tensors


def _flatten(obj, tensors: list) -> tuple:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return (_TENSOR,)
    if isinstance(obj, (tuple, list)) and not hasattr(obj, "_fields"):
        return (_SEQ, type(obj), tuple(_flatten(o, tensors) for o in obj))
    if isinstance(obj, dict):  # diffusers BaseOutput is an OrderedDict
        keys = tuple(obj.keys())
        return (_MAP, type(obj), keys, tuple(_flatten(obj[k], tensors) for k in keys))
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return (_CONST, obj)
    raise TypeError(f"cannot cache a block output of type {type(obj).__name__}")


def unflatten(spec: tuple, tensors: list[torch.Tensor]):
    it = iter(tensors)
    return _unflatten(spec, it)


def _unflatten(spec: tuple, it):
    tag = spec[0]
    if tag == _TENSOR:
        return next(it)
    if tag == _SEQ:
        return spec[1](_unflatten(s, it) for s in spec[2])
    if tag == _MAP:
        cls, keys, subs = spec[1], spec[2], spec[3]
        values = OrderedDict((k, _unflatten(s, it)) for k, s in zip(keys, subs))
        if cls is dict or cls is OrderedDict:
            return cls(values)
        return cls(**values)
    return spec[1]
