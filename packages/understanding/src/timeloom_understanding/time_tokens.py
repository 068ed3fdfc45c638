"""LITA's relative time tokens (spec §3.5; NVlabs/LITA, arXiv 2403.19046).

``K`` tokens ``<t0> … <t{K−1}>`` split a video of duration ``d`` seconds evenly: a time ``t`` is token
``round((K−1)·t/d)`` and token ``k`` is ``k·d/(K−1)`` seconds, so a round trip is off by at most
``d / (2(K−1))``. The tokens are whole entries of the vocabulary (`text.TIME_TOKENS`, K = 100).

Answers never come back as raw ``<t17>`` (LITA issue #9): `render` turns every time token into seconds
(``12.3s``) and lists them in ``timestamps``. Dense captions are ``<ts> <te> caption.`` (`event`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from timeloom_understanding.text import TIME_TOKENS

__all__ = ["NUM_TIME_TOKENS", "TimedAnswer", "event", "render", "time_of_token", "time_token"]

NUM_TIME_TOKENS = len(TIME_TOKENS)
_TIME_TOKEN = re.compile(r"<t(\d+)>")


def _check(duration: float, count: int) -> None:
    if duration <= 0:
        raise ValueError(f"a video's duration must be positive; got {duration} s")
    if not 2 <= count <= NUM_TIME_TOKENS:
        raise ValueError(f"time tokens: between 2 and {NUM_TIME_TOKENS} (the vocabulary's); got {count}")


def time_token(t: float, duration: float, count: int = NUM_TIME_TOKENS) -> str:
    """The time token of ``t`` seconds in a video of ``duration`` seconds (times outside are clipped)."""
    _check(duration, count)
    index = round((count - 1) * min(max(t, 0.0), duration) / duration)
    return f"<t{index}>"


def time_of_token(token: str, duration: float, count: int = NUM_TIME_TOKENS) -> float:
    """Seconds of a time token ``<tk>``: ``k·d/(K−1)``, clipped to ``[0, d]``."""
    _check(duration, count)
    match = _TIME_TOKEN.fullmatch(token.strip())
    if match is None:
        raise ValueError(f"{token!r} is not a time token <tk>")
    index = int(match.group(1))
    if index >= count:
        raise ValueError(f"{token!r}: only {count} time tokens <t0> … <t{count - 1}>")
    return min(max(index * duration / (count - 1), 0.0), duration)


def event(start: float, end: float, caption: str, duration: float, count: int = NUM_TIME_TOKENS) -> str:
    """A dense-caption line ``<ts> <te> caption.``."""
    if end < start:
        raise ValueError(f"an event ends ({end} s) before it starts ({start} s): {caption!r}")
    return f"{time_token(start, duration, count)} {time_token(end, duration, count)} {caption}"


@dataclass(frozen=True)
class TimedAnswer:
    """A reply three ways: ``raw`` as decoded (time tokens included), ``text`` with seconds rendered
    (``12.3s``), and the ``timestamps`` in seconds, in order of appearance."""

    raw: str
    text: str
    timestamps: list[float]


def render(raw: str, duration: float, count: int = NUM_TIME_TOKENS, decimals: int = 1) -> TimedAnswer:
    """Replace every time token in ``raw`` by its seconds; ``duration`` is the video's length in seconds."""
    timestamps: list[float] = []

    def seconds(match: re.Match) -> str:
        timestamps.append(time_of_token(match.group(0), duration, count))
        return f"{timestamps[-1]:.{decimals}f}s"

    return TimedAnswer(raw, _TIME_TOKEN.sub(seconds, raw), timestamps)
