"""`CausalVDM` (spec §4, §11.2, §11.8): the frame-as-prompt loss sees the prefix only as clean input, overfits one
batch, trains through `timeloom fit`, round-trips through safetensors, checks the tokenizer's latent shape
before any compute, and the paper-size config has the size it claims (counted on the meta device)."""

from __future__ import annotations

import csv
import dataclasses
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from timeloom_generation import CausalSTDiT, CausalSTDiTConfig, CausalVDM

from timeloom.cli import main
from timeloom.data import MovingDigits
from timeloom.module import TimeloomModule

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs/generation/vdm-tiny.yaml"
BASE = ROOT / "configs/generation/vdm-base.yaml"
MICRO = CausalSTDiTConfig(in_channels=1, patch=4, width=32, depth=2, heads=2, text_tokens=8)


def micro_module(**overrides) -> CausalVDM:
    torch.manual_seed(0)
    settings = dict(config=MICRO, text_encoder="vocab", chunk_frames=2, cache_frames=3, sample_steps=2)
    return CausalVDM(**{**settings, **overrides})


def digits_batch(count: int = 4, frames: int = 5, size: int = 16) -> dict:
    data = MovingDigits(size=size, frames=frames, directions="cardinal", length=count, seed=3)
    items = [data[i] for i in range(count)]
    return {"video": torch.stack([i["video"] for i in items]), "caption": [i["caption"] for i in items]}


class Capture:
    """Keeps the denoiser's inputs and output (with its gradient) from the last forward."""

    def __init__(self, model: CausalSTDiT) -> None:
        model.register_forward_hook(self, with_kwargs=False)

    def __call__(self, module, args, output):
        self.x, self.tau = args[0], args[1]
        output.retain_grad()
        self.output = output


def test_prefix_lengths_are_the_ones_sampling_meets():
    module = micro_module(chunk_frames=2, cache_frames=7)
    assert module.prefix_choices == [0, 1, 3, 5, 7]
    batch = digits_batch(count=64, frames=9)
    _, _, prefix = module.frame_prompt_loss(
        batch["video"], batch["caption"], torch.Generator().manual_seed(0)
    )
    assert set(Counter(prefix.tolist())) == {0, 1, 3, 5, 7}


def test_loss_reaches_only_the_noisy_chunk_and_the_prefix_enters_clean():
    module = micro_module(prefix_noise=0.0)
    capture = Capture(module.model["denoiser"])
    batch = digits_batch(count=16)
    loss, _, prefix = module.frame_prompt_loss(
        batch["video"], batch["caption"], torch.Generator().manual_seed(1)
    )
    loss.backward()
    gradient = capture.output.grad.abs().sum(dim=(1, 3, 4))  # (B, F) per frame
    for row, length in enumerate(prefix.tolist()):
        end = length + (3 if length == 0 else 2)
        assert (gradient[row, :length] == 0).all() and (gradient[row, end:] == 0).all()
        assert (gradient[row, length:end] > 0).all()
        assert (capture.tau[row, :length] == 0).all() and (capture.tau[row, length:end] > 0).all()
        frames = capture.x.shape[2]
        assert torch.equal(capture.x[row, :, :length], batch["video"][row, :, :frames][:, :length])


def test_long_clips_also_train_later_windows_with_a_full_prefix():
    module = micro_module(prefix_noise=0.0, later_windows=0.5)  # K 3 + C 2 windows
    capture = Capture(module.model["denoiser"])
    frame_index = torch.arange(9.0).view(1, 1, 9, 1, 1).expand(32, 1, 9, 16, 16)  # each frame holds its index
    _, _, prefix = module.frame_prompt_loss(
        frame_index, ["the digit 1 moves up"] * 32, torch.Generator().manual_seed(0)
    )
    clean_start = prefix > 0  # there the window's first frame enters clean and tells where it starts
    starts = capture.x[:, 0, 0, 0, 0]
    later = clean_start & (starts > 0)
    assert 0 < later.sum() < 32 and (prefix == 0).any()
    assert (prefix[later] == 3).all() and starts[later].max() <= 4
    assert torch.equal(capture.x[later, 0, :3, 0, 0], starts[later, None] + torch.arange(3.0))
    assert capture.x.shape[2] == 5


def test_text_only_share_adds_text_only_samples_from_the_first_frame():
    frame_index = 100 * torch.arange(9.0).view(1, 1, 9, 1, 1).expand(64, 1, 9, 16, 16)  # frame i holds 100 i
    captions = ["the digit 1 moves up"] * 64
    shares = {}
    for share in (0.0, 0.5, 1.0):
        module = micro_module(prefix_noise=0.0, later_windows=0.5, text_only_share=share)
        capture = Capture(module.model["denoiser"])
        _, _, prefix = module.frame_prompt_loss(frame_index, captions, torch.Generator().manual_seed(0))
        text_only = prefix == 0
        # text-only samples start at the clip's first frame: their first noisy frame holds noise only
        assert (capture.x[text_only, 0, 0].mean(dim=(1, 2)).abs() < 1.0).all()
        shares[share] = text_only.float().mean().item()
    assert shares[1.0] == 1.0 and shares[0.0] < 0.25 < shares[0.5] < 1.0
    with pytest.raises(ValueError, match="text_only_share is a share"):
        micro_module(text_only_share=1.5)


def test_clips_shorter_than_cache_plus_chunk_are_named():
    module = micro_module()
    batch = digits_batch(frames=4)
    with pytest.raises(ValueError, match="cache_frames \\+ chunk_frames = 5"):
        module.frame_prompt_loss(batch["video"], batch["caption"])


def test_overfitting_one_batch_lowers_the_loss():
    module = micro_module()
    batch = digits_batch()
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)

    def fixed_loss() -> float:
        with torch.no_grad():
            return module.frame_prompt_loss(
                batch["video"], batch["caption"], torch.Generator().manual_seed(0)
            )[0].item()

    before = fixed_loss()
    for step in range(40):
        loss = module.frame_prompt_loss(
            batch["video"], batch["caption"], torch.Generator().manual_seed(step)
        )[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert fixed_loss() < 0.7 * before


def test_generate_continues_the_given_frame_and_names_empty_prompts():
    module = micro_module().eval()
    batch = digits_batch(count=2)
    video = module.generate(batch["caption"], frames=7, given=batch["video"][:, :, :1])
    assert video.shape == (2, 1, 7, 16, 16)
    assert torch.equal(video[:, :, :1], batch["video"][:, :, :1])
    with pytest.raises(ValueError, match="caption 1 is empty"):
        module.generate(["the digit 1 moves up", ""], frames=7, grid=(16, 16))


def test_save_and_load_pretrained_keep_the_text_projection(tmp_path):
    module = micro_module().eval()
    module.save_pretrained(tmp_path)
    loaded = TimeloomModule.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, CausalVDM)
    batch = digits_batch(count=2)
    a = module.generate(batch["caption"], frames=5, given=batch["video"][:, :, :1], seed=3)
    b = loaded.generate(batch["caption"], frames=5, given=batch["video"][:, :, :1], seed=3)
    assert torch.equal(a, b)


def test_init_weights_starts_from_a_checkpoints_weights_and_a_save_rebuilds_without_it(tmp_path):
    trained = micro_module()
    for parameter in trained.parameters():  # weights no fresh module has
        parameter.data.normal_()
    path = tmp_path / "trained.ckpt"
    torch.save({"state_dict": trained.state_dict()}, path)  # what a Lightning checkpoint holds the weights in
    restarted = micro_module(init_weights=str(path))
    for (name, a), b in zip(trained.state_dict().items(), restarted.state_dict().values()):
        assert torch.equal(a, b), name
    assert restarted.hparams["init_weights"] == str(path)  # recorded with the run
    restarted.save_pretrained(tmp_path / "restart")
    path.unlink()  # a saved restart holds its weights: the file it started from may be gone
    rebuilt = TimeloomModule.from_pretrained(tmp_path / "restart")
    assert rebuilt.hparams["init_weights"] is None
    for (name, a), b in zip(restarted.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), name
    torch.save({"state_dict": trained.state_dict()}, path)
    with pytest.raises(ValueError, match="model.denoiser"):
        micro_module(config=dataclasses.replace(MICRO, width=64), init_weights=str(path))
    with pytest.raises(FileNotFoundError, match="init_weights: no checkpoint at"):
        micro_module(init_weights=str(tmp_path / "missing.ckpt"))


def test_tokenizer_latents_with_the_wrong_channels_are_named_at_construction(kl_tokenizer):
    with pytest.raises(ValueError, match="gives 4 latent channels, but the VDM config expects in_channels=1"):
        micro_module(tokenizer=str(kl_tokenizer))


def test_tokenizer_latents_train_and_decode(kl_tokenizer):
    config = CausalSTDiTConfig(in_channels=4, patch=1, width=32, depth=2, heads=2, text_tokens=8)
    module = micro_module(config=config, tokenizer=str(kl_tokenizer), latent_scale=2.0)
    batch = digits_batch(count=2, frames=9)  # 9 pixel frames -> 1 + 4 latent frames of 4x4
    latents = module.codec.encode(batch["video"])
    assert latents.shape == (2, 4, 5, 4, 4)
    loss, _, _ = module.frame_prompt_loss(latents, batch["caption"])
    loss.backward()
    assert torch.isfinite(loss)
    assert module.codec.decode(latents).shape == (2, 1, 9, 16, 16)
    assert module.count_tokens(batch) == 2 * 5 * 16


def test_timeloom_fit_on_the_tiny_config_runs_and_logs_samples(tmp_path, monkeypatch, kl_tokenizer):
    monkeypatch.setattr(sys, "argv", ["timeloom"])
    overlay = tmp_path / "short.yaml"
    overlay.write_text(
        f"""
model:
  init_args:
    config: {{in_channels: 4, width: 32, depth: 1, heads: 2}}
    text_encoder: vocab
    sample_steps: 2
    scheduler:
      init_args: {{warmup_steps: 1}}
data:
  init_args:
    tokenizer: {kl_tokenizer}
    cache_dir: {tmp_path}/latents
    size: 16
    batch_size: 4
    train_length: 12
    val_length: 2
throughput:
  log_every_n_batches: 1  # the throughput callback counts cached-latent batches too
trainer:
  max_steps: 3
  callbacks: []
  limit_val_batches: 1
  log_every_n_steps: 1
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {tmp_path}}}
checkpoint:
  dirpath: {tmp_path}/checkpoints
"""
    )
    main(["fit", "-c", str(TINY), "-c", str(overlay)])
    with next(tmp_path.rglob("metrics.csv")).open() as f:
        rows = list(csv.DictReader(f))
    assert [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    assert any(row.get("val/loss") for row in rows)
    assert list((tmp_path / "media").glob("val_real_vs_generated_*.mp4"))


def test_base_config_is_paper_size_on_the_meta_device():
    config = yaml.safe_load(BASE.read_text())["model"]["init_args"]["config"]
    with torch.device("meta"):
        model = CausalSTDiT(CausalSTDiTConfig(**config))
    parameters = sum(p.numel() for p in model.parameters())
    assert 0.7e9 < parameters < 0.8e9, parameters  # STDiT-XL/2-like (spec §10: ≈0.7 B)


def test_generate_command_writes_videos_from_text_and_from_a_first_frame(tmp_path, capsys):
    from timeloom_generation.commands import generate_main

    from timeloom.video_io import read_video, write_image

    export = micro_module().save_pretrained(tmp_path / "export")
    first = digits_batch(count=1)["video"][0, :, 0]  # (C, H, W)
    write_image(tmp_path / "first.png", first)
    common = [
        "--checkpoint",
        str(export),
        "--frames",
        "6",
        "--size",
        "16",
        "--steps",
        "2",
        "--broadway",
        "--tar",
    ]
    generate_main(
        [
            *common,
            "--prompt",
            "the digit 1 moves up",
            "--prompt",
            "the digit 2 moves left",
            "--out",
            str(tmp_path / "text"),
        ]
    )
    generate_main(
        [
            *common,
            "--broadway-with",  # the paper's AnimateDiff values, reachable beside our defaults
            "alpha=0.6,beta0=1.5,active_fraction=0.2",
            "--vstar",
            "the digit 1 moves up; the digit 1 moves left",
            "--first-frame",
            str(tmp_path / "first.png"),
            "--out",
            str(tmp_path / "image"),
        ]
    )
    assert {p.name for p in (tmp_path / "text").iterdir()} == {
        "sample_0.mp4",
        "sample_0.gif",
        "sample_1.mp4",
        "sample_1.gif",
        "samples.mp4",
    }
    frames = read_video(tmp_path / "image" / "sample_0.mp4")
    assert frames.shape[0] == 6
    with pytest.raises(ValueError, match="caption 0 is empty"):
        generate_main([*common, "--prompt", " ", "--out", str(tmp_path / "none")])


def test_generate_command_checks_the_tokenizer_and_grid_against_the_vdm_before_sampling(
    tmp_path, kl_tokenizer
):
    from timeloom_generation.commands import generate_main

    pixels = micro_module().save_pretrained(tmp_path / "pixels")  # 1 channel, patch 4
    prompt = ["--prompt", "the digit 1 moves up", "--out", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="gives 4 latent channels, but the VDM config expects in_channels=1"):
        generate_main(["--checkpoint", str(pixels), "--tokenizer", str(kl_tokenizer), *prompt])
    with pytest.raises(FileNotFoundError, match="no tokenizer checkpoint or exported folder at"):
        generate_main(["--checkpoint", str(pixels), "--tokenizer", str(tmp_path / "missing"), *prompt])
    with pytest.raises(
        ValueError, match="--size 18 gives a 18x18 latent grid, not a multiple of the VDM's patch 4"
    ):
        generate_main(["--checkpoint", str(pixels), "--size", "18", *prompt])
    config = CausalSTDiTConfig(in_channels=4, patch=1, width=32, depth=2, heads=2, text_tokens=8)
    moved = shutil.copytree(kl_tokenizer, tmp_path / "moved")
    latent = micro_module(config=config, tokenizer=str(moved)).save_pretrained(tmp_path / "latent")
    shutil.rmtree(moved)  # the path stored with the model no longer resolves: --tokenizer names it
    generate_main(
        [
            "--checkpoint",
            str(latent),
            "--tokenizer",
            str(kl_tokenizer),
            "--size",
            "16",
            "--frames",
            "3",
            *prompt,
        ]
    )
    assert (tmp_path / "out" / "sample_0.mp4").exists()
