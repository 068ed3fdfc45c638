"""`timeloom evaluate understanding` (spec §7): answering paths against full-logit references, batch invariance,
determinism, reports, the manifest check before compute, and the CLI."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from timeloom_understanding.benchmarks.base import EvalItem
from timeloom_understanding.data import CONTROLS, ConversationCollator
from timeloom_understanding.encoders import vit_options
from timeloom_understanding.evaluate import (
    continuation_logprobs,
    evaluate_items,
    generate_replies,
    load_module,
    rank_candidates,
    temporal_qa_items,
)
from timeloom_understanding.hf_backbone import LLMConfig
from timeloom_understanding.model import VideoLLMConfig
from timeloom_understanding.module import VideoLLMModule

from timeloom.cli import main as timeloom_main
from timeloom.video_io import write_video

ENCODER = vit_options()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny video-LLM saved as a `timeloom export` folder (untied head: varied greedy replies)."""
    torch.manual_seed(0)
    config = VideoLLMConfig(
        encoder=ENCODER,
        llm=LLMConfig(hidden_size=32, layers=2, heads=4, tie_embeddings=False),
        structure="tc_llava",
        max_length=256,
    )
    folder = tmp_path_factory.mktemp("videollm")
    VideoLLMModule(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def module(exported):
    return load_module(exported)


@pytest.fixture(scope="module")
def qa_items(exported, module):
    return temporal_qa_items(exported, module, None, "none", limit=12)


def test_temporal_qa_items_come_from_the_held_out_split(qa_items):
    assert len(qa_items) == 12 and all(i.id.startswith("temporal_qa/test/") for i in qa_items)
    assert {i.format for i in qa_items} <= {"multi_choice", "yes_no", "caption_matching"}
    for i in qa_items:
        assert i.answer in i.candidates and i.video.shape == (1, 8, 32, 32)


def test_continuation_logprobs_equal_a_full_logit_reference(module, qa_items):
    items, continuations = qa_items[:3], ["b. up", "yes", "the 3 moves left."]
    got = continuation_logprobs(module, items, [i.video for i in items], continuations)
    # reference: whole conversations ending in <|end|>, logits at every position, the continuation's tokens
    # are the ones just before <|end|>
    tokenizer, model = module.model.tokenizer, module.model
    conversations = [
        {
            "id": i.id,
            "video": i.video,
            "conversations": [
                {"from": "human", "value": f"<video>\n{i.prompt}"},
                {"from": "gpt", "value": c},
            ],
        }
        for i, c in zip(items, continuations)
    ]
    batch = ConversationCollator(tokenizer, model.visual_tokens_per_media(8, 32, 32), 256)(conversations)
    with torch.no_grad():
        logprobs = F.log_softmax(model.logits(batch).float(), dim=-1)
        _, layout, _ = model.build_inputs(batch)
    for b, (continuation, (total, greedy)) in enumerate(zip(continuations, got)):
        tokens = tokenizer.encode(continuation)
        end = int((~layout.pad[b]).sum()) - 1  # position of <|end|>
        positions = range(end - len(tokens), end)
        expected = sum(float(logprobs[b, p - 1, t]) for p, t in zip(positions, tokens))
        assert total == pytest.approx(expected, abs=1e-4)
        assert greedy == all(int(logprobs[b, p - 1].argmax()) == t for p, t in zip(positions, tokens))


def test_likelihood_ranking_is_the_best_candidate_token_at_the_reply_start(module, qa_items):
    items = qa_items[:6]
    chosen = rank_candidates(module, items, [i.video for i in items])
    tokenizer, model = module.model.tokenizer, module.model
    conversations = [
        {"id": i.id, "video": i.video, "conversations": [{"from": "human", "value": f"<video>\n{i.prompt}"}]}
        for i in items
    ]
    batch = ConversationCollator(
        tokenizer, model.visual_tokens_per_media(8, 32, 32), 256, for_generation=True
    )(conversations)
    with torch.no_grad():
        last = model.logits(batch, side="left")[:, -1]
    for b, item in enumerate(items):
        ids = [tokenizer.encode(c)[0] for c in item.candidates]  # every candidate is one token
        assert chosen[b] == item.candidates[int(last[b, ids].argmax())]


def test_pine_ranking_ignores_the_order_of_the_option_lines(module, qa_items):
    item = next(i for i in qa_items if len(i.options) == 3)
    question, *options, instruction = item.prompt.splitlines()
    swapped = dataclasses.replace(item, prompt="\n".join([question, *reversed(options), instruction]))

    def letter_scores(pine):
        return torch.tensor(
            [
                [
                    score
                    for score, _ in continuation_logprobs(
                        module, [it] * 3, [it.video] * 3, it.candidates, pine
                    )
                ]
                for it in (item, swapped)
            ]
        )

    plain, pine = letter_scores(False), letter_scores(True)
    torch.testing.assert_close(pine[0], pine[1], rtol=0, atol=1e-5)
    assert (plain[0] - plain[1]).abs().max() > 10 * (pine[0] - pine[1]).abs().max()


def test_greedy_evaluation_is_batch_invariant_and_deterministic(module, qa_items):
    one, scored_one, _ = evaluate_items(module, qa_items, 8, batch_size=1, max_new_tokens=4, progress=False)
    four, scored_four, _ = evaluate_items(module, qa_items, 8, batch_size=5, max_new_tokens=4, progress=False)
    assert one == four and [s.correct for s in scored_one] == [s.correct for s in scored_four]
    assert any(one), "the random model should write something"


def read_report(folder):
    report = json.loads((folder / "report.json").read_text())
    predictions = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return report, predictions


def test_cli_temporal_qa_writes_json_markdown_and_predictions(exported, tmp_path, capsys):
    out = tmp_path / "qa"
    args = ["evaluate", "understanding", "--checkpoint", str(exported), "--benchmark", "temporal_qa"]
    timeloom_main([*args, "--limit", "8", "--out", str(out), "--method", "pine"])
    report, predictions = read_report(out)
    assert report["n"] == 8 and report["n_unscored_judge"] == 0 and report["n_unparsed"] == 0
    assert 0 <= report["overall"] <= 1 and 0.25 <= report["chance"] <= 0.5
    assert set(report["by"]) == {"task", "format", "reversed"}
    assert report["meta"]["frames"] == 8 and report["meta"]["prompt_version"] == "temporal-qa-1"
    assert [p["id"] for p in predictions][:2] == ["temporal_qa/test/000000/0", "temporal_qa/test/000000/1"]
    assert set(predictions[0]) == {"id", "prompt_hash", "output", "parsed", "answer", "correct"}
    assert (out / "report.md").read_text().startswith("# temporal_qa:")
    assert "overall" in capsys.readouterr().out
    # the single-frame control asks the same questions with one frame
    control = tmp_path / "middle"
    timeloom_main([*args, "--limit", "8", "--out", str(control), "--control", "middle_frame"])
    assert read_report(control)[0]["meta"]["frames"] == 1
    assert [p["id"] for p in read_report(control)[1]] == [p["id"] for p in predictions]
    # --controls reports both controls beside the full video, scored as the control run alone is
    both = tmp_path / "controls"
    timeloom_main([*args, "--limit", "8", "--out", str(both), "--controls"])
    controls = read_report(both)[0]["controls"]
    assert set(controls) == set(CONTROLS) - {"none"}
    assert controls["middle_frame"]["overall"] == read_report(control)[0]["overall"]
    assert "| middle_frame |" in (both / "report.md").read_text()


def fake_mvbench(root, videos=("a.mp4", "b.mp4")):
    rows = [
        {"video": name, "question": "Which way?", "candidates": ["up", "down", "left"], "answer": "down"}
        for name in ("a.mp4", "b.mp4", "c.mp4")
    ]
    (root / "json").mkdir(parents=True)
    (root / "json/moving_direction.json").write_text(json.dumps(rows))
    for name in videos:
        write_video(root / "video/clevrer/video_validation" / name, torch.rand(3, 10, 20, 24) * 2 - 1, fps=5)
    return root


def test_cli_lists_missing_videos_before_any_compute(exported, tmp_path):
    root, out = fake_mvbench(tmp_path / "mvbench"), tmp_path / "out"
    args = [
        "evaluate",
        "understanding",
        "--checkpoint",
        str(exported),
        "--benchmark",
        "mvbench",
        "--root",
        str(root),
    ]
    with pytest.raises(
        SystemExit, match=r"1 of 3 videos are missing .*\n  mvbench/moving_direction/2: .*c\.mp4"
    ):
        timeloom_main([*args, "--out", str(out)])
    assert not out.exists()
    timeloom_main([*args, "--out", str(out), "--allow-missing", "--frames", "4"])
    report, predictions = read_report(out)
    assert (report["n"], report["n_missing"], report["meta"]["frames"]) == (2, 1, 4)
    assert report["by"]["task"]["moving_direction"]["n"] == 2 and len(predictions) == 2


def test_cli_needs_a_root_and_an_existing_checkpoint(exported, tmp_path):
    with pytest.raises(SystemExit, match="--root DIR"):
        timeloom_main(["evaluate", "understanding", "--checkpoint", str(exported), "--benchmark", "tomato"])
    with pytest.raises(SystemExit, match="checkpoint .*nowhere does not exist"):
        timeloom_main(
            [
                "evaluate",
                "understanding",
                "--checkpoint",
                str(tmp_path / "nowhere"),
                "--benchmark",
                "temporal_qa",
            ]
        )


def test_an_undecodable_video_is_counted_and_the_rest_still_run(module, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    good = tmp_path / "good.mp4"
    write_video(good, torch.rand(1, 6, 32, 32) * 2 - 1, fps=5)
    items = [
        EvalItem(
            id=name,
            benchmark="tomato",
            task="t",
            video=path,
            question="q",
            options=["x", "y"],
            answer="A",
            prompt="Which?\n(A) x\n(B) y",
        )
        for name, path in (("good", good), ("broken", broken))
    ]
    responses, scored, unreadable = evaluate_items(module, items, 4, progress=False)
    assert responses[0] is not None and scored[0] is not None
    assert responses[1] is None and [u[0] for u in unreadable] == ["broken"]


def test_time_tokens_become_seconds_of_the_shown_video(exported, qa_items):
    module = load_module(exported)
    head = module.model.llm.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight.data.copy_(head.weight.data)
    biased.bias.data.zero_()
    biased.bias.data[module.model.tokenizer.id("<t99>")] = (
        1e4  # a model that always answers with the last time token
    )
    module.model.llm.lm_head = biased
    item = qa_items[0]
    timed, raw = (generate_replies(module, [item], [item.video], 1, durations) for durations in ([4.0], None))
    assert timed == ["4.0s"] and raw == ["<t99>"]  # raw where the duration is unknown, never dropped
