"""Recognise a denoiser by its structure and name the blocks AsyncDiff can assign.

A *unit* is a submodule that a split assigns to a component.  For a UNet the
top-level units are ``conv_in``, ``d0``..``dK`` (down_blocks), ``mid``,
``u0``..``uK`` (up_blocks), ``conv_norm_out`` and ``conv_out``; a down, mid or
up block can be refined into its sub-units ``r<j>`` (resnets), ``a<j>``
(attentions), ``m<j>`` (motion modules), ``ds`` (downsampler) and ``us``
(upsampler), e.g. ``u1.a2``.  For a transformer the units are its blocks
``b<j>`` (``transformer_blocks``), ``s<j>`` (``single_transformer_blocks``) and
the output layers ``norm_out`` and ``proj_out``.

The family (used only to pick the paper's preset split) is read from the
denoiser's classes and config, never from a hub id or a path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Sub-unit letters of a UNet block, in the order a block usually runs them.
_SUB_LISTS = (("resnets", "r"), ("attentions", "a"), ("motion_modules", "m"))


@dataclass
class Layout:
    """The units of one denoiser: names, where they live, how they nest."""

    kind: str  # "unet" or "transformer"
    family: str  # "sd1", "sd2", "sdxl", "svd", "x4", "animatediff", "sd3" or "generic"
    top: list[str]  # top-level units in execution order
    subs: dict[str, list[str]] = field(default_factory=dict)  # top -> sub-units
    paths: dict[str, tuple] = field(default_factory=dict)  # unit -> attribute path

    @property
    def final(self) -> str:
        """The unit whose output is the denoiser's output."""
        return self.top[-1]

    def parent(self, name: str) -> str | None:
        return name.split(".", 1)[0] if "." in name else None

    def fine_units(self) -> list[str]:
        """Every top-level unit replaced by its sub-units where it has any."""
        out: list[str] = []
        for t in self.top:
            out.extend(self.subs.get(t) or [t])
        return out

    def module(self, name: str, root: torch.nn.Module) -> torch.nn.Module:
        if name not in self.paths:
            raise KeyError(name)
        obj = root
        for step in self.paths[name]:
            obj = obj[step] if isinstance(step, int) else getattr(obj, step)
        return obj


def _is_unet(m: torch.nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("conv_in", "down_blocks", "up_blocks", "conv_out"))


def _is_transformer(m: torch.nn.Module) -> bool:
    return isinstance(getattr(m, "transformer_blocks", None), torch.nn.ModuleList)


def _block_subs(prefix: str, path: tuple, block: torch.nn.Module, paths: dict) -> list[str]:
    """Sub-units of a UNet block, interleaved (r0 a0 m0 r1 ...) then ds/us."""
    lists = []
    for attr, letter in _SUB_LISTS:
        mods = getattr(block, attr, None)
        if isinstance(mods, torch.nn.ModuleList) and len(mods):
            lists.append((attr, letter, len(mods)))
    names: list[str] = []
    longest = max((n for _, _, n in lists), default=0)
    for j in range(longest):
        for attr, letter, n in lists:
            if j < n:
                name = f"{prefix}.{letter}{j}"
                paths[name] = path + (attr, j)
                names.append(name)
    for attr, short in (("downsamplers", "ds"), ("upsamplers", "us")):
        mods = getattr(block, attr, None)
        if isinstance(mods, torch.nn.ModuleList) and len(mods):
            if len(mods) != 1:  # never seen in diffusers; refuse rather than guess
                raise TypeError(f"{type(block).__name__}.{attr} holds {len(mods)} modules; expected 1")
            name = f"{prefix}.{short}"
            paths[name] = path + (attr, 0)
            names.append(name)
    return names


def _unet_family(m: torch.nn.Module) -> str:
    cls = type(m).__name__
    cfg = getattr(m, "config", {}) or {}
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    if cls == "UNetSpatioTemporalConditionModel":
        return "svd"
    if cls == "UNetMotionModel":
        return "animatediff"
    down = list(get("down_block_types", ()) or ())
    up = list(get("up_block_types", ()) or ())
    if cls != "UNet2DConditionModel":
        return "generic"
    if get("addition_embed_type") == "text_time" and down == [
        "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"
    ]:
        return "sdxl"
    sd_down = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    sd_up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    if down == ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3 and up == ["CrossAttnUpBlock2D"] * 3 + [
        "UpBlock2D"
    ] and get("num_class_embeds"):
        return "x4"
    if down == sd_down and up == sd_up and get("layers_per_block") == 2 and not get("addition_embed_type"):
        return "sd2" if get("use_linear_projection") else "sd1"
    return "generic"


def describe(denoiser: torch.nn.Module) -> Layout:
    """Build the Layout of a diffusers denoiser, or raise TypeError saying why not."""
    if not isinstance(denoiser, torch.nn.Module):
        raise TypeError(f"denoiser: expected a torch.nn.Module, got {type(denoiser).__name__}")
    paths: dict[str, tuple] = {}
    subs: dict[str, list[str]] = {}
    top: list[str] = []
    if _is_unet(denoiser):
        paths["conv_in"] = ("conv_in",)
        top.append("conv_in")
        for i, blk in enumerate(denoiser.down_blocks):
            name = f"d{i}"
            paths[name] = ("down_blocks", i)
            top.append(name)
            subs[name] = _block_subs(name, ("down_blocks", i), blk, paths)
        if getattr(denoiser, "mid_block", None) is not None:
            paths["mid"] = ("mid_block",)
            top.append("mid")
            subs["mid"] = _block_subs("mid", ("mid_block",), denoiser.mid_block, paths)
        for i, blk in enumerate(denoiser.up_blocks):
            name = f"u{i}"
            paths[name] = ("up_blocks", i)
            top.append(name)
            subs[name] = _block_subs(name, ("up_blocks", i), blk, paths)
        for name in ("conv_norm_out", "conv_out"):
            if getattr(denoiser, name, None) is not None:
                paths[name] = (name,)
                top.append(name)
        subs = {k: v for k, v in subs.items() if v}
        return Layout("unet", _unet_family(denoiser), top, subs, paths)
    if _is_transformer(denoiser):
        for attr, letter in (("transformer_blocks", "b"), ("single_transformer_blocks", "s")):
            mods = getattr(denoiser, attr, None)
            if isinstance(mods, torch.nn.ModuleList):
                for j in range(len(mods)):
                    name = f"{letter}{j}"
                    paths[name] = (attr, j)
                    top.append(name)
        for name in ("norm_out", "proj_out"):
            if isinstance(getattr(denoiser, name, None), torch.nn.Module):
                paths[name] = (name,)
                top.append(name)
        family = "sd3" if type(denoiser).__name__ == "SD3Transformer2DModel" else "generic"
        return Layout("transformer", family, top, {}, paths)
    raise TypeError(
        f"denoiser: {type(denoiser).__name__} is neither a UNet (conv_in, down_blocks, up_blocks, conv_out) "
        "nor a transformer with transformer_blocks; AsyncDiff cannot split it"
    )
