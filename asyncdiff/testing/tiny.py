"""Tiny, offline diffusers pipelines with the topology of the real models.

Every builder here works without network access and without weights on disk:
the denoiser of each pipeline has the *same module tree* as the published
model (same block classes, same number of down/up blocks, same resnets,
attentions and transformer layers per block, same embedding types), only with
tiny channel widths, so that a whole pipeline call runs in a fraction of a
second on a CPU.  Weights are random, drawn from a seeded generator: the same
``seed`` always gives bit-identical weights.

The real denoiser configurations (the ``config.json`` of the published
checkpoints) ship in ``asyncdiff/testing/configs/``; :func:`real_config` returns them
for cost counting at real size, and :func:`tiny_config` derives the tiny ones
from them by shrinking widths, heads, embedding dims and sample size.

Sizes used by the tiny pipelines (see :func:`default_call_kwargs`):

* every VAE has a spatial scale factor of 8 (4 blocks), like the real ones,
  except the x4 upscaler's, which has a factor of 4 (3 blocks), also like the
  real one;
* the tiny denoisers work on 16x16 latents, i.e. 128x128 images (the upscaler
  takes a 16x16 low-resolution image and latent);
* text encoders are 2-layer CLIP models with hidden size 32 and 77 positions;
  SD3's, PixArt's and Flux's T5 encoder has d_model 128.

Three archs stand for denoisers without a paper preset (AsyncDiff splits them
automatically): ``"ddim"`` (an unconditional pixel-space ``UNet2DModel`` in a
``DDIMPipeline``, 16x16 RGB images), ``"pixart"`` (``PixArtTransformer2DModel``
in a ``PixArtAlphaPipeline``) and ``"flux"`` (``FluxTransformer2DModel`` in a
``FluxPipeline``, guidance-distilled: one transformer call per step).  No real
config ships for them: their tiny configs are written out in this module with
the published models' block types and depths, and :func:`real_config` /
:func:`build_real_unet` raise ``NotImplementedError`` (see
:data:`NO_REAL_CONFIG`).

Public API: :data:`ARCHS`, :func:`build_pipeline`, :func:`build_unet`,
:func:`tiny_config`, :func:`real_config`, :func:`default_call_kwargs`, plus the
helpers :func:`build_real_unet` (real-size denoiser, by default on the
``meta`` device, for cost counting), :func:`denoiser_class` and
:func:`real_motion_adapter_config`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "ARCHS",
    "build_pipeline",
    "build_unet",
    "build_real_unet",
    "denoiser_class",
    "tiny_config",
    "real_config",
    "real_motion_adapter_config",
    "default_call_kwargs",
    "NO_REAL_CONFIG",
]

ARCHS = (
    "sd15",
    "sd21",
    "sdxl",
    "sd15_img2img",
    "sdxl_img2img",
    "sdxl_inpaint",
    "upscaler",
    "svd",
    "animatediff",
    "sd3",
    "sdxl_controlnet",
    "ddim",
    "pixart",
    "flux",
)

_CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# arch -> the family whose denoiser it uses (same seed => same denoiser weights
# inside a family, e.g. "sdxl" and "sdxl_img2img").
_FAMILY = {
    "sd15": "sd15",
    "sd15_img2img": "sd15",
    "sd21": "sd21",
    "sdxl": "sdxl",
    "sdxl_img2img": "sdxl",
    "sdxl_controlnet": "sdxl",
    "sdxl_inpaint": "sdxl_inpaint",
    "upscaler": "upscaler",
    "svd": "svd",
    "animatediff": "animatediff",
    "sd3": "sd3",
    "ddim": "ddim",
    "pixart": "pixart",
    "flux": "flux",
}

_CONFIG_FILE = {
    "sd15": "sd15_unet.json",
    "sd21": "sd21_unet.json",
    "sdxl": "sdxl_unet.json",
    "sdxl_inpaint": "sdxl_unet.json",
    "upscaler": "x4_upscaler_unet.json",
    "svd": "svd_unet.json",
    "sd3": "sd3_medium_transformer.json",
}

# Tiny sizes shared by the builders.
_BASE_WIDTH = 32  # first UNet block width (real: 320, or 256 for the upscaler)
_GROUPS = 8  # norm_num_groups of the tiny denoisers (real: 32)
_LATENT = 16  # latent side of the tiny denoisers
_TEXT_HIDDEN = 32  # CLIP text hidden size (and projection size)
_TEXT_POSITIONS = 77  # CLIP max_position_embeddings == tokenizer model_max_length
_T5_HIDDEN = 128  # SD3's T5 d_model == joint_attention_dim (real 4096 = 2 x CLIP-L+G width)
_VAE_GROUPS = 4
_FRAMES = 3  # frames of the tiny video pipelines (SVD, AnimateDiff)


def _check_arch(arch: str) -> str:
    if arch not in _FAMILY:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return _FAMILY[arch]


def _load_json(name: str) -> dict:
    with open(_CONFIG_DIR / name, encoding="utf-8") as fh:
        return json.load(fh)


# --------------------------------------------------------------------------
# Real configurations
# --------------------------------------------------------------------------


def _motion_unet_config(unet_cfg: dict, adapter_cfg: dict) -> dict:
    """The UNetMotionModel config that ``UNetMotionModel.from_unet2d`` derives
    from a UNet2DConditionModel config and a MotionAdapter config."""
    from diffusers import UNetMotionModel

    cfg = dict(unet_cfg)
    cfg["down_block_types"] = [
        "CrossAttnDownBlockMotion" if "CrossAttn" in t else "DownBlockMotion" for t in cfg["down_block_types"]
    ]
    cfg["up_block_types"] = [
        "CrossAttnUpBlockMotion" if "CrossAttn" in t else "UpBlockMotion" for t in cfg["up_block_types"]
    ]
    cfg["motion_num_attention_heads"] = adapter_cfg["motion_num_attention_heads"]
    cfg["motion_max_seq_length"] = adapter_cfg["motion_max_seq_length"]
    cfg["use_motion_mid_block"] = adapter_cfg["use_motion_mid_block"]
    cfg["layers_per_block"] = adapter_cfg["motion_layers_per_block"]
    cfg["temporal_transformer_layers_per_mid_block"] = adapter_cfg.get("motion_transformer_layers_per_mid_block", 1)
    cfg["temporal_transformer_layers_per_block"] = adapter_cfg.get("motion_transformer_layers_per_block", 1)
    if adapter_cfg.get("conv_in_channels"):
        cfg["in_channels"] = adapter_cfg["conv_in_channels"]
    if not cfg.get("num_attention_heads"):
        cfg["num_attention_heads"] = cfg["attention_head_dim"]
    expected, optional = UNetMotionModel._get_signature_keys(UNetMotionModel)
    out = {k: v for k, v in cfg.items() if k in expected or k in optional}
    out["_class_name"] = "UNetMotionModel"
    return out


def real_config(arch: str) -> dict:
    """The denoiser config of the real model behind ``arch`` (a fresh dict).

    ``"sdxl_inpaint"`` is the SDXL base config with ``in_channels`` 9 (the
    dedicated SDXL inpainting UNet: latents + mask + masked-image latents);
    ``"animatediff"`` is the UNetMotionModel config that diffusers derives from
    the SD 1.5 UNet and the motion-adapter config; ``"sdxl_controlnet"``
    returns the SDXL UNet config (the ControlNet is built from it).

    ``"ddim"``, ``"pixart"`` and ``"flux"`` have no shipped real config: for
    them this raises ``NotImplementedError`` (their tiny configs are written
    out directly, see :func:`tiny_config`), and so does :func:`build_real_unet`.
    """
    fam = _check_arch(arch)
    if fam in NO_REAL_CONFIG:
        raise NotImplementedError(
            f"real_config: no real denoiser config is shipped for {arch!r} "
            f"(only for {', '.join(a for a in ARCHS if _FAMILY[a] not in NO_REAL_CONFIG)})"
        )
    if fam == "animatediff":
        return _motion_unet_config(_load_json("sd15_unet.json"), _load_json("animatediff_motion_adapter.json"))
    cfg = _load_json(_CONFIG_FILE[fam])
    if fam == "sdxl_inpaint":
        cfg["in_channels"] = 9
    return cfg


def real_motion_adapter_config() -> dict:
    """The real AnimateDiff motion-adapter config (MotionAdapter)."""
    return _load_json("animatediff_motion_adapter.json")


# --------------------------------------------------------------------------
# Tiny configurations
# --------------------------------------------------------------------------


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def _shrink_widths(widths):
    scale = _BASE_WIDTH / widths[0]
    return [_round_to(w * scale, _GROUPS) for w in widths]


def _shrink_heads(heads, real_widths, tiny_widths):
    """Shrink a head specification.

    An int (one head count for every block, SD 1.5 style) is divided by 4; a
    per-block list (constant head *dim*, SD 2.x/SDXL/SVD style) keeps the
    per-block proportions with the head dim halved relative to the width
    shrink (real 64 -> tiny 32 for the usual 10x width shrink)."""
    if isinstance(heads, int):
        out = max(1, heads // 4)
        for w in tiny_widths:
            if w % out:
                raise ValueError(f"tiny width {w} not divisible by {out} heads")
        return out
    out = []
    for h, rw, tw in zip(heads, real_widths, tiny_widths):
        n = max(1, int(round(h * tw / rw * 2)))
        if tw % n:
            raise ValueError(f"tiny width {tw} not divisible by {n} heads")
        out.append(n)
    return out


def _tiny_unet_config(real: dict, *, cross_attention_dim: int | None, text_proj_dim: int = 0) -> dict:
    cfg = copy.deepcopy(real)
    real_w = list(real["block_out_channels"])
    tiny_w = _shrink_widths(real_w)
    cfg["block_out_channels"] = tiny_w
    if "norm_num_groups" in cfg or cfg.get("_class_name") == "UNet2DConditionModel":
        cfg["norm_num_groups"] = _GROUPS
    for key in ("attention_head_dim", "num_attention_heads"):
        if cfg.get(key) is not None:
            cfg[key] = _shrink_heads(cfg[key], real_w, tiny_w)
    if cross_attention_dim is not None:
        cfg["cross_attention_dim"] = cross_attention_dim
    if cfg.get("addition_time_embed_dim"):
        real_atd = cfg["addition_time_embed_dim"]
        atd = 8
        cfg["addition_time_embed_dim"] = atd
        if cfg.get("addition_embed_type") == "text_time":
            # 6 micro-conditioning numbers (original size, crop, target size)
            # plus the pooled text embedding of text_encoder_2.
            n_time = (real["projection_class_embeddings_input_dim"] - _SDXL_REAL_TEXT_PROJ) // real_atd
            cfg["projection_class_embeddings_input_dim"] = n_time * atd + text_proj_dim
        elif cfg.get("projection_class_embeddings_input_dim"):
            # SVD: fps, motion bucket id, noise augmentation strength.
            n_time = real["projection_class_embeddings_input_dim"] // real_atd
            cfg["projection_class_embeddings_input_dim"] = n_time * atd
    if cfg.get("addition_embed_type_num_heads"):
        cfg["addition_embed_type_num_heads"] = 2  # unused by "text_time"; kept small
    if cfg.get("num_frames"):
        cfg["num_frames"] = _FRAMES  # the pipeline's default frame count
    cfg["sample_size"] = _LATENT
    return cfg


_SDXL_REAL_TEXT_PROJ = 1280  # projection_dim of SDXL's text_encoder_2 (OpenCLIP bigG)


def _tiny_sd3_config(real: dict) -> dict:
    cfg = copy.deepcopy(real)
    heads, head_dim = 2, 16
    cfg["num_attention_heads"] = heads
    cfg["attention_head_dim"] = head_dim
    cfg["caption_projection_dim"] = heads * head_dim  # real: 24 * 64 = 1536
    cfg["joint_attention_dim"] = _T5_HIDDEN  # T5 width (CLIP states are zero-padded to it)
    cfg["pooled_projection_dim"] = 2 * _TEXT_HIDDEN  # two CLIP projections concatenated
    cfg["sample_size"] = _LATENT
    cfg["pos_embed_max_size"] = int(real["pos_embed_max_size"] * _LATENT / real["sample_size"])
    return cfg


def _tiny_adapter_config() -> dict:
    real = real_motion_adapter_config()
    cfg = copy.deepcopy(real)
    cfg["block_out_channels"] = _shrink_widths(real["block_out_channels"])
    cfg["motion_norm_num_groups"] = _GROUPS
    cfg["motion_num_attention_heads"] = _shrink_heads(
        real["motion_num_attention_heads"], real["block_out_channels"], cfg["block_out_channels"]
    )
    return cfg


# --- archs without a shipped real config -----------------------------------
#
# Their tiny configs are written out here directly.  Block types and depths
# follow the published models (as recalled, not read from a shipped file):
#
# * "ddim":   google/ddpm-cifar10-32 style UNet2DModel (pixel space, 4 levels,
#             2 resnets per level, self-attention at the second level only);
# * "pixart": PixArt-alpha XL/2 (28 PixArt transformer blocks, patch 2,
#             adaLN-single, learned sigma: 8 output channels);
# * "flux":   FLUX.1-dev (19 double-stream + 38 single-stream blocks, guidance
#             embedding, 3-axis RoPE; latents packed 2x2: 64 input channels).

# Archs for which real_config / build_real_unet raise NotImplementedError.
NO_REAL_CONFIG = ("ddim", "pixart", "flux")
_PIXEL = 16  # image side of the tiny pixel-space UNet2DModel ("ddim")


def _tiny_ddim_config() -> dict:
    return {
        "_class_name": "UNet2DModel",
        "sample_size": _PIXEL,
        "in_channels": 3,
        "out_channels": 3,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": 1,
        "flip_sin_to_cos": False,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [_BASE_WIDTH, 2 * _BASE_WIDTH, 2 * _BASE_WIDTH, 2 * _BASE_WIDTH],  # real 128/256
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "downsample_padding": 0,
        "act_fn": "silu",
        "attention_head_dim": None,  # one head per attention, as in the real model
        "norm_num_groups": _GROUPS,
        "norm_eps": 1e-6,
    }


def _tiny_pixart_config() -> dict:
    heads, head_dim = 2, 16  # real: 16 x 72 = 1152
    return {
        "_class_name": "PixArtTransformer2DModel",
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": 28,
        "dropout": 0.0,
        "norm_num_groups": 32,
        "cross_attention_dim": heads * head_dim,
        "attention_bias": True,
        "sample_size": _LATENT,  # not 32/64/128: call with use_resolution_binning=False
        "patch_size": 2,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "upcast_attention": False,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "caption_channels": _T5_HIDDEN,  # real: T5-XXL width 4096
    }


def _tiny_flux_config() -> dict:
    heads, axes = 2, [4, 6, 6]  # head dim 16 = sum of the RoPE axes (real: 24 heads, 16+56+56)
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": 64,  # 16 latent channels packed 2x2
        "out_channels": None,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": sum(axes),
        "num_attention_heads": heads,
        "joint_attention_dim": _T5_HIDDEN,  # real: T5-XXL width 4096
        "pooled_projection_dim": _TEXT_HIDDEN,  # real: CLIP-L width 768
        "guidance_embeds": True,  # FLUX.1-dev: guidance-distilled, one call per step
        "axes_dims_rope": axes,
    }


_TINY_WRITTEN = {"ddim": _tiny_ddim_config, "pixart": _tiny_pixart_config, "flux": _tiny_flux_config}


def tiny_config(arch: str) -> dict:
    """The tiny denoiser config for ``arch`` (a fresh dict), derived from
    :func:`real_config` by shrinking widths, heads, embedding sizes and the
    sample size; block types and depths are untouched.  For ``"ddim"``,
    ``"pixart"`` and ``"flux"`` (no real config shipped) it is written out
    directly, with the published model's block types and depths."""
    fam = _check_arch(arch)
    if fam in _TINY_WRITTEN:
        return _TINY_WRITTEN[fam]()
    if fam == "sd3":
        return _tiny_sd3_config(real_config(arch))
    if fam == "animatediff":
        unet = _tiny_unet_config(_load_json("sd15_unet.json"), cross_attention_dim=_TEXT_HIDDEN)
        return _motion_unet_config(unet, _tiny_adapter_config())
    real = real_config(arch)
    if fam in ("sdxl", "sdxl_inpaint"):
        return _tiny_unet_config(real, cross_attention_dim=2 * _TEXT_HIDDEN, text_proj_dim=_TEXT_HIDDEN)
    # sd15, sd21, upscaler: one CLIP text encoder; svd: CLIP image projection.
    return _tiny_unet_config(real, cross_attention_dim=_TEXT_HIDDEN)


def denoiser_class(arch: str):
    """The diffusers class of the denoiser of ``arch``."""
    import diffusers

    fam = _check_arch(arch)
    cfg = tiny_config(arch) if fam in NO_REAL_CONFIG else real_config(arch)
    return getattr(diffusers, cfg["_class_name"])


# --------------------------------------------------------------------------
# Seeding
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int, tag: str):
    """Run a block with the CPU RNG seeded from (seed, tag), restoring the
    caller's RNG state afterwards.  Modules built inside are deterministic."""
    derived = (int(seed) * 1_000_003 + zlib.crc32(tag.encode("utf-8"))) % (2**63 - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived)
        yield torch.Generator("cpu").manual_seed(derived)


# --------------------------------------------------------------------------
# Denoisers
# --------------------------------------------------------------------------


def _build_tiny_adapter(seed: int):
    from diffusers import MotionAdapter

    cfg = {k: v for k, v in _tiny_adapter_config().items() if not k.startswith("_")}
    with _seeded(seed, "motion_adapter"):
        return MotionAdapter(**cfg)


def build_unet(arch: str, seed: int = 0):
    """The tiny denoiser of ``arch`` with random weights (deterministic in
    ``seed``), in float32 on the CPU, in eval mode.

    For ``"animatediff"`` this is the UNetMotionModel made from the tiny SD 1.5
    UNet and the tiny motion adapter (both seeded); for ``"sd3"`` the
    SD3Transformer2DModel; for ``"ddim"`` a UNet2DModel, for ``"pixart"`` a
    PixArtTransformer2DModel and for ``"flux"`` a FluxTransformer2DModel."""
    fam = _check_arch(arch)
    if fam == "animatediff":
        from diffusers import UNet2DConditionModel, UNetMotionModel

        with _seeded(seed, "unet:sd15"):
            base = UNet2DConditionModel.from_config(tiny_config("sd15"))
        model = UNetMotionModel.from_unet2d(base, _build_tiny_adapter(seed))
        return model.eval()
    cls = denoiser_class(arch)
    with _seeded(seed, f"unet:{fam}"):
        model = cls.from_config(tiny_config(arch))
    return model.eval()


def build_real_unet(arch: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32):
    """The denoiser of ``arch`` at its *real* size (by default on the ``meta``
    device: no memory, no weights) for counting parameters / FLOPs or shapes."""
    cls = denoiser_class(arch)
    with torch.device(device):
        model = cls.from_config(real_config(arch))
    return model.to(dtype=dtype).eval()


def _build_controlnet(unet, seed: int):
    """A ControlNet made from the (tiny) SDXL UNet, like ControlNet-SDXL.

    ControlNetModel zero-initialises its output convolutions (the "zero
    convs") so that an untrained ControlNet has no effect; here they get small
    random weights instead, so the control path does change the result."""
    from diffusers import ControlNetModel

    with _seeded(seed, "controlnet"):
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
        zero_convs = list(net.controlnet_down_blocks) + [net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
        with torch.no_grad():
            for conv in zero_convs:
                conv.weight.normal_(0.0, 0.05)
                conv.bias.normal_(0.0, 0.05)
    return net.eval()


# --------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------

# Words that get a full BPE merge path, so that prompts made of them map to
# a few distinct ids each (and anything else still tokenises byte by byte).
_WORDS = """
a an the of in on at by to with and or from for into over under near door
kitten cat dog puppy bird horse cow fox wolf bear lion tiger owl fish whale
man woman child girl boy person people astronaut robot knight wizard king queen
house castle city street road bridge tower garden forest tree trees flower flowers
mountain mountains river lake sea ocean beach island desert snow rain sky cloud
clouds sun moon star stars night day morning evening sunset sunrise light shadow
red green blue yellow orange purple pink black white gray golden silver dark bright
big small tiny huge old young beautiful cute happy sad angry calm quiet loud
photo photograph painting drawing sketch portrait landscape illustration render
detailed realistic cinematic epic dramatic soft sharp high quality resolution
style art artist oil watercolor digital anime cartoon studio lighting bokeh
sitting standing running flying walking sleeping eating playing reading looking
window table chair bed room kitchen car train boat ship plane bicycle street
apple bread coffee cup book hat coat dress shoe glass stone wood metal paper
front behind above below inside outside next between across through around
fantasy science fiction space planet galaxy nebula future ancient medieval modern
"""


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character table of byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
    printable += list(range(ord("\u00ae"), ord("\u00ff") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    base = [_bytes_to_unicode()[b] for b in range(256)]
    tokens = base + [c + "</w>" for c in base]
    seen = set(tokens)
    merges: list[tuple[str, str]] = []
    merge_set = set()
    words = sorted(set(_WORDS.split()), key=lambda w: (len(w), w))
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        cur = symbols[0]
        for sym in symbols[1:]:
            pair = (cur, sym)
            cur = cur + sym
            if pair not in merge_set:
                merge_set.add(pair)
                merges.append(pair)
            if cur not in seen:
                seen.add(cur)
                tokens.append(cur)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _build_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer loaded from a vocabulary and merges file written into a
    temporary directory (removed afterwards)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    tmp = tempfile.mkdtemp(prefix="asyncdiff_tok_")
    try:
        with open(Path(tmp) / "vocab.json", "w", encoding="utf-8") as fh:
            json.dump(vocab, fh, ensure_ascii=False)
        with open(Path(tmp) / "merges.txt", "w", encoding="utf-8") as fh:
            fh.write("#version: 0.2\n")
            for a, b in merges:
                fh.write(f"{a} {b}\n")
        tok = CLIPTokenizer.from_pretrained(
            tmp,
            model_max_length=_TEXT_POSITIONS,
            pad_token=pad_token,
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def _build_t5_tokenizer():
    """A tiny Unigram T5 tokenizer (T5TokenizerFast) over the same word list."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(chr(c), -8.0) for c in range(ord("a"), ord("z") + 1)]
    pieces += [(chr(c), -9.0) for c in range(ord("0"), ord("9") + 1)]
    pieces += [(p, -9.5) for p in ",.!?'-"]
    for w in sorted(set(_WORDS.split()), key=lambda w: (len(w), w)):
        pieces.append(("\u2581" + w, -4.0 - 0.01 * len(w)))
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


# --------------------------------------------------------------------------
# Text / image encoders and VAEs
# --------------------------------------------------------------------------


def _clip_text_config(tok, *, act: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=2 * _TEXT_HIDDEN,
        projection_dim=_TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_TEXT_POSITIONS,
        hidden_act=act,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _build_clip_text(tok, seed: int, tag: str, *, projection: bool = False, act: str = "quick_gelu"):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with _seeded(seed, tag):
        model = cls(_clip_text_config(tok, act=act))
    return model.eval()


def _build_t5(tok, seed: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=len(tok),
        d_model=_T5_HIDDEN,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    with _seeded(seed, "text_encoder_3"):
        model = T5EncoderModel(cfg)
    return model.eval()


def _build_vae(seed: int, *, blocks: int = 4, latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    widths = [8, 8, 16, 16][-blocks:]  # scale factor 2 ** (blocks - 1)
    with _seeded(seed, f"vae:{blocks}:{latent_channels}"):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * blocks,
            up_block_types=["UpDecoderBlock2D"] * blocks,
            block_out_channels=widths,
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=_VAE_GROUPS,
            sample_size=_LATENT * 2 ** (blocks - 1),
            **extra,
        )
    return vae.eval()


def _build_temporal_vae(seed: int):
    from diffusers import AutoencoderKLTemporalDecoder

    # Its encoder/decoder use 32 norm groups unconditionally: widths of 32.
    with _seeded(seed, "vae:temporal"):
        vae = AutoencoderKLTemporalDecoder(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            block_out_channels=(32, 32, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            sample_size=_LATENT * 8,
        )
    return vae.eval()


def _build_clip_vision(seed: int):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=2 * _TEXT_HIDDEN,
        projection_dim=_TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,  # the SVD pipeline always resizes its input to 224x224
        patch_size=32,
        hidden_act="gelu",
    )
    with _seeded(seed, "image_encoder"):
        model = CLIPVisionModelWithProjection(cfg)
    return model.eval()


def _image_processor():
    try:
        from transformers import CLIPImageProcessorPil as cls  # no torchvision needed
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as cls
    return cls(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})


# --------------------------------------------------------------------------
# Schedulers (configured like the real models')
# --------------------------------------------------------------------------

_SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _scheduler(fam: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    if fam == "sd3":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    if fam == "flux":
        # FLUX.1-dev: the shift depends on the image's token count (mu).
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    if fam == "pixart":
        from diffusers import DPMSolverMultistepScheduler

        # PixArt-alpha's DPM-Solver++ (2nd order) on the linear DDPM betas.
        return DPMSolverMultistepScheduler(
            num_train_timesteps=1000,
            beta_start=0.0001,
            beta_end=0.02,
            beta_schedule="linear",
            prediction_type="epsilon",
            solver_order=2,
            algorithm_type="dpmsolver++",
            lower_order_final=True,
        )
    if fam == "ddim":
        # The DDPM-CIFAR10 schedule (linear betas, x0 clipped), sampled with DDIM.
        return DDIMScheduler(
            num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=True
        )
    if fam == "svd":
        return EulerDiscreteScheduler(
            **_SD_BETAS,
            prediction_type="v_prediction",
            interpolation_type="linear",
            use_karras_sigmas=True,
            sigma_min=0.002,
            sigma_max=700.0,
            timestep_spacing="leading",
            timestep_type="continuous",
            steps_offset=1,
        )
    common = dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if fam == "animatediff":
        # AnimateDiff's recommended DDIM setup on the SD 1.5 base.
        return DDIMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="linear",
            timestep_spacing="linspace",
            **common,
        )
    pred = "v_prediction" if fam in ("sd21", "upscaler") else "epsilon"
    return DDIMScheduler(**_SD_BETAS, prediction_type=pred, timestep_spacing="leading", **common)


# --------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------


def _sdxl_parts(seed: int) -> dict:
    tok = _build_clip_tokenizer()
    tok2 = _build_clip_tokenizer(pad_token="!")
    return dict(
        vae=_build_vae(seed, scaling_factor=0.13025),
        text_encoder=_build_clip_text(tok, seed, "text_encoder", act="quick_gelu"),
        text_encoder_2=_build_clip_text(tok2, seed, "text_encoder_2", projection=True, act="gelu"),
        tokenizer=tok,
        tokenizer_2=tok2,
        scheduler=_scheduler("sdxl"),
    )


def build_pipeline(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A complete tiny pipeline for ``arch`` on the CPU, progress bar off.

    Same ``seed`` => bit-identical weights.  No network access, no files left
    behind.  Call it with :func:`default_call_kwargs`."""
    import diffusers as D

    fam = _check_arch(arch)
    if arch in ("sd15", "sd21", "sd15_img2img"):
        tok = _build_clip_tokenizer()
        act = "quick_gelu" if fam == "sd15" else "gelu"
        cls = D.StableDiffusionImg2ImgPipeline if arch == "sd15_img2img" else D.StableDiffusionPipeline
        pipe = cls(
            vae=_build_vae(seed, scaling_factor=0.18215),
            text_encoder=_build_clip_text(tok, seed, "text_encoder", act=act),
            tokenizer=tok,
            unet=build_unet(arch, seed),
            scheduler=_scheduler(fam),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif arch in ("sdxl", "sdxl_img2img"):
        cls = D.StableDiffusionXLImg2ImgPipeline if arch == "sdxl_img2img" else D.StableDiffusionXLPipeline
        pipe = cls(**_sdxl_parts(seed), unet=build_unet(arch, seed), add_watermarker=False)
    elif arch == "sdxl_inpaint":
        pipe = D.StableDiffusionXLInpaintPipeline(
            **_sdxl_parts(seed), unet=build_unet(arch, seed), add_watermarker=False
        )
    elif arch == "sdxl_controlnet":
        unet = build_unet(arch, seed)
        pipe = D.StableDiffusionXLControlNetPipeline(
            **_sdxl_parts(seed), unet=unet, controlnet=_build_controlnet(unet, seed), add_watermarker=False
        )
    elif arch == "upscaler":
        from diffusers import DDPMScheduler

        tok = _build_clip_tokenizer()
        pipe = D.StableDiffusionUpscalePipeline(
            vae=_build_vae(seed, blocks=3, scaling_factor=0.08333),
            text_encoder=_build_clip_text(tok, seed, "text_encoder", act="gelu"),
            tokenizer=tok,
            unet=build_unet(arch, seed),
            low_res_scheduler=DDPMScheduler(
                num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear"
            ),
            scheduler=_scheduler(fam),
            max_noise_level=350,
        )
    elif arch == "svd":
        pipe = D.StableVideoDiffusionPipeline(
            vae=_build_temporal_vae(seed),
            image_encoder=_build_clip_vision(seed),
            unet=build_unet(arch, seed),
            scheduler=_scheduler(fam),
            feature_extractor=_image_processor(),
        )
    elif arch == "animatediff":
        tok = _build_clip_tokenizer()
        unet = build_unet(arch, seed)
        pipe = D.AnimateDiffPipeline(
            vae=_build_vae(seed, scaling_factor=0.18215),
            text_encoder=_build_clip_text(tok, seed, "text_encoder", act="quick_gelu"),
            tokenizer=tok,
            unet=unet,
            motion_adapter=_build_tiny_adapter(seed),
            scheduler=_scheduler(fam),
        )
    elif arch == "sd3":
        tok = _build_clip_tokenizer()
        tok2 = _build_clip_tokenizer(pad_token="!")
        tok3 = _build_t5_tokenizer()
        pipe = D.StableDiffusion3Pipeline(
            transformer=build_unet(arch, seed),
            scheduler=_scheduler(fam),
            vae=_build_vae(
                seed,
                latent_channels=16,
                scaling_factor=1.5305,
                shift_factor=0.0609,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
            text_encoder=_build_clip_text(tok, seed, "text_encoder", projection=True, act="quick_gelu"),
            tokenizer=tok,
            text_encoder_2=_build_clip_text(tok2, seed, "text_encoder_2", projection=True, act="gelu"),
            tokenizer_2=tok2,
            text_encoder_3=_build_t5(tok3, seed),
            tokenizer_3=tok3,
        )
    elif arch == "ddim":
        pipe = D.DDIMPipeline(unet=build_unet(arch, seed), scheduler=_scheduler(fam))
    elif arch == "pixart":
        tok = _build_t5_tokenizer()
        pipe = D.PixArtAlphaPipeline(
            tokenizer=tok,
            text_encoder=_build_t5(tok, seed),
            vae=_build_vae(seed, scaling_factor=0.18215),
            transformer=build_unet(arch, seed),
            scheduler=_scheduler(fam),
        )
    elif arch == "flux":
        tok = _build_clip_tokenizer()
        tok2 = _build_t5_tokenizer()
        pipe = D.FluxPipeline(
            scheduler=_scheduler(fam),
            vae=_build_vae(
                seed,
                latent_channels=16,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
            text_encoder=_build_clip_text(tok, seed, "text_encoder", act="quick_gelu"),
            tokenizer=tok,
            text_encoder_2=_build_t5(tok2, seed),
            tokenizer_2=tok2,
            transformer=build_unet(arch, seed),
        )
    else:  # pragma: no cover - guarded by _check_arch
        raise ValueError(arch)
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------
# Call arguments
# --------------------------------------------------------------------------


def _pattern_image(size: int, seed: int, kind: str = "photo"):
    """A deterministic RGB PIL image: smooth colour gradients plus a little
    seeded noise ("photo"), or a white-on-black line drawing ("edges")."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    if kind == "edges":
        img = np.zeros((size, size), np.float32)
        img[(np.abs(x - 0.5) < 0.02) | (np.abs(y - 0.3) < 0.02)] = 1.0
        img[np.abs(np.hypot(x - 0.5, y - 0.6) - 0.25) < 0.02] = 1.0
        arr = np.repeat(img[..., None], 3, axis=2)
    elif kind == "mask":
        img = np.zeros((size, size), np.float32)
        img[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
        arr = np.repeat(img[..., None], 3, axis=2)
    else:
        phase = rng.uniform(0, 2 * np.pi, size=3)
        arr = np.stack(
            [0.5 + 0.4 * np.sin(2 * np.pi * (x + 0.5 * y) + phase[c] + c) for c in range(3)], axis=2
        )
        arr = arr + rng.normal(0.0, 0.05, size=arr.shape)
    return Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8), "RGB")


def default_call_kwargs(arch: str, seed: int = 0) -> dict:
    """Keyword arguments for a fast, deterministic call of the tiny pipeline.

    Includes a fresh ``generator`` seeded with ``seed`` (a new object on every
    call, so calling this twice gives two identical generators),
    ``guidance_scale > 1`` (classifier-free guidance batched into one
    denoiser call per step) and ``output_type="latent"``.  Image sizes: the
    VAE scale factor is 8, the latent 16x16, hence 128x128 images; the
    upscaler's low-resolution image and latent are 16x16 (its VAE factor is 4)
    and SVD/AnimateDiff make 3 frames.

    Exceptions: ``"ddim"`` is unconditional (no prompt, no guidance; a batch
    of 2 images of 16x16 pixels, ``output_type="pt"``); ``"flux"`` is
    guidance-distilled (``guidance_scale`` feeds the guidance embedding, no
    batched negative prompt) and returns packed latents; ``"pixart"`` turns
    resolution binning off (the tiny sample size has no bin)."""
    _check_arch(arch)
    side = _LATENT * 8
    kw: dict = dict(
        prompt="a photo of a cute kitten sitting by a red door",
        num_inference_steps=3,
        guidance_scale=5.0,
        output_type="latent",
        generator=torch.Generator("cpu").manual_seed(seed),
    )
    if arch in ("sd15", "sd21", "sdxl", "sd3", "animatediff", "sdxl_controlnet"):
        kw.update(height=side, width=side)
    if arch in ("sd15_img2img", "sdxl_img2img"):
        kw.update(image=_pattern_image(side, seed), strength=0.75, num_inference_steps=4)
    if arch == "sdxl_inpaint":
        kw.update(
            image=_pattern_image(side, seed),
            mask_image=_pattern_image(side, seed, "mask"),
            height=side,
            width=side,
            strength=0.75,
            num_inference_steps=4,
        )
    if arch == "sdxl_controlnet":
        kw.update(image=_pattern_image(side, seed, "edges"), controlnet_conditioning_scale=0.8)
    if arch == "upscaler":
        kw.update(image=_pattern_image(_LATENT, seed), noise_level=20)
    if arch == "animatediff":
        kw.update(num_frames=_FRAMES)
    if arch == "pixart":
        # the tiny sample size has no resolution bin; no caption cleaning (needs bs4/ftfy)
        kw.update(height=side, width=side, guidance_scale=4.5, use_resolution_binning=False,
                  clean_caption=False, max_sequence_length=32)
    if arch == "flux":
        # guidance-distilled: guidance_scale feeds the guidance embedding, one call per step
        kw.update(height=side, width=side, guidance_scale=3.5, max_sequence_length=32)
    if arch == "ddim":
        # unconditional, pixel space: no prompt, no guidance, 16x16 images as a tensor
        kw = dict(
            batch_size=2,
            num_inference_steps=3,
            eta=0.0,
            output_type="pt",
            generator=torch.Generator("cpu").manual_seed(seed),
        )
    if arch == "svd":
        kw = dict(
            image=_pattern_image(side, seed),
            height=side,
            width=side,
            num_frames=_FRAMES,
            num_inference_steps=3,
            min_guidance_scale=1.0,
            max_guidance_scale=3.0,
            fps=7,
            motion_bucket_id=127,
            noise_aug_strength=0.02,
            decode_chunk_size=3,
            output_type="latent",
            generator=torch.Generator("cpu").manual_seed(seed),
        )
    return kw
