"""The memory benchmark's count (benchmarks/memory.py) of what each rank keeps of the denoiser.

Meta device only (shapes and dtypes, nothing allocated): the real SD 1.5 UNet
with the paper's N=2 split, the tiny SD 1.5 UNet and the tiny Flux transformer;
a couple of seconds in all."""

import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel

from asyncdiff import arch, splits
from asyncdiff.testing import tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _models  # noqa: E402
import memory as mb  # noqa: E402


def nbytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, counted here without the benchmark's helpers."""
    return sum(t.numel() * t.element_size() for _, t in [*module.named_parameters(), *module.named_buffers()])


def meta_model(cls, config, dtype=torch.float32):
    with torch.device("meta"):
        model = cls.from_config(config)
    return model.to(dtype=dtype)


@pytest.fixture(scope="module")
def sd15():
    model = _models.build("sd15", "meta", torch.float16)
    layout = arch.describe(model)
    return model, layout, splits.resolve_static(layout, 2, "paper")


@pytest.fixture(scope="module")
def tiny_sd15():
    model = meta_model(UNet2DConditionModel, tiny.tiny_config("sd15"))
    layout = arch.describe(model)
    return model, layout, splits.resolve_static(layout, 3, "paper")


@pytest.fixture(scope="module")
def tiny_flux():
    model = meta_model(FluxTransformer2DModel, tiny.tiny_config("flux"), torch.bfloat16)
    layout = arch.describe(model)
    text = "b0-9 | b10-18 s0-9 | s10-37 norm_out proj_out"
    return model, layout, splits.resolve_static(layout, 3, text)


CASES = ["sd15", "tiny_sd15", "tiny_flux"]


def expected_ranks(model, layout, split) -> list[int]:
    """Rank r keeps everything but the units of the other components (stride 1)."""
    full = nbytes(model)
    first_name, first = next(iter(model.named_parameters()))
    first_bytes = first.numel() * first.element_size()
    out = []
    for r in range(len(split.components)):
        others = [u for c, comp in enumerate(split.components) if c != r for u in comp]
        keep = full - sum(nbytes(layout.module(u, model)) for u in others)
        # the first parameter stays real everywhere (diffusers reads the device from it)
        if any(first_name.startswith(".".join(map(str, layout.paths[u])) + ".") for u in others):
            keep += first_bytes
        out.append(keep)
    return out


@pytest.mark.parametrize("name", CASES)
def test_ranks_sum_to_the_model_plus_glue_per_extra_rank(name, request):
    model, layout, split = request.getfixturevalue(name)
    h = mb.rank_bytes(model, layout, split, stride=1)
    n = len(split.components)
    assert len(h.ranks) == n and h.components == list(range(n))
    assert h.full == nbytes(model) > 0
    assert h.glue > 0  # the time embedding (UNet) / the embedders (Flux)
    first = next(iter(model.parameters()))
    elsewhere = sum(b != w for b, w in zip(h.ranks, expected_ranks(model, layout, split)))  # 0: checked below
    assert elsewhere == 0
    extra = sum(h.ranks) - (h.full + (n - 1) * h.glue)
    assert extra in {k * first.numel() * first.element_size() for k in range(n)}
    assert sum(h.units.values()) + h.glue == h.full
    assert all(0 < b < h.full for b in h.ranks)
    assert h.fraction == max(h.ranks) / h.full < 1


@pytest.mark.parametrize("name", CASES)
def test_a_known_split_gives_the_independently_counted_bytes(name, request):
    model, layout, split = request.getfixturevalue(name)
    want = expected_ranks(model, layout, split)
    h = mb.rank_bytes(model, layout, split, stride=1)
    assert h.ranks == want
    assert h.fraction == pytest.approx(max(want) / nbytes(model), rel=0, abs=0)


def test_sd15_n2_paper_split_figures(sd15):
    model, layout, split = sd15
    h = mb.rank_bytes(model, layout, split)
    # fp16: 2 bytes per element, every tensor of the UNet is a parameter
    assert h.full == 2 * sum(p.numel() for p in model.parameters())
    glue = nbytes(model.time_embedding)  # SD 1.5's only tensors outside the units
    assert h.glue == glue
    comp0 = sum(nbytes(layout.module(u, model)) for u in split.components[0])
    assert h.ranks[0] == glue + comp0
    assert h.fraction == pytest.approx((glue + comp0) / h.full, rel=1e-12)
    assert 0.5 < h.fraction < 0.9  # the down blocks, mid and u0 hold most of SD 1.5's weights


@pytest.mark.parametrize("name", CASES)
def test_stride_2_extra_rank_holds_the_last_component(name, request):
    model, layout, split = request.getfixturevalue(name)
    one = mb.rank_bytes(model, layout, split, stride=1)
    two = mb.rank_bytes(model, layout, split, stride=2)
    n = len(split.components)
    assert two.components == list(range(n)) + [n - 1]
    assert two.ranks == one.ranks + [one.ranks[-1]]
    assert two.fraction == one.fraction


def test_flux_config_ships_with_the_package():
    shipped = Path(tiny.__file__).resolve().parent / "configs" / "flux_dev_transformer.json"
    assert mb.FLUX_CONFIG == shipped and shipped.is_file()
    m = mb.build_flux()
    assert next(m.model.parameters()).is_meta
    assert 11.8e9 < sum(p.numel() for p in m.model.parameters()) < 12.0e9
    assert m.layout.top[0] == "b0" and m.layout.top[-1] == "proj_out" and len(m.layout.top) == 19 + 38 + 2
