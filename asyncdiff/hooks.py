"""AsyncDiff's two diffusers hooks: one on the denoiser, one on each block of the split.

They are ``diffusers.hooks.ModelHook`` subclasses registered in the module's
``HookRegistry`` under stable names, so they compose with the other hooks
diffusers users install (caching, group offloading, layerwise casting) in the
order they were registered, and are removed by name.  See docs/design.md §6.

* ``DenoiserHook`` hands every denoiser call to the ``Loop`` (``step.py``),
  which decides what this call does from the C schedule.
* ``BlockHook`` either runs its block (and records the output when the pass
  stores) or replays the cached output, as the current ``Pass`` says.

Everything a block hook does per call is plain attribute and dict access, so
``torch.compile`` traces through it without breaking the graph; the
per-call bookkeeping lives in the ``Loop``, which is kept out of compiled
regions.
"""

from __future__ import annotations

import functools
import threading

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .outputs import flatten, unflatten

DENOISER_HOOK = "asyncdiff_denoiser"
BLOCK_HOOK = "asyncdiff_block"


class BlockState(threading.local):
    """What the block hooks of one AsyncDiff read: the current pass, or None
    outside AsyncDiff's own forwards (then every block simply runs).  One
    value per thread: in-process devices run their passes in threads."""

    def __init__(self):
        self.current = None


class DenoiserHook(ModelHook):
    """Routes every call of the denoiser through AsyncDiff's loop."""

    def __init__(self, loop):
        super().__init__()
        self.loop = loop

    def new_forward(self, module, *args, **kwargs):
        if self.loop is None:  # removed, but still in a chain another library holds
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.loop(self.fn_ref.original_forward, args, kwargs)

    def deinitalize_hook(self, module):
        self.loop = None
        return module


class BlockHook(ModelHook):
    """Computes or replays one unit (a block or a part of one)."""

    def __init__(self, unit: str, state: BlockState):
        super().__init__()
        self.unit = unit
        self.state = state

    def new_forward(self, module, *args, **kwargs):
        p = self.state.current
        if p is None or p.compute is None or self.unit in p.compute:
            out = self.fn_ref.original_forward(*args, **kwargs)
            if p is not None:
                p.ran.append(self.unit)
                if p.store:
                    p.stores[self.unit] = flatten(out)
                if p.relay is not None:
                    p.relay(self.unit, out)
            return out
        if p.relay is not None:  # a warm-up through the owners: the owner's output of this call
            out = p.relay(self.unit, None)
            if p.store:
                p.stores[self.unit] = flatten(out)
            return out
        spec, tensors = p.cache[self.unit]
        return unflatten(spec, tensors)


def attached_hook(module: torch.nn.Module, name: str = DENOISER_HOOK) -> ModelHook | None:
    """AsyncDiff's hook ``name`` (by default the denoiser hook) on ``module``, if registered."""
    registry = getattr(module, "_diffusers_hook", None)
    return registry.get_hook(name) if registry is not None else None


def register(module: torch.nn.Module, hook: ModelHook, name: str) -> bool:
    """Register ``hook`` as ``name``; True when this made the module's registry."""
    created = getattr(module, "_diffusers_hook", None) is None
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    return created


def _made_by_registry(forward) -> bool:
    """Whether ``forward`` is the wrapper a HookRegistry installs."""
    func = getattr(forward, "func", None)
    return isinstance(forward, functools.partial) and "HookRegistry.register_hook" in getattr(func, "__qualname__", "")


def unregister(module: torch.nn.Module, name: str, created: bool) -> None:
    """Remove the hook ``name`` from ``module``'s registry, leaving every other
    hook working: diffusers' own and other libraries' wrappers installed later.

    ``HookRegistry.remove_hook`` writes back the ``forward`` the registry saw
    when the hook came, which would drop a wrapper another library (accelerate's
    offloading hooks, say) installed over the registry's since.  In that case the
    hook is only taken out of the registry's tables: once removed it passes
    every call through (``DenoiserHook.deinitalize_hook``; a block hook does
    so as soon as AsyncDiff runs no pass), and the other library's wrapper
    keeps calling the chain, which now goes straight to the original forward.

    Once the registry holds no hook, the plain bound ``forward`` it leaves
    behind is taken away (the class's forward is the same), and so is the
    registry itself when it was made for this hook (``created``, ``register``'s
    answer): the module is as it was found."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or name not in registry.hooks:
        return
    if registry._hook_order[-1] != name or _made_by_registry(module.forward):
        registry.remove_hook(name, recurse=False)
    else:
        index = registry._hook_order.index(name)
        registry.hooks.pop(name).deinitalize_hook(module)
        registry._hook_order.pop(index)
        registry._fn_refs.pop(index)
    if not registry.hooks:
        if created:
            del module._diffusers_hook
        left = module.__dict__.get("forward")
        if getattr(left, "__self__", None) is module and getattr(left, "__func__", None) is type(module).forward:
            del module.forward  # the class's own forward, which the registry had bound to the instance
