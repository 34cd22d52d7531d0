"""The example scripts (examples/run_*.py) and their shared layer, examples/harness.py.

Every example's ``main(argv)`` runs in-process, in emulation (no torchrun
variables in the environment), on its tiny built-in pipeline with few steps,
and must write its result into the test's folder and print one timing line.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))  # as when a script there runs: its harness is importable
import harness  # noqa: E402

FAMILIES = ("sd", "sdxl", "sdxl_inpaint", "sdxl_controlnet", "upscaler", "svd", "animatediff", "sd3")
VIDEO = ("svd", "animatediff")
LINE = re.compile(r"^rank (\d+)/(\d+) \((\w+), split: (.+)\): (\d+\.\d\d) s(?: -> (.+))?$", re.M)
SMALL = ["--steps", "3", "--warm_up", "1", "--model_n", "2"]


@pytest.fixture(autouse=True)
def emulation(monkeypatch):
    """Emulation whatever launched pytest; one intra-op thread (shared CPU)."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


_modules: dict = {}


def example(family: str):
    """examples/run_<family>.py imported as a module (once)."""
    if family not in _modules:
        spec = importlib.util.spec_from_file_location(f"asyncdiff_example_{family}", EXAMPLES / f"run_{family}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _modules[family] = mod
    return _modules[family]


@pytest.fixture
def attached(monkeypatch):
    """Every AsyncDiff the examples create, to look at its settings afterwards."""
    made = []

    class Recording(harness.AsyncDiff):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(harness, "AsyncDiff", Recording)
    return made


def timing_lines(text: str):
    return LINE.findall(text)


# ------------------------------------------------------------------ str2bool
@pytest.mark.parametrize("text", ["true", "True", "TRUE", "1", "yes", "Yes", "y", "on", " true "])
def test_str2bool_true(text):
    assert harness.str2bool(text) is True


@pytest.mark.parametrize("text", ["false", "False", "FALSE", "0", "no", "No", "n", "off"])
def test_str2bool_false(text):
    assert harness.str2bool(text) is False


@pytest.mark.parametrize("text", ["", "maybe", "2", "-1", "tru", "none"])
def test_str2bool_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        harness.str2bool(text)


def test_str2bool_passes_bools_through():
    assert harness.str2bool(True) is True and harness.str2bool(False) is False


def _sd_parser():
    return harness.parser("test", tiny=("sd15", "sd21"), warm_up=9, steps=50, prompt="a cat", guidance=7.5)


@pytest.mark.parametrize("text,value", [("false", False), ("False", False), ("0", False), ("no", False),
                                        ("true", True), ("True", True), ("1", True), ("yes", True)])
def test_time_shift_flag_is_a_real_boolean(text, value):
    args = harness.parse(_sd_parser(), ["--time_shift", text])
    assert args.time_shift is value


def test_bad_time_shift_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        harness.parse(_sd_parser(), ["--time_shift", "maybe"])
    assert exc.value.code == 2
    assert "--time_shift" in capsys.readouterr().err


def test_defaults_follow_the_model():
    tiny = harness.parse(_sd_parser(), [])
    assert (tiny.model, tiny.seed, tiny.model_n, tiny.stride, tiny.warm_up) == (None, 20, 2, 1, 9)
    assert tiny.time_shift is False and tiny.split is None
    assert tiny.steps == harness.TINY_STEPS > tiny.warm_up
    assert harness.parse(_sd_parser(), ["--model", "/nowhere"]).steps == 50  # parsing loads nothing
    assert harness.parse(_sd_parser(), ["--model", "/nowhere", "--steps", "7"]).steps == 7


def test_bad_stride_is_an_argparse_error():
    with pytest.raises(SystemExit):
        harness.parse(_sd_parser(), ["--stride", "3"])


@pytest.mark.parametrize("family,argv,needs", [
    ("upscaler", [], "--image"),
    ("sdxl_inpaint", ["--image", "x.png"], "--mask"),
    ("sdxl_controlnet", ["--image", "x.png"], "--controlnet"),
    ("animatediff", [], "--motion_adapter"),
])
def test_real_model_needs_its_inputs(family, argv, needs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        example(family).main(["--model", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert needs in capsys.readouterr().err


# ------------------------------------------------------------- the examples
@pytest.mark.parametrize("family", FAMILIES)
def test_example_runs_in_emulation(family, tmp_path, capsys, attached):
    out = tmp_path / family
    path = example(family).main([*SMALL, "--stride", "1", "--out", str(out)])
    assert path is not None and Path(path).parent == tmp_path and Path(path).is_file()
    with Image.open(path) as img:
        if family in VIDEO:
            assert Path(path).suffix == ".gif" and img.n_frames == 3
        else:
            assert Path(path).suffix == ".png"
        expected = 64 if family == "upscaler" else 128  # the tiny upscaler enlarges 16x16 four times
        assert img.size == (expected, expected)
    (line,) = timing_lines(capsys.readouterr().out)
    rank, world, mode, split, seconds, saved = line
    assert (rank, world, mode) == ("0", "2", "emulate")
    assert split.startswith("paper: ") and " | " in split
    assert 0 < float(seconds) < 600 and Path(saved) == Path(path)
    (ad,) = attached
    assert (ad.model_n, ad.stride, ad.warm_up, ad.time_shift) == (2, 1, 1, False)
    assert not ad.denoiser.__dict__.get("forward")  # ad.remove() ran: the pipeline is restored


@pytest.mark.parametrize("family", ["sd", "svd"])
def test_example_stride_2(family, tmp_path, capsys, attached):
    path = example(family).main([*SMALL, "--stride", "2", "--out", str(tmp_path / "s2.png")])
    assert Path(path) == tmp_path / "s2.png" and path.is_file()
    if family == "svd":  # a video saved under .png: the frames side by side
        with Image.open(path) as img:
            assert img.size == (3 * 128, 128)
    (line,) = timing_lines(capsys.readouterr().out)
    assert line[:3] == ("0", "3", "emulate")
    assert attached[0].world_size == 3 and attached[0].stride == 2


def test_time_shift_reaches_asyncdiff(tmp_path, capsys, attached):
    sd = example("sd")
    results = {}
    for text in ("false", "true"):
        path = sd.main([*SMALL, "--steps", "4", "--time_shift", text, "--output_type", "latent",
                        "--out", str(tmp_path / f"ts_{text}")])
        assert path.suffix == ".pt"
        results[text] = torch.load(path)
    assert [ad.time_shift for ad in attached] == [False, True]
    assert results["false"].shape == (1, 4, 16, 16)
    assert not torch.equal(results["false"], results["true"])  # the flag changes the computation
    assert len(timing_lines(capsys.readouterr().out)) == 2


def test_cfg_parallel_reaches_asyncdiff(tmp_path, capsys, attached):
    sd = example("sd")
    path = sd.main([*SMALL, "--steps", "3", "--cfg_parallel", "true", "--output_type", "latent",
                    "--out", str(tmp_path / "cfg")])
    assert [ad.config.cfg_parallel for ad in attached] == [True] and attached[0].world_size == 4
    assert torch.load(path).shape == (1, 4, 16, 16)


def test_seed_and_split_flags(tmp_path, capsys):
    sd = example("sd")
    run = lambda name, *extra: torch.load(sd.main([*SMALL, "--output_type", "latent",
                                                   "--out", str(tmp_path / name), *extra]))
    first, again = run("a"), run("b")
    other_seed = run("c", "--seed", "21")
    run("d", "--split", "auto")
    run("e", "--split", "conv_in d0-3 mid | u0 u1 u2 u3 conv_norm_out conv_out")
    assert torch.equal(first, again)  # same seed, same result
    assert not torch.equal(first, other_seed)
    splits = [line[3] for line in timing_lines(capsys.readouterr().out)]
    assert splits[0].startswith("paper: ") and splits[3].startswith("auto: ")
    assert splits[4] == "explicit: conv_in d0 d1 d2 d3 mid | u0 u1 u2 u3 conv_norm_out conv_out"


def test_local_model_folder(tmp_path, capsys, attached):
    """--model loads a local diffusers folder (from_pretrained, local files only)."""
    from asyncdiff.testing import tiny

    folder = tmp_path / "sd15"
    tiny.build_pipeline("sd15", seed=0).save_pretrained(folder)
    path = example("sd").main(["--model", str(folder), *SMALL, "--output_type", "latent",
                               "--out", str(tmp_path / "local")])
    assert path.is_file()
    (line,) = timing_lines(capsys.readouterr().out)
    assert line[:3] == ("0", "2", "emulate")
    assert next(attached[0].denoiser.parameters()).dtype == torch.float32  # fp32 on the CPU
    # the same weights as the built-in tiny model give the same latents
    ref = example("sd").main([*SMALL, "--output_type", "latent", "--out", str(tmp_path / "builtin")])
    assert torch.equal(torch.load(path), torch.load(ref))


@pytest.mark.parametrize("family,arch", [("sdxl_controlnet", "sdxl_controlnet"), ("animatediff", "animatediff")])
def test_local_folders_with_extra_components(family, arch, tmp_path, capsys):
    """--controlnet / --motion_adapter folders and an --image file give what the built-in model gives."""
    from asyncdiff.testing import tiny

    folder = tmp_path / arch
    pipe = tiny.build_pipeline(arch, seed=0)
    pipe.save_pretrained(folder)
    argv = [*SMALL, "--output_type", "latent"]
    local = ["--model", str(folder)]
    if family == "sdxl_controlnet":
        image = tmp_path / "edges.png"
        tiny.default_call_kwargs(arch)["image"].save(image)
        local += ["--controlnet", str(folder / "controlnet"), "--image", str(image)]
    else:
        pipe.motion_adapter.save_pretrained(tmp_path / "adapter")
        local += ["--motion_adapter", str(tmp_path / "adapter"), "--num_frames", "3"]
    mod = example(family)
    got = mod.main([*local, *argv, "--out", str(tmp_path / "local")])
    ref = mod.main([*argv, "--out", str(tmp_path / "builtin")])
    # same weights and inputs; a reloaded model may round differently in the last bits
    torch.testing.assert_close(torch.load(got), torch.load(ref), rtol=1e-4, atol=1e-3)
    assert len(timing_lines(capsys.readouterr().out)) == 2
