"""The built-in digits model (asyncdiff.demo.digits) and the main job (asyncdiff.demo)."""

import socket

import numpy as np
import pytest
import torch

from asyncdiff import AsyncDiff
from asyncdiff.demo import digits, job as demo

# Measured with the shipped weights (2 samples per digit, 25 DDIM steps,
# seed 0): 20/20 = 1.00 (0.96 on 5 per digit); the bound keeps a margin.
MIN_SAMPLE_ACCURACY = 0.7


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # emulation, whatever launched pytest
    monkeypatch.delenv("RANK", raising=False)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def pipe():
    p = digits.load_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def sample(pipe, labels, steps, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    return pipe(labels, num_inference_steps=steps, generator=gen, output_type="pt", **kw).images


def test_weights_are_small_and_load_offline(monkeypatch):
    files = [p for p in digits.WEIGHTS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 4 * 2**20
    assert (digits.WEIGHTS / digits.CLASSIFIER_FILE).stat().st_size < 200 * 1024

    def no_network(*args, **kwargs):
        raise AssertionError("the digits model must load without network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    p = digits.load_pipeline()
    assert isinstance(p, digits.DigitsPipeline)
    assert type(p.scheduler).__name__ == "DDIMScheduler"
    assert p.unet.dtype == torch.float32
    assert p.unet.config.num_class_embeds == digits.NUM_CLASSES + 1
    assert isinstance(digits.classifier(), digits.DigitClassifier)


def test_pipeline_output_types(pipe):
    x = sample(pipe, [0, 7, 3], steps=4)
    assert x.shape == (3, 1, digits.RESOLUTION, digits.RESOLUTION)
    assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
    gen = torch.Generator().manual_seed(0)
    arr = pipe([0, 7, 3], num_inference_steps=4, generator=gen, output_type="np").images
    assert arr.shape == (3, digits.RESOLUTION, digits.RESOLUTION, 1)
    np.testing.assert_allclose(arr, x.permute(0, 2, 3, 1).numpy())
    pil = pipe(5, num_inference_steps=2, output_type="pil", guidance_scale=1.0).images
    assert len(pil) == 1 and pil[0].size == (digits.RESOLUTION, digits.RESOLUTION)
    with pytest.raises(ValueError):
        pipe([10], num_inference_steps=2)


def test_one_denoiser_call_per_step(pipe):
    calls = []
    handle = pipe.unet.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        sample(pipe, [1, 2], steps=5, guidance_scale=2.0)
        sample(pipe, [1, 2], steps=3, guidance_scale=1.0)
    finally:
        handle.remove()
    assert calls == [4] * 5 + [2] * 3  # guidance batched into the one call


def test_samples_are_recognised(pipe):
    labels = [d for d in range(10) for _ in range(2)]
    images = sample(pipe, labels, steps=25)
    acc = digits.classifier().accuracy(images, labels)
    print(f"classifier accuracy on 20 samples, 25 steps: {acc:.2f}")
    assert acc >= MIN_SAMPLE_ACCURACY


def test_classifier_on_real_digits():
    pytest.importorskip("sklearn")
    images, labels = digits.load_digit_images()
    assert digits.classifier().accuracy(images, labels) >= 0.95


def test_to_grid():
    imgs = torch.rand(12, 1, 16, 16)
    grid = digits.to_grid(imgs, nrow=5, scale=2, pad=1)
    assert grid.size == (5 * 33 + 1, 3 * 33 + 1)
    assert digits.to_grid([digits.to_grid(imgs[:1], 1)], 1, scale=1).mode == "RGB"


def test_warm_up_covering_all_steps_is_the_plain_pipeline(pipe):
    plain = sample(pipe, [4, 2], steps=6)
    ad = AsyncDiff(pipe, model_n=2, stride=1, warm_up=6)
    try:
        assert ad.mode == "emulate"
        attached = sample(pipe, [4, 2], steps=6)
    finally:
        ad.remove()
    assert torch.equal(plain, attached)
    asynchronous = AsyncDiff(pipe, model_n=2, stride=1, warm_up=2)
    try:
        changed = sample(pipe, [4, 2], steps=6)
    finally:
        asynchronous.remove()
    assert not torch.equal(plain, changed)
    assert torch.equal(sample(pipe, [4, 2], steps=6), plain)  # remove() restores the pipeline


def test_demo_runs_in_emulation(tmp_path, capsys):
    out = tmp_path / "grid.png"
    res = demo.main(["--steps", "8", "--warm_up", "2", "--time_shift", "false", "--out", str(out)])
    text = capsys.readouterr().out
    assert out.is_file()
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (10 * (4 * digits.RESOLUTION + 1) + 1, 2 * (4 * digits.RESOLUTION + 1) + 1)
    assert res["mode"] == "emulate" and res["rank"] == 0 and res["world_size"] == 2
    assert res["sequential_s"] > 0 and res["asyncdiff_s"] > 0
    assert 10 < res["psnr_db"] < float("inf")
    assert "1 process sequential vs AsyncDiff emulated" in text
    assert "rank 0/2 (emulate)" in text and "speed-up" in text and "PSNR" in text


@pytest.mark.parametrize("text,value", [("false", False), ("False", False), ("0", False),
                                        ("true", True), ("1", True)])
def test_demo_time_shift_is_a_real_boolean(text, value):
    assert demo.parse_args(["--time_shift", text]).time_shift is value


@pytest.mark.parametrize("argv, env, text", [
    (["--stride", "3"], {}, "--stride: invalid choice: 3"),
    (["--warm_up", "0"], {}, "--warm_up"),
    (["--timeout", "inf"], {}, "timeout:"),
    (["--model_n", "3"], {"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "1"}, "world size: torchrun started 2"),
])
def test_demo_refuses_bad_flags_before_any_work(monkeypatch, capsys, argv, env, text):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        demo.parse_args(argv)  # the flags alone: no model is loaded, no baseline runs
    assert info.value.code == 2
    assert text in capsys.readouterr().err
