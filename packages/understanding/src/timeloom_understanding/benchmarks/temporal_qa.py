"""The built-in temporal QA (`TemporalQA` over MovingDigits) as evaluation items.

The prompt is the human turn the generator wrote and the answer the deciding word of its reply: the option
letter (multiple choice, caption matching) or ``yes``/``no``. Videos are already decoded tensors.
"""

from __future__ import annotations

from typing import Any

from timeloom_understanding.benchmarks.base import EvalItem, listed_options
from timeloom_understanding.text import MEDIA_PLACEHOLDERS

__all__ = ["PROMPT_VERSION", "items_from_conversations"]

PROMPT_VERSION = "temporal-qa-1"


def items_from_conversations(conversations: list[dict[str, Any]]) -> list[EvalItem]:
    """`TemporalQA` items (conflict groups flattened) → `EvalItem`s."""
    items = []
    for record in conversations:
        prompt = record["conversations"][0]["value"]
        for placeholder in MEDIA_PLACEHOLDERS:
            prompt = prompt.replace(placeholder, "")
        prompt = prompt.strip()
        reply = record["conversations"][1]["value"]
        fmt = record["format"]
        listed = listed_options(prompt) if fmt != "yes_no" else []
        items.append(
            EvalItem(
                id=record["id"],
                benchmark="temporal_qa",
                task=record["aspect"],
                video=record["video"],
                question=prompt.splitlines()[0],
                options=[text for _, text in listed],
                answer=reply if fmt == "yes_no" else listed_options(reply)[0][0],
                prompt=prompt,
                format=fmt,
                extra={
                    "aspect": record["aspect"],
                    "reversed": bool(record["reversed"]),
                    "group": record["group"],
                },
            )
        )
    return items
