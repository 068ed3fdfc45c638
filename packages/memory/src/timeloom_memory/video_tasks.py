"""Long-video recall from MovingDigits (issue #7 item 6): "which digit appeared first?" after many clips.

A long video is ``clips`` short MovingDigits clips played one after another, each showing one handwritten
digit. Clip ``c`` of video ``i`` is MovingDigits item ``i·clips + c``, so every clip is drawn on its own and
the digits of different clips are independent (a digit may come back). After the video come the questions,
in the order of ``questions``:

- ``first``: which digit appeared in the first clip? Only a memory of the whole stream answers it: the
  last ``w < clips`` clips (what a window holds) are independent of the first clip, so a model that sees
  only them is at chance (1/10) by construction.
- ``last``: which digit appeared in the last clip? Any window answers it — the control.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from timeloom.data import TimeloomDataModule
from timeloom.data.moving_digits import MovingDigits

__all__ = ["QUESTIONS", "LongVideoRecall", "LongVideoRecallDataModule"]

# question id -> (text, which clip holds the answer)
QUESTIONS = {"first": ("which digit appeared first?", 0), "last": ("which digit appeared last?", -1)}


class LongVideoRecall(Dataset):
    """Long videos of one-digit clips with questions about them, deterministic per ``(seed, split, index)``.

    Each item: ``video (C, clips·frames_per_clip, H, W)`` in ``[-1, 1]``, ``clip_labels (clips,)``,
    ``questions (Q,)`` (indices into ``questions``), ``answers (Q,)`` (digits), ``caption`` (the questions
    and answers as text, for a video-LLM) and ``meta``.

    Args:
        clips: clips per video (the stream's length in clips).
        frames_per_clip: frames of each clip.
        size: frame height and width in pixels.
        questions: question ids from `QUESTIONS`, asked in this order after the video.
        speed: digit speed in pixels per frame (a value or a range), as in `MovingDigits`.
        length: number of videos.
        seed: base seed.
        split: ``train``, ``val`` or ``test`` (disjoint handwritten glyphs, as in `MovingDigits`).
        cache: keep each video once drawn (drawing a video renders ``clips`` MovingDigits clips, which
            costs more CPU than a tiny model's training step on it).
    """

    def __init__(
        self,
        clips: int = 8,
        frames_per_clip: int = 2,
        size: int = 16,
        questions: tuple[str, ...] = ("first", "last"),
        speed: float | tuple[float, float] = (0.5, 1.5),
        length: int = 1000,
        seed: int = 0,
        split: str = "train",
        cache: bool = False,
    ):
        if clips < 2:
            raise ValueError(f"LongVideoRecall needs clips ≥ 2 (a first and a later clip); got {clips}")
        unknown = [q for q in questions if q not in QUESTIONS]
        if unknown or not questions:
            raise ValueError(
                f"LongVideoRecall questions must be a non-empty list of {list(QUESTIONS)}; got {questions}"
            )
        self.clips, self.frames_per_clip, self.questions = clips, frames_per_clip, tuple(questions)
        self.length = length
        self.cached: dict[int, dict[str, Any]] | None = {} if cache else None
        self.digits = MovingDigits(
            size=size, frames=frames_per_clip, num_digits=1, speed=speed, length=length * clips, seed=seed,
            split=split,
        )  # fmt: skip

    def __len__(self) -> int:
        return self.length

    def clip(self, index: int, clip: int) -> dict[str, Any]:
        """Clip ``clip`` of video ``index``: a MovingDigits item with one digit."""
        if not 0 <= index < self.length:
            raise IndexError(f"LongVideoRecall index {index} out of range 0..{self.length - 1}")
        return self.digits[index * self.clips + clip]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.cached is None:
            return self.draw(index)
        if index not in self.cached:
            self.cached[index] = self.draw(index)
        return self.cached[index]

    def draw(self, index: int) -> dict[str, Any]:
        """Video ``index`` and its questions, rendered from its clips."""
        clips = [self.clip(index, c) for c in range(self.clips)]
        labels = torch.stack([c["meta"]["labels"][0] for c in clips])
        answers = torch.stack([labels[QUESTIONS[q][1]] for q in self.questions])
        caption = " ".join(f"{QUESTIONS[q][0]} {int(a)}." for q, a in zip(self.questions, answers))
        return {
            "video": torch.cat([c["video"] for c in clips], dim=1),
            "clip_labels": labels,
            "questions": torch.tensor([list(QUESTIONS).index(q) for q in self.questions]),
            "answers": answers,
            "caption": caption,
            "meta": {"index": index, "clips": self.clips, "frames_per_clip": self.frames_per_clip},
        }


class LongVideoRecallDataModule(TimeloomDataModule):
    """`LongVideoRecall` splits; see that class for the task arguments (``cache`` holds every split's videos in
    memory once drawn: 16 KiB per video at the default sizes)."""

    def __init__(
        self,
        clips: int = 8,
        frames_per_clip: int = 2,
        size: int = 16,
        questions: tuple[str, ...] = ("first", "last"),
        speed: float | tuple[float, float] = (0.5, 1.5),
        train_length: int = 4096,
        val_length: int = 256,
        test_length: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        cache: bool = True,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        self.save_hyperparameters()
        self.cache = cache
        self.lengths = {"train": train_length, "val": val_length, "test": test_length}
        self.task = dict(clips=clips, frames_per_clip=frames_per_clip, size=size, questions=tuple(questions),
                         speed=speed)  # fmt: skip
        LongVideoRecall(length=0, **self.task)  # reject a bad configuration now

    def build_dataset(self, split: str) -> LongVideoRecall:
        return LongVideoRecall(
            length=self.lengths[split], seed=self.seed, split=split, cache=self.cache, **self.task
        )
