"""Tests of the tiny, offline, same-topology pipelines (asyncdiff/testing/tiny.py)."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

try:
    from asyncdiff.testing import tiny
except ImportError:  # the package's compiled core is not built: tiny.py needs none of it
    _path = Path(__file__).resolve().parents[1] / "asyncdiff" / "testing" / "tiny.py"
    _spec = importlib.util.spec_from_file_location("asyncdiff_tiny_standalone", _path)
    tiny = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = tiny
    _spec.loader.exec_module(tiny)

ARCHS = tiny.ARCHS
REQUIRED = ("sd15", "sd21", "sdxl")

PIPELINE_CLASS = {
    "sd15": "StableDiffusionPipeline",
    "sd21": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd15_img2img": "StableDiffusionImg2ImgPipeline",
    "sdxl_img2img": "StableDiffusionXLImg2ImgPipeline",
    "sdxl_inpaint": "StableDiffusionXLInpaintPipeline",
    "upscaler": "StableDiffusionUpscalePipeline",
    "svd": "StableVideoDiffusionPipeline",
    "animatediff": "AnimateDiffPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "sdxl_controlnet": "StableDiffusionXLControlNetPipeline",
    "ddim": "DDIMPipeline",
    "pixart": "PixArtAlphaPipeline",
    "flux": "FluxPipeline",
}

SCHEDULER_CLASS = {"svd": "EulerDiscreteScheduler", "sd3": "FlowMatchEulerDiscreteScheduler",
                   "pixart": "DPMSolverMultistepScheduler", "flux": "FlowMatchEulerDiscreteScheduler"}
# archs built from configs written in tiny.py (no real config shipped)
REAL_ARCHS = tuple(a for a in ARCHS if a not in tiny.NO_REAL_CONFIG)


def test_archs_without_a_real_config_say_so():
    for arch in tiny.NO_REAL_CONFIG:
        with pytest.raises(NotImplementedError):
            tiny.real_config(arch)


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """The tiny models are too small to gain from intra-op threads, and with
    other processes on the machine, spinning OpenMP workers make a call 10-50x
    slower; one thread keeps the timings (and the file's run time) steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    cached_pipe.cache_clear()  # free the cached pipelines (a few hundred MB) for later test files


@functools.lru_cache(maxsize=None)
def cached_pipe(arch):
    return tiny.build_pipeline(arch, seed=0)


def denoiser_of(pipe):
    return pipe.transformer if hasattr(pipe, "transformer") and pipe.transformer is not None else pipe.unet


def result_tensor(out):
    if isinstance(out, tuple):
        return out[0]
    for name in ("images", "frames"):
        if hasattr(out, name):
            return getattr(out, name)
    raise AssertionError(f"unexpected pipeline output {type(out).__name__}")


def as_list(value, n):
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


# ---------------------------------------------------------------- API basics


def test_archs_cover_required_and_all_are_known():
    assert set(REQUIRED) <= set(ARCHS)
    assert set(ARCHS) == set(PIPELINE_CLASS)
    with pytest.raises(ValueError):
        tiny.tiny_config("not-an-arch")


@pytest.mark.parametrize("arch", REAL_ARCHS)
def test_real_config_is_the_shipped_file(arch):
    real = tiny.real_config(arch)
    assert real["_class_name"] in (
        "UNet2DConditionModel",
        "UNetSpatioTemporalConditionModel",
        "UNetMotionModel",
        "SD3Transformer2DModel",
    )
    real["in_channels"] = "mutated"
    assert tiny.real_config(arch)["in_channels"] != "mutated"  # a fresh dict each time
    shipped = Path(tiny.__file__).resolve().parent / "configs"
    files = {"sd15": "sd15_unet.json", "sd21": "sd21_unet.json", "sdxl": "sdxl_unet.json",
             "svd": "svd_unet.json", "upscaler": "x4_upscaler_unet.json", "sd3": "sd3_medium_transformer.json"}
    if arch in files:
        assert tiny.real_config(arch) == json.loads((shipped / files[arch]).read_text())


# ------------------------------------------------------------------- builds


@pytest.mark.parametrize("arch", ARCHS)
def test_pipeline_builds_offline(arch, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's temporary files only
    pipe = cached_pipe(arch)
    assert type(pipe).__name__ == PIPELINE_CLASS[arch]
    assert type(pipe.scheduler).__name__ == SCHEDULER_CLASS.get(arch, "DDIMScheduler")
    assert getattr(pipe, "safety_checker", None) is None
    assert pipe._progress_bar_config.get("disable") is True
    assert pipe.device.type == "cpu"
    denoiser = denoiser_of(pipe)
    assert all(p.dtype == torch.float32 for p in denoiser.parameters())
    cfg = tiny.tiny_config(arch)
    for key in set(cfg) & set(denoiser.config):
        if not key.startswith("_"):
            want = list(cfg[key]) if isinstance(cfg[key], tuple) else cfg[key]
            got = list(denoiser.config[key]) if isinstance(denoiser.config[key], tuple) else denoiser.config[key]
            assert got == want, key
    # the temporary tokenizer files are gone
    leftovers = {d for d in os.listdir(tmp_path) if d.startswith("asyncdiff_tok_")}
    assert not leftovers


def test_scheduler_configs_match_real_models():
    sd15 = cached_pipe("sd15").scheduler.config
    assert (sd15.beta_start, sd15.beta_end, sd15.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert sd15.num_train_timesteps == 1000 and sd15.set_alpha_to_one is False and sd15.steps_offset == 1
    assert sd15.prediction_type == "epsilon"
    assert cached_pipe("sd21").scheduler.config.prediction_type == "v_prediction"
    sdxl = cached_pipe("sdxl").scheduler.config
    assert (sdxl.beta_start, sdxl.beta_end, sdxl.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert sdxl.timestep_spacing == "leading"


def test_tokenizer_gives_varied_ids_and_matches_text_encoder():
    pipe = cached_pipe("sd15")
    tok, enc = pipe.tokenizer, pipe.text_encoder
    assert tok.model_max_length == enc.config.max_position_embeddings == 77
    ids = tok("a photo of a cute kitten by a red door", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    body = ids[1 : ids.index(tok.eos_token_id)]
    assert len(set(body)) >= 6
    assert enc.config.eos_token_id == tok.eos_token_id and enc.config.vocab_size >= len(tok)
    other = tok("a watercolor painting of a castle").input_ids
    assert other != ids[: len(other)]


# ----------------------------------------------------------------- topology


@pytest.mark.parametrize("arch", REAL_ARCHS)
def test_tiny_config_constraints(arch):
    cfg, real = tiny.tiny_config(arch), tiny.real_config(arch)
    if cfg["_class_name"] == "SD3Transformer2DModel":
        assert cfg["num_layers"] == real["num_layers"] == 24
        assert cfg["caption_projection_dim"] == cfg["num_attention_heads"] * cfg["attention_head_dim"]
        assert cfg["patch_size"] == real["patch_size"] and cfg["in_channels"] == real["in_channels"]
        assert cfg["sample_size"] // cfg["patch_size"] <= cfg["pos_embed_max_size"]
        return
    widths = cfg["block_out_channels"]
    assert len(widths) == len(real["block_out_channels"])
    assert max(widths) <= 128
    # equal neighbouring widths stay equal (they decide whether a resnet has a shortcut conv)
    rw = real["block_out_channels"]
    assert [a == b for a, b in zip(widths, widths[1:])] == [a == b for a, b in zip(rw, rw[1:])]
    groups = cfg.get("norm_num_groups", 32)
    assert all(w % groups == 0 for w in widths)
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim")
    assert all(w % h == 0 for w, h in zip(widths, as_list(heads, len(widths))))
    for key in ("down_block_types", "up_block_types", "layers_per_block", "transformer_layers_per_block",
                "mid_block_type", "addition_embed_type", "use_linear_projection", "only_cross_attention",
                "in_channels", "out_channels", "num_class_embeds", "upcast_attention", "use_motion_mid_block",
                "motion_max_seq_length"):
        assert cfg.get(key) == real.get(key), key
    if isinstance(real.get("attention_head_dim"), list):  # per-block head counts keep their proportions
        r = real["attention_head_dim"]
        t = cfg["attention_head_dim"]
        assert [x * r[0] for x in t] == [y * t[0] for y in r]
    if cfg.get("addition_embed_type") == "text_time":  # SDXL
        assert cfg["transformer_layers_per_block"] == [1, 2, 10]
        text_proj = 32  # projection_dim of the tiny text_encoder_2
        assert cfg["projection_class_embeddings_input_dim"] == 6 * cfg["addition_time_embed_dim"] + text_proj
    if arch == "sd21":
        assert cfg["use_linear_projection"] is True
        assert cfg["attention_head_dim"] == [1, 2, 4, 4]


def _module_tree(model):
    return [(name, type(mod).__name__) for name, mod in model.named_modules()]


@pytest.mark.parametrize("arch", REAL_ARCHS)
def test_denoiser_topology_matches_real_model(arch):
    real_cfg = tiny.real_config(arch)
    unet = denoiser_of(cached_pipe(arch))
    # 1) identical module tree (names and classes) with the real-size model, built on "meta"
    real = tiny.build_real_unet(arch)
    assert next(real.parameters()).device.type == "meta"
    assert _module_tree(unet) == _module_tree(real)
    if real_cfg["_class_name"] == "SD3Transformer2DModel":
        assert len(unet.transformer_blocks) == real_cfg["num_layers"] == 24
        assert unet.transformer_blocks[-1].context_pre_only and not unet.transformer_blocks[0].context_pre_only
        return
    # 2) explicit block-by-block check against the real config
    n = len(real_cfg["down_block_types"])
    layers = as_list(real_cfg["layers_per_block"], n)
    tlayers = as_list(real_cfg.get("transformer_layers_per_block", 1), n)
    assert [type(b).__name__ for b in unet.down_blocks] == list(real_cfg["down_block_types"])
    assert [type(b).__name__ for b in unet.up_blocks] == list(real_cfg["up_block_types"])
    for i, block in enumerate(unet.down_blocks):
        assert len(block.resnets) == layers[i]
        atts = getattr(block, "attentions", None) or []
        assert len(atts) == (layers[i] if "CrossAttn" in real_cfg["down_block_types"][i] else 0)
        for att in atts:
            assert len(att.transformer_blocks) == tlayers[i]
        assert (block.downsamplers is not None) == (i < n - 1)
    rev = list(reversed(layers)), list(reversed(tlayers))
    for i, block in enumerate(unet.up_blocks):
        assert len(block.resnets) == rev[0][i] + 1
        atts = getattr(block, "attentions", None) or []
        assert len(atts) == (rev[0][i] + 1 if "CrossAttn" in real_cfg["up_block_types"][i] else 0)
        for att in atts:
            assert len(att.transformer_blocks) == rev[1][i]
        assert (block.upsamplers is not None) == (i < n - 1)
    mid_atts = getattr(unet.mid_block, "attentions", None) or []
    for att in mid_atts:
        assert len(att.transformer_blocks) == tlayers[-1]
    if arch == "sdxl_controlnet":  # the ControlNet mirrors the real ControlNet-SDXL's tree too
        from diffusers import ControlNetModel

        with torch.device("meta"):
            real_cn = ControlNetModel.from_unet(real, load_weights_from_unet=False)
        assert _module_tree(cached_pipe(arch).controlnet) == _module_tree(real_cn)
    if real_cfg.get("addition_embed_type") == "text_time":
        assert unet.add_embedding.linear_1.in_features == unet.config.projection_class_embeddings_input_dim


# ------------------------------------------------------------------ calling


@pytest.mark.parametrize("arch", ARCHS)
def test_call_is_finite_deterministic_and_fast(arch):
    pipe_a = cached_pipe(arch)  # built (and maybe already called) by the tests above
    pipe_b = tiny.build_pipeline(arch, seed=0)  # an independent second build
    sd_a, sd_b = denoiser_of(pipe_a).state_dict(), denoiser_of(pipe_b).state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)

    t0 = time.perf_counter()
    out_a = result_tensor(pipe_a(**tiny.default_call_kwargs(arch)))
    elapsed = time.perf_counter() - t0
    out_b = result_tensor(pipe_b(**tiny.default_call_kwargs(arch)))
    print(f"\n[tiny] {arch}: one pipeline call {elapsed * 1000:.0f} ms, output {tuple(out_a.shape)}")

    assert isinstance(out_a, torch.Tensor) and torch.isfinite(out_a).all()
    assert out_a.abs().sum() > 0
    assert torch.equal(out_a, out_b)


def test_seed_changes_weights_and_build_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = tiny.build_unet("sd15", seed=0)
    b = tiny.build_unet("sd15", seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    assert not torch.equal(a.conv_in.weight, b.conv_in.weight)
    # the same denoiser weights inside a family
    c = tiny.build_unet("sd15_img2img", seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_prompt_and_control_inputs_matter():
    pipe = cached_pipe("sd15")
    base = result_tensor(pipe(**tiny.default_call_kwargs("sd15")))
    other = result_tensor(pipe(**{**tiny.default_call_kwargs("sd15"), "prompt": "an oil painting of a castle"}))
    assert not torch.equal(base, other)
    cn = cached_pipe("sdxl_controlnet")
    with_control = result_tensor(cn(**tiny.default_call_kwargs("sdxl_controlnet")))
    without = result_tensor(cn(**{**tiny.default_call_kwargs("sdxl_controlnet"), "controlnet_conditioning_scale": 0.0}))
    assert not torch.equal(with_control, without)
