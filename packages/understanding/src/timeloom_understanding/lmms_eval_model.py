"""An lmms-eval "simple model" over a timeloom video-LLM (spec §7), registered as ``timeloom``.

    lmms-eval --model timeloom --model_args pretrained=EXPORT_DIR,max_frames_num=16 --tasks mvbench

lmms-eval hands the model `Instance`s whose ``args`` are ``(context, gen_kwargs, doc_to_visual, doc_id,
task, split)`` for `generate_until` and ``(context, doc_to_target, doc_to_visual, doc_id, task, split)`` for
`loglikelihood`; the document is ``self.task_dict[task][split][doc_id]``. Visuals are video paths (decoded
with our sampler, ``linspace``) or images (one-frame videos).

lmms-eval is not a dependency: installing it pulls about 70 packages (datasets, pyarrow, OpenCV, the
OpenAI client, …). Without it this class still works on anything shaped like its requests (the tests use
fake ones); with it, it subclasses ``lmms_eval.api.model.lmms`` and registers under the name ``timeloom``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor
from tqdm import tqdm

from timeloom.video_io import convert_channels, frames_to_tensor, resize_video
from timeloom_understanding.benchmarks.base import EvalItem, load_clip
from timeloom_understanding.evaluate import (
    continuation_logprobs,
    generate_replies,
    load_module,
    media_settings,
)
from timeloom_understanding.layouts import make_structure
from timeloom_understanding.text import MEDIA_PLACEHOLDERS

try:  # the adapter registers itself where lmms-eval is installed
    from lmms_eval.api.model import lmms as _Base
    from lmms_eval.api.registry import register_model
except ImportError:
    _Base, register_model = object, None

__all__ = ["LMMS_EVAL_AVAILABLE", "TimeloomVideoLLM"]

LMMS_EVAL_AVAILABLE = register_model is not None


class TimeloomVideoLLM(_Base):
    """lmms-eval's model interface over `VideoLLMModule`.

    Args:
        pretrained: a `timeloom export` folder or a `timeloom fit` checkpoint.
        max_frames_num: frames sampled from each video.
        batch_size: requests per forward pass.
        device: where the model runs.
        structure: another attention structure to run the model under (``tc_llava``, …); None keeps its own.
        max_batch_size: passed by lmms-eval, unused.
    """

    def __init__(
        self,
        pretrained: str,
        max_frames_num: int = 16,
        batch_size: int | str = 1,
        device: str = "cpu",
        structure: str | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.module = load_module(pretrained, device)
        if structure is not None:  # structures are pure functions of the layout: no weights change
            self.module.model.structure = make_structure(structure)
        self.frames = int(max_frames_num)
        self.batch_size_per_gpu = int(batch_size)
        self.media = media_settings(self.module)
        self.task_dict: dict = getattr(self, "task_dict", None) or {}

    # -- visuals -------------------------------------------------------------------------------------------
    def _video(self, visuals: Any) -> Tensor | None:
        """The single visual of a request as a ``(C, T, H, W)`` tensor (None when there is none)."""
        visuals = [v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals]) if v is not None]
        if not visuals:
            return None
        if len(visuals) > 1:
            raise ValueError(f"one visual per request is supported; got {len(visuals)}")
        visual = visuals[0]
        height, width, channels = self.media["height"], self.media["width"], self.media["channels"]
        if isinstance(visual, (str, Path)):
            return load_clip(Path(visual), self.frames, height, width, channels)
        frames = np.asarray(visual.convert("RGB"))[None]  # a PIL image: a one-frame video
        return resize_video(frames_to_tensor(convert_channels(frames, channels)[0]), height, width)[0]

    def _unpack(self, request: Any) -> tuple[str, Any, Tensor | None, str, Any]:
        context, second, doc_to_visual, doc_id, task, split = request.args
        document = self.task_dict[task][split][doc_id]
        return context, second, self._video(doc_to_visual(document)), f"{task}/{split}/{doc_id}", document

    @staticmethod
    def _item(name: str, context: str, video: Tensor | None) -> EvalItem:
        """The request as an item; placeholders a task wrote into its context go (ours leads the turn)."""
        for placeholder in MEDIA_PLACEHOLDERS:
            context = context.replace(placeholder, "")
        return EvalItem(
            id=name,
            benchmark="lmms_eval",
            task="lmms_eval",
            video=video,
            question=context,
            options=[],
            answer="",
            prompt=context,
            format="captioning",
        )

    # -- lmms-eval's interface --------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any]) -> list[str]:
        """Greedy replies, cut at the first ``until`` string, at most ``max_new_tokens`` tokens each."""
        prepared = []
        for request in requests:
            context, gen_kwargs, video, name, _ = self._unpack(request)
            if float(gen_kwargs.get("temperature", 0) or 0) > 0:
                raise ValueError(
                    f"request {name}: temperature > 0 asked for; only greedy decoding is supported"
                )
            until = gen_kwargs.get("until") or []
            budget = int(gen_kwargs.get("max_new_tokens", 16))
            prepared.append(
                (
                    self._item(name, context, video),
                    video,
                    [until] if isinstance(until, str) else until,
                    budget,
                )
            )
        replies: list[str] = [""] * len(requests)
        # requests with the same token budget share a batch, so each gets exactly the budget it asked for
        order = sorted(range(len(prepared)), key=lambda k: prepared[k][3])
        for start in tqdm(
            range(0, len(order), self.batch_size_per_gpu), desc="timeloom generate", unit="batch"
        ):
            chunk = order[start : start + self.batch_size_per_gpu]
            for budget in sorted({prepared[k][3] for k in chunk}):
                same = [k for k in chunk if prepared[k][3] == budget]
                texts = generate_replies(
                    self.module, [prepared[k][0] for k in same], [prepared[k][1] for k in same], budget
                )
                for k, text in zip(same, texts):
                    for stop in prepared[k][2]:
                        text = text.split(stop)[0] if stop else text
                    replies[k] = text
        return replies

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """``(Σ log p(continuation | context), whether greedy decoding writes the continuation)``."""
        results = []
        for start in tqdm(
            range(0, len(requests), self.batch_size_per_gpu), desc="timeloom loglikelihood", unit="batch"
        ):
            items, videos, continuations = [], [], []
            for request in requests[start : start + self.batch_size_per_gpu]:
                context, target, video, name, document = self._unpack(request)
                continuations.append(target(document) if callable(target) else str(target))
                items.append(self._item(name, context, video))
                videos.append(video)
            results.extend(continuation_logprobs(self.module, items, videos, continuations))
        return results

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("multi-round generation is not supported by the timeloom adapter")


if LMMS_EVAL_AVAILABLE:
    register_model("timeloom")(TimeloomVideoLLM)
