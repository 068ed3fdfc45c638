"""`CausalVDM`: trains a `CausalSTDiT` with "frame as prompt" rectified flow (spec §4).

Per sample, a clip of ``K + C`` latent frames is cut into a clean prefix of ``P`` frames, drawn from
``{0} ∪ {1 + kC <= K}`` (the prefixes sampling meets: text only, or one given frame plus whole chunks), and a
noisy chunk of ``C`` frames (``1 + C`` when ``P = 0``). The prefix is lightly re-noised to ``tau_pp`` but
enters with ``tau = 0``, as the sampler's cache writes do; the chunk gets one level ``tau`` per sample. The
loss is the flow-matching MSE on the chunk only. Samples of one batch may end at different frames: frames
after a sample's chunk are fed too but, the model being causal in time, they cannot change its loss.
Captions are dropped (null embedding) with probability ``caption_dropout`` for classifier-free guidance.

Clips longer than ``K + C`` frames also teach the steady state of long rollouts: a share ``later_windows`` of
the samples is a ``K + C`` window starting after frame 0, with a full prefix of ``K`` frames. Past its first
window a rollout's cache never holds frame 0 (which, in a causal tokenizer's latents, encodes one image alone
and looks unlike the others); trained only on windows starting at frame 0, the model would never see that
context. Temporal RoPE depends only on frame differences, so window positions restart at 0.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from timeloom.module import TimeloomModule, checkpoint_state_dict, load_state_dict_checked
from timeloom_generation.codec import PixelCodec, TokenizerCodec
from timeloom_generation.diffusion import noise_to, sample_levels, velocity_target
from timeloom_generation.model import CausalSTDiT, CausalSTDiTConfig
from timeloom_generation.sampling import ARSampler
from timeloom_generation.text import TextConditioner, check_captions

__all__ = ["CausalVDM"]

# Validation continues this many clips from their first frame: sampling costs S forwards per chunk.
LOGGED_VIDEOS = 4


class CausalVDM(TimeloomModule):
    """Text- and frame-conditioned causal video diffusion on batches ``{"video", "caption"}``.

    Args:
        config: the denoiser's sizes (``in_channels`` must match the codec's latent channels).
        text_encoder: ``"auto"``, ``"minilm"`` or ``"vocab"`` (see `TextConditioner`).
        tokenizer: a local KL tokenizer (exported folder or ``.ckpt``) to diffuse its latents; None diffuses
            pixels. Batches carry ``"video"`` (encoded here) or cached ``"latents"`` (unscaled posterior means,
            see `timeloom_generation.latents`).
        latent_scale: multiplies the tokenizer's posterior mean (``1/std``).
        chunk_frames: ``C``, latent frames generated per chunk.
        cache_frames: ``K``, latent frames of context (training clips are ``K + C`` frames).
        prefix_noise: ``tau_pp``, the light noise on clean prefix frames.
        caption_dropout: probability of training a sample on the null text.
        timestep_shift: shift of the training and sampling noise levels.
        later_windows: share of samples cut after frame 0 of clips longer than ``K + C`` (see above).
        text_only_share: share of samples made text-only (``P = 0`` from the clip's first frame) before the
            other draws. Only those teach the caption's digit and the image-alone frame 0 (a prefix already
            shows the glyph); the uniform draw gives them ``(1 - later_windows) / len(prefix choices)``.
        sample_steps, guidance: Euler steps and CFG scale of the validation samples.
        log_video_every_n_epochs: how often the first validation batch is continued from its first frame.
        init_weights: a `CausalVDM` checkpoint whose weights (its EMA weights, when it has them) this run starts
            from, with its own fresh optimiser and schedule: a warm restart at another learning rate, which
            ``--ckpt_path`` cannot give (a resume restores the old schedule). Kept in the hyper-parameters as a
            record, not re-read when a saved module is rebuilt (`TimeloomModule.starting_weights`).
        **kwargs: ``optimizer`` / ``scheduler`` of `TimeloomModule`.
    """

    starting_weights = ("init_weights",)

    def __init__(
        self,
        config: CausalSTDiTConfig | None = None,
        text_encoder: Literal["auto", "minilm", "vocab"] = "auto",
        tokenizer: str | None = None,
        latent_scale: float = 1.0,
        chunk_frames: int = 2,
        cache_frames: int = 7,
        prefix_noise: float = 0.15,
        caption_dropout: float = 0.1,
        timestep_shift: float = 1.0,
        later_windows: float = 0.5,
        text_only_share: float = 0.0,
        sample_steps: int = 20,
        guidance: float = 3.0,
        log_video_every_n_epochs: int = 1,
        init_weights: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.config = config or CausalSTDiTConfig()
        self.codec = (
            PixelCodec(self.config.in_channels)
            if tokenizer is None
            else TokenizerCodec(tokenizer, latent_scale)
        )
        if self.codec.channels != self.config.in_channels:
            raise ValueError(
                f"the tokenizer at {tokenizer} gives {self.codec.channels} latent channels, but the VDM config "
                f"expects in_channels={self.config.in_channels}"
            )
        self.model = nn.ModuleDict(
            {
                "denoiser": CausalSTDiT(self.config),
                "text": TextConditioner(self.config.width, self.config.text_tokens, text_encoder),
            }
        )
        if chunk_frames < 1 or cache_frames < chunk_frames + 1:
            raise ValueError(
                f"need chunk_frames >= 1 and cache_frames >= chunk_frames + 1; got {chunk_frames}, {cache_frames}"
            )
        self.chunk_frames, self.cache_frames = chunk_frames, cache_frames
        self.prefix_noise, self.caption_dropout, self.timestep_shift = (
            prefix_noise,
            caption_dropout,
            timestep_shift,
        )
        if not 0 <= later_windows <= 1:
            raise ValueError(f"later_windows is a share of the samples, in [0, 1]; got {later_windows}")
        self.later_windows = later_windows
        if not 0 <= text_only_share <= 1:
            raise ValueError(f"text_only_share is a share of the samples, in [0, 1]; got {text_only_share}")
        self.text_only_share = text_only_share
        self.sample_steps, self.guidance = sample_steps, guidance
        self.log_video_every_n_epochs = log_video_every_n_epochs
        self.prefix_choices = [0] + list(range(1, cache_frames + 1, chunk_frames))
        if init_weights is not None:
            self.load_weights_of(init_weights)

    def load_weights_of(self, path: str) -> None:
        """This module's weights from the checkpoint at ``path`` (same sizes, or an error naming the keys)."""
        load_state_dict_checked(self, checkpoint_state_dict(path, "init_weights"), source=path)

    @property
    def clip_frames(self) -> int:
        return self.cache_frames + self.chunk_frames

    # -- training -------------------------------------------------------------------------------------------
    def frame_prompt_loss(
        self, latents: Tensor, captions: list[str], generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Flow loss on each sample's noisy chunk: ``(loss, per-sample losses (B,), prefix lengths (B,))``."""
        batch, frames, device = len(latents), latents.shape[2], latents.device
        if frames < self.clip_frames:
            raise ValueError(
                f"training clips need cache_frames + chunk_frames = {self.clip_frames} latent frames; "
                f"the batch has {frames}"
            )
        choices = torch.tensor(self.prefix_choices, device=device)
        prefix = choices[torch.randint(len(choices), (batch,), generator=generator).to(device)]
        text_only = torch.zeros(batch, dtype=torch.bool, device=device)
        if self.text_only_share > 0:  # drawn only when asked, so other recipes keep their draws
            text_only = torch.rand(batch, generator=generator).to(device) < self.text_only_share
            prefix = torch.where(text_only, 0, prefix)
        if frames > self.clip_frames:  # some samples are steady-state windows from later in the clip
            later = (torch.rand(batch, generator=generator).to(device) < self.later_windows) & ~text_only
            start = torch.randint(1, frames - self.clip_frames + 1, (batch,), generator=generator).to(device)
            start = torch.where(later, start, 0).tolist()
            latents = torch.stack([clip[:, s : s + self.clip_frames] for clip, s in zip(latents, start)])
            prefix = torch.where(later, self.cache_frames, prefix)
        end = prefix + torch.where(prefix == 0, self.chunk_frames + 1, self.chunk_frames)
        x0 = latents[:, :, : int(end.max())]
        index = torch.arange(x0.shape[2], device=device)
        is_prefix = index < prefix[:, None]
        in_chunk = ~is_prefix & (index < end[:, None])
        tau = sample_levels(batch, self.timestep_shift, generator).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        level = torch.where(is_prefix, self.prefix_noise, tau[:, None])  # the noise each frame carries
        x_tau = noise_to(x0, noise, level[:, None, :, None, None])
        tau_in = torch.where(is_prefix, 0.0, tau[:, None])  # prefix frames are "clean" to the model
        drop = torch.rand(batch, generator=generator).to(device) < self.caption_dropout
        velocity = self.model["denoiser"](x_tau, tau_in, self.model["text"](captions, drop))
        per_frame = (velocity - velocity_target(x0, noise)).pow(2).mean(dim=(1, 3, 4))  # (B, F)
        chunk_mask = in_chunk.float()
        per_sample = (per_frame * chunk_mask).sum(1) / chunk_mask.sum(1)
        return (per_frame * chunk_mask).sum() / chunk_mask.sum(), per_sample, prefix

    def batch_latents(self, batch: dict) -> Tensor:
        """The batch's scaled latents: cached ones (unscaled means) or its pixels encoded now."""
        if "latents" in batch:
            return batch["latents"] * self.codec.scale
        return self.codec.encode(batch["video"])

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        latents = self.batch_latents(batch)
        loss, per_sample, prefix = self.frame_prompt_loss(latents, batch["caption"])
        batch_size = len(latents)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for length in prefix.unique().tolist():
            chosen = prefix == length
            self.log(f"train/loss_prefix{length}", per_sample[chosen].mean(), batch_size=int(chosen.sum()))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        latents = self.batch_latents(batch)
        # Fixed draws per batch, so val/loss is comparable across epochs.
        generator = torch.Generator().manual_seed(batch_idx)
        loss, _, _ = self.frame_prompt_loss(latents, batch["caption"], generator)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(latents))
        if batch_idx == 0 and self.current_epoch % self.log_video_every_n_epochs == 0:
            latents, captions = latents[:LOGGED_VIDEOS], batch["caption"][:LOGGED_VIDEOS]
            generated = self.generate(captions, frames=latents.shape[2], given=latents[:, :, :1])
            real = self.codec.decode(latents)
            self.log_video("val/real_vs_generated", torch.cat((real, self.codec.decode(generated)), dim=-1))

    # -- sampling -------------------------------------------------------------------------------------------
    def sampler(self, **overrides: Any) -> ARSampler:
        settings = dict(
            chunk_frames=self.chunk_frames,
            cache_frames=self.cache_frames,
            steps=self.sample_steps,
            guidance=self.guidance,
            prefix_noise=self.prefix_noise,
            shift=self.timestep_shift,
        )
        return ARSampler(self.model["denoiser"], **{**settings, **overrides})

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str | list[str]],
        frames: int,
        given: Tensor | None = None,
        grid: tuple[int, int] | None = None,
        seed: int = 0,
        **sampler_overrides: Any,
    ) -> Tensor:
        """Latents ``(B, C, frames, H, W)``, one video per prompt, continuing ``given`` latent frames if any.

        A prompt is a caption, or a list of sub-prompts: VSTAR's video synopsis, interpolated over the frames.
        """
        if not isinstance(prompts, list) or not prompts:
            raise ValueError(
                f"prompts must be a non-empty list of captions or sub-prompt lists; got {prompts!r:.80}"
            )
        text = self.model["text"]
        if all(isinstance(p, str) for p in prompts):
            context = text(check_captions(prompts))
        else:  # per-frame context for every video; a plain caption is the same on every frame
            context = torch.stack(
                [
                    text([p])[0].expand(frames, -1, -1) if isinstance(p, str) else text.synopsis(p, frames)
                    for p in prompts
                ]
            )
        null = text.null_context(len(prompts))
        return self.sampler(**sampler_overrides).sample(
            context, null, frames=frames, given=given, grid=grid, seed=seed
        )

    # -- throughput -----------------------------------------------------------------------------------------
    def count_samples(self, batch: Any) -> int:
        return len(batch["latents"] if "latents" in batch else batch["video"])

    def count_tokens(self, batch: Any) -> int:
        """Latent tokens of the training clips (each sample's frames beyond its chunk included)."""
        if "latents" in batch:
            batch_size, _, latent_frames, latent_h, latent_w = batch["latents"].shape
        else:
            batch_size, _, frames, height, width = batch["video"].shape
            latent_frames, latent_h, latent_w = self.codec.latent_shape(frames, height, width)
        tokens_per_frame = (latent_h // self.config.patch) * (latent_w // self.config.patch)
        return batch_size * min(latent_frames, self.clip_frames) * tokens_per_frame
