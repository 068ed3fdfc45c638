"""MovingDigits as tokenizer latents, encoded once and cached on disk (spec §2): training never runs the tokenizer.

MovingDigits is deterministic per (seed, split, index), so a split's latents are a pure function of the
tokenizer's weights and the data arguments. `MovingDigitsLatentsDataModule` encodes each split the first time it
is needed (posterior mean, unscaled: the VDM's codec applies ``latent_scale``) into
``cache_dir/{split}-{key}.pt``, where ``key`` hashes the tokenizer file's bytes and the data arguments; any
change of either encodes again. Items are ``{"latents": (C, F, h, w), "caption": str, "meta": dict}``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from timeloom.data import MovingDigitsDataModule
from timeloom.data.moving_digits import MovingDigits
from timeloom_generation.codec import TokenizerCodec

__all__ = ["LatentVideos", "MovingDigitsLatentsDataModule", "encode_split"]


class LatentVideos(Dataset):
    """Cached latents and captions of a `MovingDigits` split; metadata is redrawn from the (cheap) source."""

    def __init__(self, latents: Tensor, captions: list[str], source: MovingDigits) -> None:
        if not len(latents) == len(captions) == len(source):
            raise ValueError(
                f"{len(latents)} cached latents and {len(captions)} captions for a split of {len(source)} videos"
            )
        self.latents, self.captions, self.source = latents, captions, source

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "latents": self.latents[index],
            "caption": self.captions[index],
            "meta": self.source.sample_meta(index),
        }


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def encode_split(
    source: MovingDigits, codec: TokenizerCodec, batch_size: int = 32
) -> tuple[Tensor, list[str]]:
    """Unscaled posterior means ``(N, C, F, h, w)`` and the captions of every video of ``source``."""
    chunks, captions = [], []
    for start in tqdm(range(0, len(source), batch_size), desc=f"encoding {source.split} latents"):
        items = [source[i] for i in range(start, min(start + batch_size, len(source)))]
        chunks.append(codec.encode(torch.stack([item["video"] for item in items])) / codec.scale)
        captions += [item["caption"] for item in items]
    return torch.cat(chunks), captions


class MovingDigitsLatentsDataModule(MovingDigitsDataModule):
    """`MovingDigitsDataModule` served as cached latents of a KL tokenizer (see the module docstring).

    Args:
        tokenizer: the KL tokenizer (a Lightning ``.ckpt`` or an exported folder); the VDM must use the same.
        cache_dir: where encoded splits are kept.
        encode_batch_size: videos per tokenizer call while encoding.
        **kwargs: the `MovingDigitsDataModule` arguments.
    """

    def __init__(
        self,
        tokenizer: str,
        cache_dir: str = "runs/latent-cache",
        encode_batch_size: int = 32,
        size: int = 32,
        frames: int = 17,
        num_digits: int | tuple[int, int] = 1,
        directions: str | list[str | float] = "cardinal",
        speed: float | tuple[float, float] = (1.0, 3.0),
        bounce: bool = True,
        appearance: str = "together",
        appearance_gap: int | None = None,
        glyph_size: int | None = None,
        channels: int = 1,
        train_length: int = 4096,
        val_length: int = 64,
        test_length: int = 64,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(
            size=size,
            frames=frames,
            num_digits=num_digits,
            directions=directions,
            speed=speed,
            bounce=bounce,
            appearance=appearance,
            appearance_gap=appearance_gap,
            glyph_size=glyph_size,
            channels=channels,
            train_length=train_length,
            val_length=val_length,
            test_length=test_length,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            pin_memory=pin_memory,
        )
        self.tokenizer, self.cache_dir, self.encode_batch_size = (
            Path(tokenizer),
            Path(cache_dir),
            encode_batch_size,
        )
        if not self.tokenizer.exists():
            raise FileNotFoundError(f"no tokenizer checkpoint or exported folder at {self.tokenizer}")

    def cache_path(self, split: str) -> Path:
        """The cache file of ``split``: named by the tokenizer's bytes and every argument that shapes the data."""
        weights = self.tokenizer / "model.safetensors" if self.tokenizer.is_dir() else self.tokenizer
        arguments = {**self.dataset_args, "seed": self.seed, "split": split, "length": self.lengths[split]}
        key = hashlib.sha256(
            (_file_digest(weights) + json.dumps(arguments, sort_keys=True, default=str)).encode()
        ).hexdigest()[:16]
        return self.cache_dir / f"{split}-{key}.pt"

    def build_dataset(self, split: str) -> LatentVideos:
        source = super().build_dataset(split)
        path = self.cache_path(split)
        if not path.exists():
            latents, captions = encode_split(source, TokenizerCodec(self.tokenizer), self.encode_batch_size)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            torch.save({"latents": latents, "captions": captions}, temporary)
            temporary.replace(path)  # a half-written cache is never read
        cached = torch.load(path, weights_only=True)
        return LatentVideos(cached["latents"], cached["captions"], source)
