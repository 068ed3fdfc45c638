"""`timeloom ask`: one question about one video to a trained video-LLM.

    timeloom ask --checkpoint CKPT_OR_EXPORT --video FILE --question "Which way does the 4 move?"
        [--frames N] [--max-new-tokens N]

The video is decoded with PyAV, sampled as the model was trained (evenly spaced frames, ``linspace``, as
many as it was trained on unless ``--frames`` says otherwise), resized to its frame size and converted to
its channels; the greedy answer is printed, LITA time tokens as seconds of the video. A missing or undecodable video, or a question that does not fit
in the context, is a one-line error naming it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from timeloom_understanding.benchmarks.base import EvalItem, load_clip, shown_duration
from timeloom_understanding.evaluate import generate_replies, load_module, media_settings

__all__ = ["ask", "ask_main"]


def ask(
    checkpoint: str | Path,
    video: str | Path,
    question: str,
    frames: int | None = None,
    max_new_tokens: int = 32,
) -> str:
    """The model's greedy answer to ``question`` about ``video``.

    Raises:
        FileNotFoundError: the checkpoint or the video does not exist.
        ValueError: the video cannot be decoded, or the question does not fit in the context (naming it).
    """
    if not question.strip():
        raise ValueError("the question is empty")
    module = load_module(checkpoint)
    media = media_settings(module)
    clip = load_clip(
        Path(video), frames or media["frames"], media["height"], media["width"], media["channels"]
    )
    item = EvalItem(
        id=str(video),
        benchmark="ask",
        task="ask",
        video=clip,
        question=question,
        options=[],
        answer="",
        prompt=question,
        format="captioning",
    )
    return generate_replies(module, [item], [clip], max_new_tokens, [shown_duration(Path(video))])[0]


def ask_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="timeloom ask", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkpoint", required=True, help="a timeloom fit checkpoint or a timeloom export folder"
    )
    parser.add_argument("--video", required=True, help="the video file")
    parser.add_argument("--question", required=True)
    parser.add_argument("--frames", type=int, help="frames to show (default: as the model was trained)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(list(argv))
    try:
        print(ask(args.checkpoint, args.video, args.question, args.frames, args.max_new_tokens))
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"ask: {error}") from error
