"""Autoregressive sampling, chunk by chunk, with a temporal KV cache (spec §7).

A rollout is a list of chunks: the given frames (if any), then chunks of ``C`` frames (``1 + C`` for the
first one when no frame is given). Each chunk is denoised by ``S`` Euler steps of rectified flow, then
*written*: its result, lightly re-noised to ``tau_pp`` as in training, goes through the model once at
``tau = 0`` so that every temporal layer appends the chunk's keys and values to the cache (FIFO, at most
``K`` frames). Every denoising step of the next chunk reads that cache and never changes it. The last chunk
is not written: nothing would read it.

``mode="history"`` is the slow, obvious reference: no cache; every step re-runs all earlier (re-noised) frames
at ``tau = 0`` together with the chunk under the mask `masks.chunk_window` (each frame sees its chunk's last ``K``
frames before it). By the model's causality both modes compute the same thing (spec §7.4).
``mode="window"`` is the speed baseline (OS-Fix): every step re-runs only the last ``K`` frames, causally. It
equals the cached sampler until the first eviction; afterwards the cache still carries older context through
earlier layers.

All noise comes from a `NoiseSource` keyed by (seed, kind, absolute frame index), so the two modes, any
call order and any rollout length draw identical noise for the same frame.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from timeloom_kernels import attention_context, masks
from torch import Tensor
from tqdm.auto import tqdm

from timeloom_generation.diffusion import euler_levels, guide, noise_to
from timeloom_generation.model import CausalSTDiT

__all__ = ["ARSampler", "NoiseSource", "chunk_plan"]

Mode = Literal["cached", "history", "window"]
NOISE_KINDS = ("init", "prefix")


class NoiseSource:
    """Gaussian noise per (kind, absolute frame), reproducible from ``seed`` whatever the call order.

    Args:
        seed: the run seed.
        shape: one frame's ``(B, C, H, W)``.
    """

    def __init__(self, seed: int, shape: tuple[int, int, int, int], device=None, dtype=torch.float32) -> None:
        self.seed, self.shape, self.device, self.dtype = seed, tuple(shape), device, dtype

    def __call__(self, kind: str, frames: range) -> Tensor:
        """Noise ``(B, C, len(frames), H, W)`` for the absolute frame indices ``frames``."""
        if kind not in NOISE_KINDS:
            raise ValueError(f"noise kind must be one of {NOISE_KINDS}; got {kind!r}")
        draws = []
        for frame in frames:
            key = (self.seed * len(NOISE_KINDS) + NOISE_KINDS.index(kind)) * 1_000_003 + frame
            generator = torch.Generator().manual_seed(key)
            draws.append(torch.randn(self.shape, generator=generator, dtype=self.dtype))
        return torch.stack(draws, dim=2).to(self.device)


def chunk_plan(frames: int, given: int, chunk_frames: int) -> list[range]:
    """The rollout's chunks as ranges of absolute frame indices (the given frames are chunk 0)."""
    chunks = [range(0, given)] if given else []
    start = given
    while start < frames:
        length = chunk_frames + (1 if start == 0 else 0)
        chunks.append(range(start, min(start + length, frames)))
        start = chunks[-1].stop
    return chunks


class ARSampler:
    """Autoregressive Euler sampler with classifier-free guidance over a `CausalSTDiT`.

    Args:
        model: the denoiser.
        chunk_frames: ``C``, frames generated per chunk.
        cache_frames: ``K``, frames of context kept (FIFO).
        steps: Euler steps ``S`` per chunk.
        guidance: CFG scale ``w``; at 1 the unconditional branch is not run.
        prefix_noise: ``tau_pp``, the light noise clean frames get before they are written (as in training).
        shift: timestep shift of the Euler grid.
        mode: ``"cached"`` (KV cache), ``"history"`` (recompute every earlier frame under `masks.chunk_window`: the
            reference) or ``"window"`` (recompute only the last ``K`` frames: the speed baseline).
        progress: show a progress bar over chunks.
    """

    def __init__(
        self,
        model: CausalSTDiT,
        *,
        chunk_frames: int = 2,
        cache_frames: int = 7,
        steps: int = 20,
        guidance: float = 1.0,
        prefix_noise: float = 0.15,
        shift: float = 1.0,
        mode: Mode = "cached",
        progress: bool = False,
    ) -> None:
        if mode not in ("cached", "history", "window"):
            raise ValueError(f"mode must be 'cached', 'history' or 'window'; got {mode!r}")
        if chunk_frames < 1 or cache_frames < chunk_frames + 1:
            raise ValueError(
                f"need chunk_frames >= 1 and cache_frames >= chunk_frames + 1 (the first chunk has 1 + C "
                f"frames); got chunk_frames={chunk_frames}, cache_frames={cache_frames}"
            )
        self.model, self.chunk_frames, self.cache_frames = model, chunk_frames, cache_frames
        self.steps, self.guidance, self.prefix_noise, self.shift = steps, guidance, prefix_noise, shift
        self.mode, self.progress = mode, progress

    # -- input checks (all before any compute) ----------------------------------------------------------------
    def _check(self, context: Tensor, null_context: Tensor | None, frames: int, given: Tensor | None, grid):
        config = self.model.config
        text_shape = (config.text_tokens, config.width)
        if tuple(context.shape[-2:]) != text_shape or context.shape[1:-2] not in ((), (frames,)):
            raise ValueError(
                f"context must be (B, {text_shape[0]}, {text_shape[1]}) or per frame (B, frames={frames}, "
                f"{text_shape[0]}, {text_shape[1]}); got {tuple(context.shape)}"
            )
        shared = (len(context), *text_shape)
        if self.guidance != 1 and (null_context is None or tuple(null_context.shape) != shared):
            raise ValueError(f"guidance {self.guidance} needs a null_context of shape {shared}")
        if frames < 1:
            raise ValueError(f"frames must be at least 1; got {frames}")
        if given is None:
            if grid is None:
                raise ValueError("give the latent grid (H, W) or the given frames")
            if grid[0] % config.patch or grid[1] % config.patch:
                raise ValueError(
                    f"latent grid {tuple(grid)} is not a multiple of the model's patch {config.patch}"
                )
            return tuple(grid)
        expected = (len(context), config.in_channels)
        if given.dim() != 5 or tuple(given.shape[:2]) != expected:
            raise ValueError(
                f"given frames must be latents (B, C, P, H, W) with (B, C) = {expected} to match the text "
                f"batch and the model's latent channels; got {tuple(given.shape)}"
            )
        height, width = given.shape[3:]
        if height % config.patch or width % config.patch:
            raise ValueError(
                f"given latent grid {height}x{width} is not a multiple of the model's patch {config.patch}"
            )
        if grid is not None and tuple(grid) != (height, width):
            raise ValueError(f"grid {tuple(grid)} does not match the given frames' {height}x{width}")
        if not 1 <= given.shape[2] <= min(frames, self.cache_frames):
            raise ValueError(
                f"given frames ({given.shape[2]}) must be at least 1 and at most frames={frames} and the cache "
                f"capacity {self.cache_frames}"
            )
        return height, width

    # -- sampling ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        context: Tensor,
        null_context: Tensor | None = None,
        *,
        frames: int,
        given: Tensor | None = None,
        grid: tuple[int, int] | None = None,
        seed: int = 0,
    ) -> Tensor:
        """A video of latents ``(B, C, frames, H, W)``; its first frames are ``given`` exactly.

        Args:
            context: projected text ``(B, L_txt, d)``, or per frame ``(B, frames, L_txt, d)`` (VSTAR's synopsis);
                ``null_context (B, L_txt, d)`` the unconditional one (needed if w != 1).
            frames: length of the rollout in latent frames.
            given: clean frames ``(B, C, P0, H, W)`` to continue (image or video prompt), or None (text only).
            grid: latent ``(H, W)`` when nothing is given.
            seed: the noise seed.
        """
        height, width = self._check(context, null_context, frames, given, grid)
        config = self.model.config
        batch = len(context)
        parameter = next(self.model.parameters())
        noise = NoiseSource(
            seed, (batch, config.in_channels, height, width), parameter.device, parameter.dtype
        )
        if self.guidance != 1 and context.dim() == 4:  # the null branch has no per-frame rows
            null_context = null_context.unsqueeze(1).expand(-1, frames, -1, -1)
        text = context if self.guidance == 1 else torch.cat((null_context, context))
        state = _Rollout(
            cache=(
                self.model.new_cache(
                    len(text), (height, width), self.cache_frames, parameter.device, parameter.dtype
                )
                if self.mode == "cached"
                else None
            )
        )
        self.levels = euler_levels(self.steps, self.shift, parameter.device)
        written = []
        chunks = chunk_plan(frames, 0 if given is None else given.shape[2], self.chunk_frames)
        for index, chunk in enumerate(tqdm(chunks, desc="chunks", disable=not self.progress)):
            if index == 0 and given is not None:
                x = given.to(parameter)
            else:
                x = noise("init", chunk)
                for step in range(self.steps):
                    v = self._velocity(x, step, chunk, text, state)
                    x = x + (self.levels[step + 1] - self.levels[step]) * v
            written.append(x)
            if index == len(chunks) - 1:
                break  # nothing reads the last chunk's keys and values
            self._write(noise_to(x, noise("prefix", chunk), self.prefix_noise), chunk, text, state)
        video = torch.cat(written, dim=2)
        if given is not None:
            video[:, :, : given.shape[2]] = given
        return video

    def _velocity(self, x: Tensor, step: int, chunk: range, text: Tensor, state: _Rollout) -> Tensor:
        """The guided velocity of chunk ``x`` at Euler step ``step``."""
        branches = len(text) // len(x)
        x_in = x.repeat(branches, 1, 1, 1, 1)
        levels = self.levels[step].expand(len(x_in), len(chunk))
        positions, mask, past = _frames(chunk, x), None, x_in[:, :, :0]
        if self.mode == "history":
            past = state.history(branches, x_in)
            mask = masks.chunk_window(
                torch.tensor(state.chunk_starts + [chunk.start] * len(chunk)), self.cache_frames
            )
        elif self.mode == "window":
            past = state.history(branches, x_in)[:, :, -self.cache_frames :]
        if past.shape[2]:
            positions = torch.arange(chunk.start - past.shape[2], chunk.stop, device=x.device)
            levels = torch.cat((torch.zeros(len(x_in), past.shape[2], device=x.device), levels), dim=1)
        context = _context(
            branches, len(x), step=step, num_steps=self.steps, write=False, clean_rows=past.shape[2]
        )
        with context, contextlib.ExitStack() as frozen:
            if state.cache is not None:
                frozen.enter_context(state.cache.frozen())
            sequence = torch.cat((past, x_in), dim=2)
            rows = _rows(text, chunk.start - past.shape[2], chunk.stop)
            v = self.model(sequence, levels, rows, positions=positions, mask=mask, cache=state.cache)
        v = v[:, :, past.shape[2] :]
        if branches == 1:
            return v
        unconditional, conditional = v.chunk(2)
        return guide(unconditional, conditional, self.guidance)

    def _write(self, clean: Tensor, chunk: range, text: Tensor, state: _Rollout) -> None:
        """Make ``clean`` (already re-noised to ``tau_pp``) the context of later chunks."""
        if state.cache is None:
            state.clean.append(clean)
            state.chunk_starts += [chunk.start] * len(chunk)
            return
        branches = len(text) // len(clean)
        x_in = clean.repeat(branches, 1, 1, 1, 1)
        tau = torch.zeros(len(x_in), len(chunk), device=clean.device)
        with _context(
            branches, len(clean), step=None, num_steps=self.steps, write=True, clean_rows=len(chunk)
        ):
            rows = _rows(text, chunk.start, chunk.stop)
            self.model(x_in, tau, rows, positions=_frames(chunk, clean), cache=state.cache, write=True)


def _context(branches: int, videos: int, *, step: int | None, num_steps: int, write: bool, clean_rows: int):
    """What attention processors learn about a call (spec §8.1): the step, the CFG layout, the videos per
    branch, whether this is a cache write, and how many leading query frames are clean (never to be edited)."""
    cfg = ("cond",) if branches == 1 else ("uncond", "cond")
    extra = {"write": write, "clean_rows": clean_rows, "videos": videos}
    return attention_context(step=step, num_steps=num_steps, cfg=cfg, extra=extra)


class _Rollout:
    """What a rollout carries between chunks: the KV cache, or (reference mode) every written frame."""

    def __init__(self, cache) -> None:
        self.cache = cache
        self.clean: list[Tensor] = []
        self.chunk_starts: list[int] = []

    def history(self, branches: int, like: Tensor) -> Tensor:
        """Every written frame so far, once per CFG branch (no frames: an empty slice of ``like``)."""
        if not self.clean:
            return like[:, :, :0]
        return torch.cat(self.clean, dim=2).repeat(branches, 1, 1, 1, 1)


def _rows(text: Tensor, start: int, stop: int) -> Tensor:
    """The text of frames ``[start, stop)``: per-frame context ``(B, F, L, d)`` is sliced, shared kept."""
    return text[:, start:stop] if text.dim() == 4 else text


def _frames(chunk: range, like: Tensor) -> Tensor:
    return torch.arange(chunk.start, chunk.stop, device=like.device)
