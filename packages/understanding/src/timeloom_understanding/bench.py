"""`timeloom bench understanding`: video-LLM prefill and decode latency against the frame count, and streaming.

Part 1, for the MLP and the Video-CCAM projector at each frame count (8 → 64 in the full preset), on one
temporal-QA prompt:

- **prefill**: encode the video, splice it into the prompt, run the whole prompt into a fresh key/value
  cache (what a reply costs before its first token);
- **decode**: per generated token with the cache (`VideoLLM.cached_decoder`), the mean over a run of tokens;
- **recompute**: per generated token without a cache, one forward over the whole sequence (what `generate`
  paid per token before the cache; the video is encoded once either way).

The MLP projector gives 16 tokens per frame (2×2 pooling of an 8×8 grid), so its sequence grows with the
frame count; CCAM always gives its Q = 64 queries.

Part 2, streaming (`OnlineStream`, MLP projector, TC-LLaVA structure): a video arrives frame by frame and a
question is asked every few frames, answered in 1 token (a multiple-choice letter) or several. The cached stream keeps the video prefix in the cache and reuses it for
every question; the rebuild runs each question from scratch on the video so far (the offline cut protocol,
reusing only the per-frame encoder features). Both give the same replies (tested); the bench times them.

The model is the tiny configuration's (`configs/understanding/videollm-tiny.yaml`: ViT width 64, Llama
hidden 128, 3 layers) with random weights. Outputs `understanding.json` and `understanding.md` under
``--out``. Timing reuses the kernels suite (warm-up, then the inter-quartile mean); compare numbers from one
run only, and mind the machine's load.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from timeloom_kernels.bench import measure, parse_suite_arguments, synchronize, write_report
from tqdm.auto import tqdm

from timeloom_understanding.data import ConversationCollator, TemporalQA
from timeloom_understanding.hf_backbone import LLMConfig, crop_cache, new_cache
from timeloom_understanding.model import VideoLLM, VideoLLMConfig
from timeloom_understanding.streaming import OnlineStream

__all__ = ["main"]

SIZE = 32


@dataclass(frozen=True)
class UnderstandingPreset:
    frame_counts: tuple[int, ...]
    decode_tokens: int  # tokens per decode measurement
    stream_frames: int
    ask_every: int  # frames between questions
    answer_tokens: tuple[int, ...]  # one streaming run per answer length (1: a multiple-choice letter)
    warmup_s: float = 0.2
    budget_s: float = 2.0
    min_runs: int = 3
    max_runs: int = 10
    max_call_s: float = 10.0


_FULL = UnderstandingPreset(
    frame_counts=(8, 16, 32, 64), decode_tokens=16, stream_frames=64, ask_every=8, answer_tokens=(1, 8)
)
CPU_PRESETS = {
    "full": _FULL,
    "quick": UnderstandingPreset(
        frame_counts=(8, 16, 32),
        decode_tokens=8,
        stream_frames=32,
        ask_every=8,
        answer_tokens=(1, 4),
        budget_s=0.5,
    ),
    "tiny": UnderstandingPreset(
        frame_counts=(2, 4),
        decode_tokens=2,
        stream_frames=4,
        ask_every=2,
        answer_tokens=(1, 2),
        warmup_s=0.0,
        budget_s=0.0,
        min_runs=1,
        max_runs=1,
    ),
}
CUDA_PRESETS = CPU_PRESETS


def bench_model(projector: str, structure: str, device: torch.device, dtype: torch.dtype) -> VideoLLM:
    """The tiny configuration's model (random weights) with 16 MLP tokens per frame or 64 CCAM queries."""
    torch.manual_seed(0)
    options = {"pool": 2} if projector == "mlp" else {"num_queries": 64, "width": 128}
    config = VideoLLMConfig(
        encoder={
            "model_name": "vit_tiny_patch16_224",
            "img_size": SIZE,
            "patch_size": 4,
            "embed_dim": 64,
            "depth": 2,
            "num_heads": 4,
            "in_chans": 1,
            "class_token": False,
        },
        projector=projector,
        projector_options=options,
        llm=LLMConfig(hidden_size=128, layers=3, heads=4, intermediate_size=256, max_positions=4096),
        structure=structure,
        max_length=4096,
        tokenizer_path="temporal_qa",  # the tiny configs' vocabulary
    )
    return VideoLLM(config).to(device=device, dtype=dtype).eval()


def clip(frames: int, seed: int) -> dict[str, Any]:
    """A temporal-QA item whose video has ``frames`` frames (the generator makes at least 5)."""
    item = TemporalQA(length=1, frames=max(frames, 5), size=SIZE, seed=seed)[0][0]
    return dict(item, video=item["video"][:, :frames], conversations=item["conversations"][:1])


def prompt(model: VideoLLM, frames: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    item = clip(frames, seed=3)
    tokens = model.visual_tokens_per_media(frames, SIZE, SIZE)
    batch = ConversationCollator(model.tokenizer, tokens, model.config.max_length, for_generation=True)(
        [item]
    )
    return {
        key: value.to(device=device, dtype=dtype if value.is_floating_point() else None)
        if torch.is_tensor(value)
        else value
        for key, value in batch.items()
    }


def prefill(model: VideoLLM, batch: dict[str, Any]):
    """Encode, splice and run the prompt into a fresh cache; the first token's logits and the state."""
    encoded = dict(batch, media_tokens=model.encode_media(batch["video"]))
    embeds, layout, _ = model.build_inputs(encoded, side="left")
    cache = new_cache(model.llm)
    hidden, positions = model.extend(embeds, layout, cache)
    return model.llm.lm_head(hidden[:, -1]), cache, positions, layout


def decode(model: VideoLLM, state, prompt_tokens: int, tokens: int) -> None:
    """Roll the cache back to the prompt, then decode ``tokens`` tokens with it."""
    first, cache, positions, layout = state
    crop_cache(cache, prompt_tokens)
    advance, next_ids = model.cached_decoder(cache, positions[:, -1], ~layout.pad), first.argmax(-1).cpu()
    for _ in range(tokens):
        next_ids = model.llm.lm_head(advance(next_ids)).argmax(-1).cpu()


@torch.no_grad()
def latency_cells(preset: UnderstandingPreset, device, dtype, progress) -> list[dict[str, Any]]:
    cells = []
    for projector in ("mlp", "ccam"):
        model = bench_model(projector, "causal", device, dtype)
        for frames in preset.frame_counts:
            batch = prompt(model, frames, device, dtype)
            _, prefill_ms = measure(partial(prefill, model, batch), device, preset)
            state = prefill(model, batch)
            prompt_tokens = state[1].get_seq_length()
            _, decode_ms = measure(
                partial(decode, model, state, prompt_tokens, preset.decode_tokens), device, preset
            )
            encoded = dict(batch, media_tokens=model.encode_media(batch["video"]))
            _, recompute_ms = measure(partial(model.hidden_states, encoded, side="left"), device, preset)
            cells.append(
                {
                    "projector": projector,
                    "frames": frames,
                    "visual_tokens": model.visual_tokens_per_media(frames, SIZE, SIZE),
                    "prompt_tokens": prompt_tokens,
                    "prefill_ms": prefill_ms,
                    "decode_ms_per_token": decode_ms / preset.decode_tokens,
                    "recompute_ms_per_token": recompute_ms,
                }
            )
            progress.update()
    return cells


@torch.no_grad()
def streaming_cells(preset: UnderstandingPreset, device, dtype, progress) -> list[dict[str, Any]]:
    """One stream per answer length: the cached stream against the rebuild, runs alternated."""
    model = bench_model("mlp", "tc_llava", device, dtype)
    video = clip(preset.stream_frames, seed=4)["video"].to(device=device, dtype=dtype)
    question = "Which way does the digit move? (A) left (B) right (C) up (D) down"
    questions = -(-preset.stream_frames // preset.ask_every)

    def run(reuse_cache: bool, answer_tokens: int) -> tuple[float, list[list[int]]]:
        stream = OnlineStream(model, fps=8.0, max_frames=preset.stream_frames, reuse_cache=reuse_cache)
        replies, start = [], time.perf_counter()
        for first in range(0, preset.stream_frames, preset.ask_every):
            stream.push(video[:, first : first + preset.ask_every])
            replies.append(stream.ask(question, max_new_tokens=answer_tokens))
        synchronize(device)
        return time.perf_counter() - start, replies

    cells = []
    for answer_tokens in preset.answer_tokens:
        run(True, answer_tokens), run(False, answer_tokens)  # warm-up
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(preset.min_runs):  # alternate, so the machine's load hits both alike
            (cached_s, cached), (rebuild_s, rebuilt) = run(True, answer_tokens), run(False, answer_tokens)
            if cached != rebuilt:
                raise RuntimeError(
                    "the cached stream and the rebuild disagree; the bench would compare unequal work"
                )
            times[True].append(cached_s)
            times[False].append(rebuild_s)
        cached_s, rebuild_s = min(times[True]), min(times[False])
        cells.append(
            {
                "frames": preset.stream_frames,
                "questions": questions,
                "answer_tokens": answer_tokens,
                "cached_s": cached_s,
                "rebuild_s": rebuild_s,
                "cached_ms_per_question": cached_s / questions * 1e3,
                "rebuild_ms_per_question": rebuild_s / questions * 1e3,
                "speedup": rebuild_s / cached_s,
            }
        )
        progress.update()
    return cells


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# `timeloom bench understanding`",
        "",
        f"Environment: `{json.dumps(result['environment'])}`; wall {result['wall_s']:.0f} s.",
        "",
        "## Prefill and per-token decode latency (batch 1)",
        "",
        "| projector | frames | visual tokens | prompt tokens | prefill ms | decode ms/token (cache) "
        "| recompute ms/token (no cache) | cache speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in result["latency"]:
        lines.append(
            f"| {cell['projector']} | {cell['frames']} | {cell['visual_tokens']} | {cell['prompt_tokens']} "
            f"| {cell['prefill_ms']:.1f} | {cell['decode_ms_per_token']:.2f} | {cell['recompute_ms_per_token']:.1f} "
            f"| {cell['recompute_ms_per_token'] / cell['decode_ms_per_token']:.1f}x |"
        )
    lines += [
        "",
        "## Streaming: the video prefix's cache reused across questions (MLP, TC-LLaVA)",
        "",
        f"{result['preset']['stream_frames']} frames pushed in steps of {result['preset']['ask_every']}, a "
        "question after each step; the cached stream keeps the video in the cache, the rebuild reruns each "
        "question on the video so far. Both give the same replies (checked in every run); best of the "
        "alternated runs.",
        "",
        "| answer tokens | questions | cached s | rebuild s | cached ms/question | rebuild ms/question | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in result["streaming"]:
        lines.append(
            f"| {cell['answer_tokens']} | {cell['questions']} | {cell['cached_s']:.2f} | {cell['rebuild_s']:.2f} "
            f"| {cell['cached_ms_per_question']:.1f} | {cell['rebuild_ms_per_question']:.1f} "
            f"| **{cell['speedup']:.2f}x** |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`timeloom bench understanding [--out DIR] [--quick | --tiny] [--device cpu|cuda]`."""
    run = parse_suite_arguments(
        "understanding",
        __doc__.split("\n")[0],
        argv,
        CPU_PRESETS,
        CUDA_PRESETS,
        quick_help="frames 8-32, shorter timing (a few minutes on 2 CPU cores)",
        tiny_help="smoke test of the harness (seconds)",
    )
    preset, started = run.preset, time.perf_counter()
    cells = 2 * len(preset.frame_counts) + len(preset.answer_tokens)
    with tqdm(total=cells, desc="bench understanding") as progress:
        latency = latency_cells(preset, run.device, run.dtype, progress)
        streaming = streaming_cells(preset, run.device, run.dtype, progress)
    result = {
        "environment": run.environment,
        "preset": preset.__dict__,
        "latency": latency,
        "streaming": streaming,
        "wall_s": time.perf_counter() - started,
    }
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "understanding.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(run.out / "understanding.md", markdown(result))
    print(f"wrote {run.out / 'understanding.json'} and {run.out / 'understanding.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
