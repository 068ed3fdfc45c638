"""Data for video-LLMs (spec §5): built-in temporal QA over MovingDigits, LLaVA-style JSON in and out, collation.

`TemporalQA` asks TempCompass-style questions whose answer lives in *time*: which way a digit moves, which of
two digits is faster, which is shown first, how many times one blinks, when one appears. Every dataset index
is a *conflict group* of two videos with the same static content and the same question but different answers
(a reversed playback, swapped speeds, a different blink count or onset), so one frame cannot answer. Reversed
twins hold exactly the same frames in the opposite order, and count/when variants the same visible frames, so
a model blind to frame order is at chance there by construction.

Scenes are explicit metadata (per digit: glyph, centre and visibility in every frame) rendered by the core's
`render_digits`; answers are derived from that metadata alone. Item ``i`` of split ``s`` comes from seed
``(seed, s, i)`` and uses the split's own handwritten glyphs (disjoint between train, val and test).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from timeloom.data.datamodule import TimeloomDataModule
from timeloom.data.moving_digits import SPLITS, digit_glyphs, render_digits, split_glyph_indices
from timeloom.video_io import frames_to_tensor, read_video, video_info, write_video
from timeloom_understanding.text import (
    IGNORE_INDEX,
    TextTokenizer,
    encode_conversation,
    media_of,
    train_wordpiece,
)

__all__ = [
    "ASPECTS",
    "FORMATS",
    "OPT_IN_ASPECTS",
    "ConversationCollator",
    "ConversationDataset",
    "TemporalQA",
    "TemporalQADataModule",
    "derive_answer",
    "flatten_groups",
    "temporal_qa_vocabulary",
    "write_llava_json",
]

ASPECTS = ("direction", "speed", "order", "count", "when")
# Asked only when named in ``aspects`` (the default stays ASPECTS, so existing data and results do not move):
# ``first`` is long-video recall for a memory (issue #7 item 6), see `TemporalQA._scene_first`.
OPT_IN_ASPECTS = ("first",)
FIRST_CLIPS = 4  # the ``first`` scene's digits, shown one after another
FORMATS = ("multi_choice", "yes_no", "caption_matching")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # y grows down
COUNTS = ("once", "twice", "three times")
MOMENTS = ("at the start", "in the middle", "at the end")
LETTERS = "ABCD"
CONTROLS = ("none", "middle_frame", "random_frame", "shuffled")  # what a model is shown of the video
TEXT_STAGE = "text"  # no video: the fact written as text (a control value, not a video control)
DESCRIBE = "Describe the video."


# --------------------------------------------------------------------------------------------------------
# Answers from metadata alone
# --------------------------------------------------------------------------------------------------------
def _visible_runs(visible: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` runs of True in a 1-D bool array."""
    runs, start = [], None
    for t, on in enumerate(list(visible) + [False]):
        if on and start is None:
            start = t
        elif not on and start is not None:
            runs.append((start, t))
            start = None
    return runs


def derive_answer(aspect: str, meta: dict[str, Any]) -> str:
    """The answer to ``aspect``'s question, from ``trajectory (T, n, 2)``, ``visible (T, n)`` and ``labels``.

    direction: the dominant axis of digit 0's displacement between its first and last visible frame;
    speed: the label of the digit with the larger mean step; order and first: the label seen first; count:
    digit 0's number of visible runs; when: where the middle of digit 0's visible frames falls (thirds of the
    video).
    """
    trajectory = np.asarray(meta["trajectory"], dtype=np.float64)
    visible = np.asarray(meta["visible"], dtype=bool)
    labels = [int(x) for x in meta["labels"]]
    frames = visible.shape[0]
    if aspect == "direction":
        seen = np.flatnonzero(visible[:, 0])
        dx, dy = trajectory[seen[-1], 0] - trajectory[seen[0], 0]
        if abs(dx) >= abs(dy):
            return "right" if dx > 0 else "left"
        return "down" if dy > 0 else "up"
    if aspect == "speed":
        steps = np.linalg.norm(np.diff(trajectory, axis=0), axis=-1).mean(axis=0)
        return str(labels[int(np.argmax(steps))])
    if aspect in ("order", "first"):
        first = [int(np.flatnonzero(visible[:, k])[0]) for k in range(len(labels))]
        return str(labels[int(np.argmin(first))])
    if aspect == "count":
        return COUNTS[len(_visible_runs(visible[:, 0])) - 1]
    if aspect == "when":
        phase = np.flatnonzero(visible[:, 0]).mean() / max(frames - 1, 1)
        return MOMENTS[min(int(phase * 3), 2)]
    raise ValueError(f"unknown aspect {aspect!r}; choose from {ASPECTS + OPT_IN_ASPECTS}")


def _reversed(meta: dict[str, Any]) -> dict[str, Any]:
    return meta | {"trajectory": meta["trajectory"][::-1].copy(), "visible": meta["visible"][::-1].copy()}


# --------------------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------------------
class TemporalQA(Dataset):
    """Temporal questions about MovingDigits videos, two conflicting videos per index.

    ``dataset[i]`` is a list of two items (a conflict group: keep them in one batch, `flatten_groups`). An
    item is a LLaVA-style conversation plus its video and metadata: ``{"id", "video" (C, T, H, W) in
    [−1, 1], "conversations", "aspect", "format", "answer", "options", "reversed", "group", "caption",
    "meta"}``. ``meta`` holds ``labels (n,)``, ``glyph_index (n,)``, ``trajectory (T, n, 2)`` glyph centres
    ``(x, y)`` and ``visible (T, n)``.

    Args:
        split: ``train``, ``val`` or ``test`` (disjoint glyph images).
        length: number of conflict groups.
        size: canvas side in pixels.
        frames: frames per video (at least 5, for three blinks).
        glyph_size: glyph side in pixels.
        aspects: which aspects to ask about: `ASPECTS` by default; ``first`` (`OPT_IN_ASPECTS`) only when named,
            and only as four-option multiple choice (``formats=("multi_choice",)``, ``max_options=4``).
        formats: which question formats to use (drawn per group).
        max_options: at most this many multiple-choice options (2–4).
        task: ``qa`` (questions) or ``caption`` (describe the video: the stage-1 alignment task).
        caption_share: with ``task="qa"``, the share of groups (drawn by the item seed) asked for a caption
            instead: a training lever, the caption names the temporal fact with no option to match.
        describe_first: with ``task="qa"``, the share of the other groups (drawn by the item seed) asked in
            two turns: "Describe the video." and its caption, then the question. It teaches the
            describe-then-answer protocol, in which the model reads the fact from its own description
            (matching text to text) instead of from the visual tokens; the question's reply is the last turn.
        letter_last: option-letter replies name the option before its letter, ``"the 4, option C."``
            instead of ``"C. the 4"``: the letter is then a lookup of the option just written in the listing,
            not a step that must recall the fact and find its line at once. The prompt is the same; the
            evaluate command's letter reading (`scoring.read_letter`) reads both forms.
        control: what the model sees, for the controls that show a question needs time: ``none`` (the
            video), ``middle_frame`` (only the middle frame, ``T = 1``), ``random_frame`` (one frame at an
            index drawn from the item's seed) or ``shuffled`` (frames in an order drawn from the item's seed).
            ``random_frame`` is the single-frame baseline: every frame is equally likely, so twins with the
            same frame multiset look alike. The middle frame is not neutral: it shows the second digit of an
            order scene and the digit of a "when … in the middle" scene. ``text`` is the text stage: no
            video, the item's caption is written where ``<video>`` stood, so an LLM learns the answer formats
            from facts it can read before it learns to read them from visual tokens.
        seed: base seed.
        channels: 1 (grey) or 3.
    """

    def __init__(
        self,
        split: str = "train",
        length: int = 1000,
        size: int = 32,
        frames: int = 8,
        glyph_size: int = 10,
        aspects: Sequence[str] = ASPECTS,
        formats: Sequence[str] = FORMATS,
        max_options: int = 4,
        task: str = "qa",
        caption_share: float = 0.0,
        describe_first: float = 0.0,
        letter_last: bool = False,
        control: str = "none",
        seed: int = 0,
        channels: int = 1,
    ) -> None:
        if task not in ("qa", "caption"):
            raise ValueError(f"task must be 'qa' or 'caption'; got {task!r}")
        if not (0 <= caption_share <= 1 and 0 <= describe_first <= 1):
            raise ValueError(
                f"caption_share and describe_first must lie in [0, 1]; got {caption_share}, {describe_first}"
            )
        self.caption_share, self.describe_first = caption_share, describe_first
        self.letter_last = letter_last
        if control not in (*CONTROLS, TEXT_STAGE):
            raise ValueError(f"control must be one of {(*CONTROLS, TEXT_STAGE)}; got {control!r}")
        self.control = control
        known = ASPECTS + OPT_IN_ASPECTS
        unknown = [a for a in aspects if a not in known] + [f for f in formats if f not in FORMATS]
        if unknown or not aspects or not formats:
            raise ValueError(f"unknown or missing aspects/formats {unknown}: use {known} and {FORMATS}")
        if "first" in aspects and (tuple(formats) != ("multi_choice",) or max_options != 4):
            raise ValueError(  # its window-only ceiling (1/3) is stated for four options
                "the 'first' aspect is asked as multiple choice with four options: "
                f"formats=('multi_choice',), max_options=4; got {tuple(formats)}, {max_options}"
            )
        if frames < 5 or glyph_size > size or not 2 <= max_options <= 4 or channels not in (1, 3):
            raise ValueError(
                f"need frames >= 5, glyph_size <= size, 2 <= max_options <= 4, channels 1 or 3; got "
                f"{frames}, {glyph_size} > {size}?, {max_options}, {channels}"
            )
        self.split, self.length, self.size, self.frames = split, length, size, frames
        self.glyph_size, self.aspects, self.formats = glyph_size, tuple(aspects), tuple(formats)
        self.max_options, self.task, self.seed, self.channels = max_options, task, seed, channels
        pool = split_glyph_indices(split)  # validates the split
        labels = digit_glyphs(glyph_size)[1].numpy()
        self._pool_by_label = [pool[labels[pool] == label] for label in range(10)]
        # glyph centres keep the whole glyph on the canvas
        self._low, self._high = (glyph_size - 1) / 2, size - 1 - (glyph_size - 1) / 2
        self._fast = 0.95 * (self._high - self._low) / (frames - 1)  # crosses most of the canvas

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        if not 0 <= index < self.length:
            raise IndexError(f"group {index} out of range for {self.length} groups")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        aspect = self.aspects[rng.integers(len(self.aspects))]
        fmt = self.formats[rng.integers(len(self.formats))]
        metas, reversed_twin = getattr(self, f"_scene_{aspect}")(rng)
        answers = [derive_answer(aspect, meta) for meta in metas]
        prompt, options, replies = self._question(aspect, fmt, metas[0]["labels"], answers, rng)
        captioned = self.task == "caption" or (self.caption_share > 0 and rng.random() < self.caption_share)
        if captioned:
            fmt = "caption"
            prompt, replies = (
                DESCRIBE,
                [_caption(aspect, meta["labels"], a) for meta, a in zip(metas, answers)],
            )
        described = not captioned and self.describe_first > 0 and rng.random() < self.describe_first
        items = []
        for variant, (meta, answer, reply) in enumerate(zip(metas, answers, replies)):
            caption = _caption(aspect, meta["labels"], answer)
            conversations = _turns(prompt, reply, caption if described else None)
            item = {
                "id": f"temporal_qa/{self.split}/{index:06d}/{variant}",
                "conversations": conversations,
                "aspect": aspect,
                "format": fmt,
                "answer": answer,
                "options": options,
                "reversed": reversed_twin and variant == 1,
                "group": index,
                "caption": caption,
                "meta": meta,
            }
            if self.control == TEXT_STAGE:
                first = conversations[0]
                conversations[0] = first | {"value": first["value"].replace("<video>", caption, 1)}
            else:
                item["video"] = self._shown(self.render(meta), rng)
            items.append(item)
        return items

    def render(self, meta: dict[str, Any]) -> Tensor:
        """The video ``(C, T, H, W)`` in ``[−1, 1]`` of a scene."""
        glyphs = digit_glyphs(self.glyph_size)[0][torch.as_tensor(meta["glyph_index"])]
        ink = render_digits(
            glyphs,
            torch.as_tensor(meta["trajectory"], dtype=torch.float32),
            torch.as_tensor(meta["visible"]),
            self.size,
        )
        return (ink * 2 - 1).unsqueeze(0).expand(self.channels, -1, -1, -1).contiguous()

    def _shown(self, video: Tensor, rng: np.random.Generator) -> Tensor:
        """The video as the control shows it (the answer still comes from the whole scene)."""
        if self.control == "middle_frame":
            middle = self.frames // 2
            return video[:, middle : middle + 1]
        if self.control == "random_frame":
            shown = int(rng.integers(self.frames))
            return video[:, shown : shown + 1]
        if self.control == "shuffled":
            return video[:, torch.from_numpy(rng.permutation(self.frames))]
        return video

    # ---- scenes: two conflicting metadata dicts and whether the second is the first played backwards ----
    def _digits(self, rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
        labels = rng.choice(10, size=count, replace=False)
        glyphs = np.array([rng.choice(self._pool_by_label[label]) for label in labels])
        return {"labels": labels, "glyph_index": glyphs}

    def _still(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """``(T, count, 2)`` centres of digits that stay put."""
        centre = rng.uniform(self._low, self._high, size=(count, 2))
        return np.repeat(centre[None], self.frames, axis=0)

    def _moving(self, rng: np.random.Generator, direction: str, speed: float, room: float) -> np.ndarray:
        """``(T, 2)`` centres of a digit crossing the canvas in a straight line at ``speed`` px/frame.

        The start leaves room for ``room`` px/frame (≥ speed), so the glyph stays fully inside, and the same
        rng state gives the same start at any speed up to ``room``.
        """
        unit = np.asarray(DIRECTIONS[direction])
        travel = np.abs(unit) * room * (self.frames - 1)
        low = self._low + np.where(unit < 0, travel, 0.0)
        high = self._high - np.where(unit > 0, travel, 0.0)
        start = rng.uniform(low, high)
        return start[None] + np.arange(self.frames)[:, None] * (unit * speed)[None]

    def _scene_direction(self, rng: np.random.Generator):
        direction = list(DIRECTIONS)[rng.integers(4)]
        speed = rng.uniform(0.5, 1.0) * self._fast
        meta = self._digits(rng, 1) | {
            "trajectory": self._moving(rng, direction, speed, speed)[:, None],
            "visible": np.ones((self.frames, 1), dtype=bool),
        }
        return [meta, _reversed(meta)], True

    def _scene_speed(self, rng: np.random.Generator):
        digits = self._digits(rng, 2)
        directions = [list(DIRECTIONS)[k] for k in rng.integers(4, size=2)]
        seeds = rng.integers(2**31, size=2)  # the same starting places in both variants
        metas = []
        for fast in (0, 1):
            paths = [
                self._moving(
                    np.random.default_rng(seeds[k]),
                    directions[k],
                    self._fast / (1 if k == fast else 3),
                    self._fast,
                )
                for k in range(2)
            ]
            metas.append(
                digits | {"trajectory": np.stack(paths, 1), "visible": np.ones((self.frames, 2), dtype=bool)}
            )
        return metas, False

    def _scene_order(self, rng: np.random.Generator):
        half = self.frames // 2
        visible = np.zeros((self.frames, 2), dtype=bool)
        visible[:half, 0], visible[half:, 1] = True, True  # each digit in its own window
        meta = self._digits(rng, 2) | {"trajectory": self._still(rng, 2), "visible": visible}
        return [meta, _reversed(meta)], True

    def _scene_first(self, rng: np.random.Generator):
        """`FIRST_CLIPS` still digits shown one after another, each for a quarter of the video (the last one
        also for any remainder); the twin swaps the first two. The answer's digit and the twin's differences
        lie in the first half: a window over the last half sees the same two later digits in both twins."""
        run = self.frames // FIRST_CLIPS
        visible = np.zeros((self.frames, FIRST_CLIPS), dtype=bool)
        for k in range(FIRST_CLIPS):
            visible[k * run : (k + 1) * run if k < FIRST_CLIPS - 1 else self.frames, k] = True
        meta = self._digits(rng, FIRST_CLIPS) | {
            "trajectory": self._still(rng, FIRST_CLIPS),
            "visible": visible,
        }
        swapped = visible.copy()
        swapped[:, [0, 1]] = visible[:, [1, 0]]
        return [meta, meta | {"visible": swapped}], False

    def _first_options(self, labels, answers, rng: np.random.Generator) -> list[str]:
        """Four options: both twins' answers (the digits before the window), one digit of the last half and one
        never shown. A model that sees only the last half can rule out the digit it sees and cannot tell the
        other three apart (all are absent from what it sees, and drawn alike), so it is right at most 1/3 of
        the time; since the twins look alike to it and differ in their answer, at most one of a pair."""
        later = str(int(labels[2 + rng.integers(FIRST_CLIPS - 2)]))
        never = str(int(rng.choice([d for d in range(10) if d not in {int(x) for x in labels}])))
        picked = [*answers, later, never]
        return [picked[k] for k in rng.permutation(len(picked))]

    def _scene_count(self, rng: np.random.Generator):
        counts = rng.choice(3, size=2, replace=False) + 1
        base = self._digits(rng, 1) | {"trajectory": self._still(rng, 1)}
        return [base | {"visible": self._blinks(rng, int(c))[:, None]} for c in counts], False

    def _blinks(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """Three visible steps in ``count`` runs separated by gaps, placed at random. A step is
        ``frames // 8`` frames (at least one), so a 32-frame video is the 8-frame one sampled four times
        denser (the same draws), as the other scenes are; a fixed three frames would make 32-frame blinks
        four times shorter, another scene rather than the same one sampled denser."""
        step = max(1, self.frames // 8)
        runs = {1: [3], 2: list(rng.permutation([1, 2])), 3: [1, 1, 1]}[count]
        spare = self.frames // step - 3 - (count - 1)  # steps left once each gap has one blank step
        extra = rng.multinomial(spare, np.ones(count + 1) / (count + 1))  # before, between, after
        visible, t = np.zeros(self.frames, dtype=bool), int(extra[0])
        for k, run in enumerate(runs):
            visible[t * step : (t + run) * step] = True
            t += run + 1 + int(extra[k + 1])
        return visible

    def _scene_when(self, rng: np.random.Generator):
        duration = max(1, self.frames // 4)
        onsets = [0, (self.frames - duration) // 2, self.frames - duration]
        moments = rng.choice(3, size=2, replace=False)
        base = self._digits(rng, 1) | {"trajectory": self._still(rng, 1)}
        metas = []
        for moment in moments:
            visible = np.zeros((self.frames, 1), dtype=bool)
            visible[onsets[moment] : onsets[moment] + duration] = True
            metas.append(base | {"visible": visible})
        return metas, set(moments.tolist()) == {0, 2}

    # ---- question formats ---------------------------------------------------------------------------
    def _question(self, aspect, fmt, labels, answers, rng):
        """``(prompt, options, replies)``: one prompt for the group, one reply per variant.

        A reply's first token decides it: the option letter (``"B. up"``) or ``yes``/``no``; with
        ``letter_last`` the letter is the reply's last word (``"up, option B."``).
        """
        subject = int(labels[0])
        if aspect == "first":  # four-option multiple choice only (checked in __init__)
            options = self._first_options(labels, answers, rng)
            listing = "\n".join(f"({LETTERS[k]}) {_option_text(aspect, o)}" for k, o in enumerate(options))
            prompt = f"{_ask(aspect, subject)}\n{listing}\nAnswer with the option's letter."
            replies = [self._choice_reply(options.index(a), _option_text(aspect, a)) for a in answers]
            return prompt, options, replies
        choices = {
            "direction": list(DIRECTIONS),
            "speed": [str(x) for x in range(10)],
            "order": [str(x) for x in range(10)],
            "count": list(COUNTS),
            "when": list(MOMENTS),
        }[aspect]
        if fmt == "multi_choice":
            wanted = int(rng.integers(2, self.max_options + 1))
            # distractors never name a digit of the video (speed, order: the options are digits)
            distractors = [c for c in choices if c not in answers and c not in {str(int(x)) for x in labels}]
            picked = list(dict.fromkeys(answers)) + list(
                rng.permutation(distractors)[: max(wanted - len(set(answers)), 0)]
            )
            options = [picked[k] for k in rng.permutation(len(picked))]
            shown = [_option_text(aspect, o) for o in options]
            listing = "\n".join(f"({LETTERS[k]}) {text}" for k, text in enumerate(shown))
            prompt = f"{_ask(aspect, subject)}\n{listing}\nAnswer with the option's letter."
            replies = [self._choice_reply(options.index(a), _option_text(aspect, a)) for a in answers]
            return prompt, options, replies
        if fmt == "yes_no":
            asked = answers[int(rng.integers(2))]
            prompt = f"{_yes_no(aspect, asked, labels)}\nPlease answer yes or no."
            return prompt, ["yes", "no"], ["yes" if a == asked else "no" for a in answers]
        captions = list(dict.fromkeys(answers))
        options = [captions[k] for k in rng.permutation(len(captions))]
        listing = "\n".join(f"({LETTERS[k]}) {_caption(aspect, labels, o)}" for k, o in enumerate(options))
        prompt = f"Which caption matches the video?\n{listing}\nAnswer with the option's letter."
        replies = [self._choice_reply(options.index(a), _caption(aspect, labels, a)) for a in answers]
        return prompt, options, replies

    def _choice_reply(self, index: int, text: str) -> str:
        """The reply naming option ``index`` (text ``text``): ``"C. the 4"``, or ``"the 4, option C."``."""
        if self.letter_last:
            return f"{text.rstrip('.')}, option {LETTERS[index]}."
        return f"{LETTERS[index]}. {text}"

    def __repr__(self) -> str:
        return (
            f"TemporalQA(split={self.split!r}, length={self.length}, size={self.size}, frames={self.frames}, "
            f"aspects={self.aspects}, formats={self.formats})"
        )


def _ask(aspect: str, subject: int) -> str:
    return {
        "direction": f"Which way does the {subject} move?",
        "speed": "Which digit moves faster?",
        "order": "Which digit is shown first?",
        "first": "Which digit appears first?",
        "count": f"How many times does the {subject} appear?",
        "when": f"When does the {subject} appear?",
    }[aspect]


def _option_text(aspect: str, option: str) -> str:
    return f"the {option}" if aspect in ("speed", "order", "first") else option


def _other(labels, answer: str) -> int:
    """The digit of a two-digit scene that is not ``answer``."""
    return next(int(x) for x in labels if str(int(x)) != answer)


def _yes_no(aspect: str, asked: str, labels) -> str:
    subject = int(labels[0])
    if aspect == "direction":
        return f"Does the {subject} move {asked}?"
    if aspect == "speed":
        return f"Does the {asked} move faster than the {_other(labels, asked)}?"
    if aspect == "order":
        return f"Is the {asked} shown before the {_other(labels, asked)}?"
    return f"Does the {subject} appear {asked}?"


def _caption(aspect: str, labels, answer: str) -> str:
    """A one-sentence description that states the temporal fact (stage-1 captions, caption matching)."""
    subject = int(labels[0])
    if aspect == "direction":
        return f"The {subject} moves {answer}."
    if aspect == "speed":
        return f"The {answer} moves faster than the {_other(labels, answer)}."
    if aspect == "order":
        return f"The {answer} appears before the {_other(labels, answer)}."
    if aspect == "first":
        return f"The {answer} appears first."
    return f"The {subject} appears {answer}."


def temporal_qa_vocabulary(groups: int = 1000) -> str:
    """The bundled ``temporal_qa`` vocabulary (`text.BUNDLED_VOCABULARIES`): a WordPiece holding every word
    `TemporalQA` writes (questions of each format, their replies and the captions) over ``groups`` training
    groups, as ``tokenizer.json`` text. About 200 entries instead of MiniLM's 30,522 make the tiny LM's tied
    embedding a few percent of its parameters instead of most of them. Regenerate the shipped file with
    ``python -c "from timeloom_understanding.data import temporal_qa_vocabulary as v; print(v(), end='')" >
    packages/understanding/src/timeloom_understanding/vocabularies/temporal_qa.json``.
    """
    texts = []
    for task in ("qa", "caption"):
        dataset = TemporalQA("train", length=groups, task=task)
        for index in range(groups):
            texts += [turn["value"] for item in dataset[index] for turn in item["conversations"]]
    return train_wordpiece(texts)


def _turns(prompt: str, reply: str, description: str | None) -> list[dict[str, str]]:
    """One question turn, or with a ``description`` a "Describe the video." turn before it."""
    if description is None:
        return [{"from": "human", "value": f"<video>\n{prompt}"}, {"from": "gpt", "value": reply}]
    return [
        {"from": "human", "value": f"<video>\n{DESCRIBE}"},
        {"from": "gpt", "value": description},
        {"from": "human", "value": prompt},
        {"from": "gpt", "value": reply},
    ]


def flatten_groups(groups: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Conflict groups → items, each group's items kept together (so they share a batch)."""
    return [item for group in groups for item in (group if isinstance(group, list) else [group])]


# --------------------------------------------------------------------------------------------------------
# Collation: conversations → padded token tensors, media stacked in order
# --------------------------------------------------------------------------------------------------------
class ConversationCollator:
    """Turns LLaVA-style items (with decoded media tensors) into a batch for the video-LLM.

    Returns ``{"video": (N, C, T, H, W)`` all media of the batch in order, ``"media_per_item" (B,)``,
    ``"input_ids"/"labels"/"role"/"turn" (B, L)`` right-padded (pad id, −100, −1, −1), ``"lengths" (B,)``,
    and the items' ``id``, ``aspect``, ``format``, ``answer`` lists where present}``. Placeholders stay
    single tokens; the model splices the visual tokens in.
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        visual_tokens_per_media: int,
        max_length: int,
        for_generation: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.visual_tokens_per_media = visual_tokens_per_media
        self.max_length = max_length
        self.for_generation = for_generation

    def __call__(self, groups: Sequence[Any]) -> dict[str, Any]:
        items = flatten_groups(groups)
        encoded = [
            encode_conversation(
                item,
                self.tokenizer,
                visual_tokens_per_media=self.visual_tokens_per_media,
                max_length=self.max_length,
                for_generation=self.for_generation,
            )
            for item in items
        ]
        longest = max(len(e) for e in encoded)

        def pad(values: list[Tensor], fill: int) -> Tensor:
            out = torch.full((len(values), longest), fill, dtype=torch.long)
            for row, value in enumerate(values):
                out[row, : len(value)] = value
            return out

        media = [m for item in items for m in media_of(item)]
        batch: dict[str, Any] = {
            "video": torch.stack(media) if media else None,
            "media_per_item": torch.tensor([len(media_of(item)) for item in items]),
            "input_ids": pad([e.input_ids for e in encoded], self.tokenizer.pad_id),
            "labels": pad([e.labels for e in encoded], IGNORE_INDEX),
            "role": pad([e.role for e in encoded], -1),
            "turn": pad([e.turn for e in encoded], -1),
            "lengths": torch.tensor([len(e) for e in encoded]),
        }
        for key in ("id", "aspect", "format", "answer"):
            if all(key in item for item in items):
                batch[key] = [item[key] for item in items]
        return batch


# --------------------------------------------------------------------------------------------------------
# LLaVA-style JSON in and out
# --------------------------------------------------------------------------------------------------------
_EXTRA_KEYS = ("aspect", "format", "answer", "options", "reversed", "group", "caption")


def write_llava_json(items: Sequence[dict[str, Any]], folder: str | Path, fps: float = 8) -> Path:
    """Write items as ``folder/conversations.json`` with each video as a lossless MP4 under ``videos/``.

    The JSON is LLaVA's: ``[{"id", "video": relative path, "conversations", …}]`` plus our extra keys.
    """
    folder = Path(folder)
    records = []
    for item in items:
        relative = Path("videos") / f"{item['id'].replace('/', '_')}.mp4"
        write_video(folder / relative, item["video"], fps=fps, crf=0)
        record = {"id": item["id"], "video": str(relative), "conversations": item["conversations"]}
        records.append(record | {k: item[k] for k in _EXTRA_KEYS if k in item})
    path = folder / "conversations.json"
    path.write_text(json.dumps(records, indent=1))
    return path


class ConversationDataset(Dataset):
    """LLaVA-style conversation JSON with its media decoded by PyAV.

    Media paths are relative to ``media_root`` (default: the JSON's folder). Each video becomes ``frames``
    frames sampled evenly over the file (``linspace``), ``(C, T, H, W)`` in ``[−1, 1]``; an image is a video
    with ``T = 1``. Missing files are found before any training: they raise, listing every one, unless
    ``allow_missing``, which skips those items and counts them in `missing`.
    """

    def __init__(
        self,
        path: str | Path,
        media_root: str | Path | None = None,
        frames: int = 8,
        channels: int = 1,
        allow_missing: bool = False,
    ) -> None:
        self.path = Path(path)
        self.media_root = Path(media_root) if media_root is not None else self.path.parent
        self.frames, self.channels = frames, channels
        records = json.loads(self.path.read_text())
        if not isinstance(records, list):
            raise ValueError(
                f"{self.path}: expected a JSON list of conversations, got {type(records).__name__}"
            )
        absent = [
            (record.get("id"), str(self.media_root / m))
            for record in records
            for m in media_of(record)
            if not (self.media_root / m).is_file()
        ]
        if absent and not allow_missing:
            listing = "\n".join(f"  item {item_id!r}: {file}" for item_id, file in absent)
            raise FileNotFoundError(f"{self.path}: {len(absent)} media file(s) missing:\n{listing}")
        skipped = {item_id for item_id, _ in absent}
        self.records = [r for r in records if r.get("id") not in skipped]
        self.missing = len(records) - len(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        media = [self._decode(self.media_root / m, "image" in record) for m in media_of(record)]
        key = "image" if "image" in record and "video" not in record else "video"
        return record | {key: media if isinstance(record.get(key), list) else media[0]}

    def _decode(self, path: Path, image: bool) -> Tensor:
        total = video_info(path).frames
        wanted = 1 if image else self.frames
        indices = np.linspace(0, max(total - 1, 0), wanted).round().astype(int)
        decoded = read_video(path, channels=3 if self.channels == 3 else 1)
        return frames_to_tensor(decoded[np.minimum(indices, len(decoded) - 1)])


class TemporalQADataModule(TimeloomDataModule):
    """`TemporalQA` splits; a batch is ``batch_size`` conflict groups (twice as many conversations).

    Batches stay lists of items: the model's module tokenises them (`VideoLLMModule`). See `TemporalQA` for
    the data arguments; ``train_length`` etc. count conflict groups.
    """

    def __init__(
        self,
        size: int = 32,
        frames: int = 8,
        glyph_size: int = 10,
        aspects: tuple[str, ...] = ASPECTS,
        formats: tuple[str, ...] = FORMATS,
        max_options: int = 4,
        task: str = "qa",
        caption_share: float = 0.0,
        describe_first: float = 0.0,
        letter_last: bool = False,
        control: str = "none",
        channels: int = 1,
        train_length: int = 10_000,
        val_length: int = 128,
        test_length: int = 256,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        self.save_hyperparameters()
        self.lengths = {"train": train_length, "val": val_length, "test": test_length}
        self.dataset_args = dict(
            size=size,
            frames=frames,
            glyph_size=glyph_size,
            aspects=aspects,
            formats=formats,
            max_options=max_options,
            task=task,
            control=control,
            channels=channels,
        )
        # training levers: held-out splits ask single-turn questions with the default replies (the evaluate
        # command reads each answer's letter from its reference reply, `items_from_conversations`)
        self.train_levers = {
            "caption_share": caption_share,
            "describe_first": describe_first,
            "letter_last": letter_last,
        }
        TemporalQA(length=0, **self.train_levers, **self.dataset_args)  # fail now, not at a batch

    def build_dataset(self, split: str) -> TemporalQA:
        levers = self.train_levers if split == "train" else {}
        return TemporalQA(split, length=self.lengths[split], seed=self.seed, **levers, **self.dataset_args)
