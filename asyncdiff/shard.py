"""What a rank holds: the weights of its own blocks and the glue (docs/design.md §6.5).

After warm-up a rank computes only its component, so under a launch it keeps
only the parameters and buffers of the units its component owns (the extra
rank of stride 2: those of the last component) and the *glue*: every tensor
of the denoiser that lies outside every unit of the split (time and
conditioning embeddings, a transformer's patch embedding, the parameters of a
refined block outside its parts), and the denoiser's first parameter
(``first_parameter``).  The other units' tensors are moved to the
``meta`` device, which frees their memory.

``held_units`` names what a rank keeps; ``tensor_units`` maps every tensor
to its unit (or None for glue); ``place`` moves each tensor where it
belongs; ``Guard`` is the hook left on a sharded denoiser after ``remove()``
so that using it fails with a clear message.  The memory benchmark counts
bytes with the same functions.
"""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook

from .arch import Layout

META = torch.device("meta")
GUARD_HOOK = "asyncdiff_sharded"


def held_units(components, component: int) -> frozenset:
    """The units a rank keeps: those of the component it computes after warm-up
    (``Schedule.component_of(rank)``)."""
    return frozenset(components[component])


def unit_prefixes(layout: Layout, units) -> dict[str, str]:
    """Module path prefix ("down_blocks.1.") -> unit, for ``units``."""
    return {".".join(map(str, layout.paths[u])) + ".": u for u in units}


def tensor_units(layout: Layout, units, denoiser: torch.nn.Module) -> dict[str, str | None]:
    """Every parameter and buffer name of ``denoiser`` -> the unit among ``units``
    it belongs to, or None when it is glue."""
    prefixes = sorted(unit_prefixes(layout, units).items(), key=lambda kv: -len(kv[0]))
    out = {}
    for name, _ in _tensors(denoiser):
        out[name] = next((u for p, u in prefixes if name.startswith(p)), None)
    return out


def _tensors(module: torch.nn.Module):
    """(name, tensor) of every parameter and buffer, each once."""
    yield from module.named_parameters(remove_duplicate=True)
    yield from module.named_buffers(remove_duplicate=True)


def first_parameter(denoiser: torch.nn.Module) -> str | None:
    """The name of the denoiser's first parameter.  Every rank keeps it real, even
    when its unit belongs to another rank (a UNet's ``conv_in.weight``: a few
    kilobytes): diffusers reads a model's ``device`` and ``dtype``, and a
    pipeline its execution device, from the first parameter."""
    return next((name for name, _ in denoiser.named_parameters()), None)


def meta_names(module: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers that live on the meta device."""
    return [name for name, t in _tensors(module) if t.is_meta]


def check_real(denoiser: torch.nn.Module) -> None:
    """A denoiser whose weights are (partly) on the meta device cannot compute."""
    on_meta = meta_names(denoiser)
    if on_meta:
        raise ValueError(
            f"pipeline: the denoiser's weights are on the meta device ({len(on_meta)} tensors, e.g. "
            f"{on_meta[0]!r}); AsyncDiff needs real weights. A pipeline sharded by an earlier "
            "AsyncDiff(keep_weights=False) holds only one rank's blocks: reload it from its files"
        )


def _move(module: torch.nn.Module, name: str, tensor: torch.Tensor, device: torch.device, parameter: bool):
    if not parameter:
        module._buffers[name] = torch.empty_like(tensor, device=META) if device == META else tensor.to(device)
    elif device == META:  # a new Parameter: torch does not swap a real one's data for a meta tensor
        module._parameters[name] = torch.nn.Parameter(torch.empty_like(tensor, device=META),
                                                      requires_grad=tensor.requires_grad)
    else:
        tensor.data = tensor.data.to(device)  # as Module.to does: the same Parameter object


def move_real(module: torch.nn.Module, device) -> None:
    """Move every tensor of ``module`` that is not on the meta device to ``device``."""
    device = torch.device(device)
    for sub in module.modules():
        for kind, table in ((True, sub._parameters), (False, sub._buffers)):
            for name, tensor in list(table.items()):
                if tensor is not None and not tensor.is_meta and tensor.device != device:
                    _move(sub, name, tensor, device, kind)


def place(denoiser: torch.nn.Module, layout: Layout, units, held, device) -> int:
    """Put every tensor of ``denoiser`` where a rank keeps it: glue on ``device``,
    the units in ``held`` on ``device``, the other ``units`` on the meta
    device; ``held=None`` leaves the units where they are (the split is not
    known yet).  ``device=None`` leaves glue and held units where they are.
    Returns the bytes moved to the meta device."""
    prefixes = sorted(unit_prefixes(layout, units).items(), key=lambda kv: -len(kv[0]))
    first = first_parameter(denoiser)
    freed = 0
    for mod_name, module in denoiser.named_modules(remove_duplicate=True):
        base = f"{mod_name}." if mod_name else ""
        for kind, table in ((True, module._parameters), (False, module._buffers)):
            for name, tensor in list(table.items()):
                if tensor is None:
                    continue
                full = base + name
                unit = next((u for p, u in prefixes if full.startswith(p)), None)
                if unit is None or (held is not None and unit in held) or (kind and full == first):
                    target = None if device is None else torch.device(device)
                elif held is None:
                    target = None
                else:
                    target = META
                if target is None or tensor.device == target:
                    continue
                if target == META:
                    freed += tensor.numel() * tensor.element_size()
                _move(module, name, tensor, target, kind)
    return freed


class Guard(ModelHook):
    """Left on a sharded denoiser by ``remove()``: any call raises and says why."""

    def __init__(self, rank: int, component: int):
        super().__init__()
        self.rank, self.component = rank, component

    def new_forward(self, module, *args, **kwargs):
        raise RuntimeError(
            f"this denoiser was sharded by AsyncDiff (keep_weights=False): rank {self.rank} kept only the "
            f"blocks of component {self.component} and the glue, the others are on the meta device. Reload "
            "the pipeline from its files, or attach with keep_weights=True to get a complete pipeline back "
            "from remove()"
        )


def replica(denoiser: torch.nn.Module, layout: Layout, units, held, device) -> torch.nn.Module:
    """A second denoiser of the same class and config that holds only the glue
    and the units in ``held``, on ``device`` (the other units' tensors on the
    meta device).  Built from the config on the meta device and given the
    original's tensors (copied to ``device``, shared when already there), so
    no full copy is ever made and no hook of the original comes along.  Used
    for several devices in one process (docs/design.md §6.4)."""
    device = torch.device(device)
    with torch.device(META):
        copy = type(denoiser).from_config(dict(denoiser.config))
    copy.train(denoiser.training)
    prefixes = sorted(unit_prefixes(layout, units).items(), key=lambda kv: -len(kv[0]))
    originals = dict(denoiser.named_modules(remove_duplicate=False))
    for mod_name, module in copy.named_modules(remove_duplicate=False):
        source = originals[mod_name]
        base = f"{mod_name}." if mod_name else ""
        for parameter, table, from_table in ((True, module._parameters, source._parameters),
                                             (False, module._buffers, source._buffers)):
            for name in list(table):
                src = from_table.get(name)
                if src is None:
                    table[name] = None
                    continue
                unit = next((u for p, u in prefixes if (base + name).startswith(p)), None)
                keep = unit is None or unit in held
                new = src.detach().to(device) if keep else torch.empty_like(src, device=META)
                table[name] = torch.nn.Parameter(new, requires_grad=src.requires_grad) if parameter else new
    return copy
