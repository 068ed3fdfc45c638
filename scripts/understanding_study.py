"""Understanding study (issue #6): score trained tiny video-LLMs on held-out built-in temporal QA, side by side.

Each run is a `timeloom fit` checkpoint of a `VideoLLMModule`. A reply is right when its deciding first token
(option letter or yes/no) is the greedy choice, as in the module's ``val/accuracy``; on top of the module's
per-aspect numbers this reports reversed-playback twins, per-format accuracy, *both twins of a conflict group
right* (a frame-order-blind model cannot do better than chance there) and each row's chance level (1 / number
of options, averaged over the items). The test split's glyphs are disjoint from training's.
``@protocol=describe`` asks each question in a second turn, after the model's own greedy answer to "Describe
the video." (the describe-then-answer protocol that `TemporalQA(describe_first=...)` trains); the deciding
token is then the first of the last reply. ``@control=text`` scores a text stage: the fact written where the
video stood (`TemporalQA(control="text")`).

``binding-probe`` asks whether the tiny LM can learn the answer format at all: text only, the caption (the
temporal fact) written before the question, so only matching it to an option letter or yes/no is left.

    python scripts/understanding_study.py binding-probe --steps 500

    python scripts/understanding_study.py score NAME=CKPT[@frames=32][@time_steps=8][@control=random_frame|text] \
        [@protocol=describe] ... \
        --groups 256 --out benchmarks/understanding-quality.json
    python scripts/understanding_study.py figure benchmarks/understanding-quality.json \
        --out docs/understanding-accuracy.png
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from timeloom_understanding.data import (
    ASPECTS,
    DESCRIBE,
    DIRECTIONS,
    ConversationCollator,
    TemporalQA,
    flatten_groups,
)
from timeloom_understanding.module import VideoLLMModule
from tqdm import tqdm

CAPTION_ANSWERS = {"direction": 4, "speed": 10, "order": 10, "count": 3, "when": 3}  # possible answers


def first_token_correct(module: VideoLLMModule, items: list[dict]) -> torch.Tensor:
    """Per item: is the deciding token, the first of the last reply (option letter or yes/no), the greedy
    choice? Each reply is supervised with its ``<|end|>``, so the last one is that many tokens from the end."""
    batch = module.collate(items)
    logits, targets, samples = module.model.supervised_logits(batch)
    per_item = torch.bincount(samples, minlength=len(items))
    last_reply = torch.tensor(
        [len(module.model.tokenizer.encode(item["conversations"][-1]["value"])) + 1 for item in items]
    )
    if (per_item < last_reply).any():
        raise ValueError("an item has no supervised answer token")
    deciding = per_item.cumsum(0) - last_reply
    return logits[deciding].argmax(-1) == targets[deciding]


def describe_first(module: VideoLLMModule, items: list[dict], max_new_tokens: int = 24) -> list[dict]:
    """The items asked in two turns: "Describe the video.", the model's own greedy description, then the
    question with its reference reply (the describe-then-answer protocol)."""
    tokenizer = module.model.tokenizer
    prompts = [
        {
            "id": item["id"],
            "video": item["video"],
            "conversations": [{"from": "human", "value": f"<video>\n{DESCRIBE}"}],
        }
        for item in items
    ]
    collate = ConversationCollator(
        tokenizer, module.collate.visual_tokens_per_media, module.collate.max_length, for_generation=True
    )
    replies = module.model.generate(collate(prompts), max_new_tokens)
    described = []
    for item, reply in zip(items, replies):
        description = tokenizer.decode([i for i in reply if i != tokenizer.eos_id], skip_special_tokens=True)
        question, answer = item["conversations"]
        described.append(
            item
            | {
                "described_as": description,
                "conversations": [
                    prompts[0]["conversations"][0],
                    {"from": "gpt", "value": description},
                    {"from": "human", "value": question["value"].removeprefix("<video>\n")},
                    answer,
                ],
            }
        )
    return described


def caption_answer_correct(module: VideoLLMModule, items: list[dict]) -> list[bool]:
    """Per caption item: are the answer's tokens inside the caption all the greedy choice (teacher forced)?

    The answer is the caption's temporal fact ("right", "twice", "in the middle", the first digit), found as
    the first run of its tokens in the reply; chance is about 1 / number of possible answers.
    """
    batch = module.collate(items)
    logits, targets, samples = module.model.supervised_logits(batch)
    right = logits.argmax(-1) == targets
    results = []
    for index, item in enumerate(items):
        reply, hit = targets[samples == index].tolist(), right[samples == index]
        answer = module.model.tokenizer.encode(item["answer"])
        start = next(k for k in range(len(reply)) if reply[k : k + len(answer)] == answer)
        results.append(bool(hit[start : start + len(answer)].all()))
    return results


def score_run(
    checkpoint: str,
    frames: int | None,
    control: str,
    protocol: str,
    groups: int,
    batch_groups: int,
    time_steps: int | None = None,
) -> dict:
    """Accuracy table of one checkpoint on the test split (optionally at another frame count or control, or
    in the describe-then-answer protocol; ``time_steps`` sets the TC-LLaVA structure's time steps)."""
    overrides = {"frames": frames} if frames else {}
    if time_steps:
        config = torch.load(checkpoint, map_location="cpu", weights_only=True)["hyper_parameters"]["config"]
        options = config["structure_options"] | {"time_steps": time_steps}
        overrides["config"] = config | {"structure_options": options}
    module = VideoLLMModule.from_checkpoint(checkpoint, **overrides).eval()
    hp = module.hparams
    channels = module.model.config.encoder.get("in_chans", 1)
    dataset = TemporalQA(
        "test",
        length=groups,
        size=hp["height"],
        frames=hp["frames"],
        control=control,
        channels=channels,
    )
    tallies: dict[str, list[float]] = defaultdict(list)
    pairs: dict[str, list[float]] = defaultdict(list)
    started = time.perf_counter()
    with torch.no_grad():
        for start in tqdm(range(0, groups, batch_groups), desc=Path(checkpoint).parts[-3], leave=False):
            chunk = [dataset[i] for i in range(start, min(start + batch_groups, groups))]
            items = flatten_groups(chunk)
            if protocol == "describe":
                items = describe_first(module, items)
            correct = first_token_correct(module, items).tolist()
            for item, right in zip(items, correct):
                chance = 1 / len(item["options"])
                keys = ["all", f"aspect/{item['aspect']}", f"format/{item['format']}"]
                if item["reversed"]:
                    keys.append("reversed")
                for key in keys:
                    tallies[key].append(right)
                    tallies[f"chance:{key}"].append(chance)
            for g in range(len(chunk)):
                both = correct[2 * g] and correct[2 * g + 1]
                pairs["pair/all"].append(both)
                pairs[f"pair/{chunk[g][0]['aspect']}"].append(both)
    if control == "none":  # the open-ended probe: does the caption state the fact?
        captions = TemporalQA(
            "test", length=groups, size=hp["height"], frames=hp["frames"], task="caption", channels=channels
        )
        with torch.no_grad():
            for start in range(0, groups, batch_groups):
                items = flatten_groups([captions[i] for i in range(start, min(start + batch_groups, groups))])
                for item, right in zip(items, caption_answer_correct(module, items)):
                    for key in (f"caption/{item['aspect']}", "caption/all"):
                        tallies[key].append(right)
                        tallies[f"chance:{key}"].append(1 / CAPTION_ANSWERS[item["aspect"]])
    table = {key: sum(v) / len(v) for key, v in {**tallies, **pairs}.items()}
    table["count:all"] = len(tallies["all"])
    table["seconds"] = time.perf_counter() - started
    return table


def parse_run(text: str) -> tuple[str, str, dict]:
    name, _, rest = text.partition("=")
    checkpoint, *options = rest.split("@")
    settings = dict(option.split("=", 1) for option in options)
    unknown = set(settings) - {"frames", "control", "protocol", "time_steps"}
    if (
        not name
        or not checkpoint
        or unknown
        or settings.get("protocol", "answer") not in ("answer", "describe")
    ):
        raise SystemExit(
            f"bad run {text!r}: use NAME=CKPT[@frames=N][@time_steps=S][@control=random_frame|text]"
            "[@protocol=answer|describe]"
        )
    return name, checkpoint, settings


def score(args: argparse.Namespace) -> None:
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for text in args.runs:
        name, checkpoint, settings = parse_run(text)
        frames = int(settings["frames"]) if "frames" in settings else None
        table = score_run(
            checkpoint,
            frames,
            settings.get("control", "none"),
            settings.get("protocol", "answer"),
            args.groups,
            args.batch_groups,
            int(settings["time_steps"]) if "time_steps" in settings else None,
        )
        results[name] = {"checkpoint": checkpoint, **settings, **table}
        shown = {k: round(v, 3) for k, v in table.items() if not k.startswith("chance")}
        print(name, json.dumps(shown))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))


def figure(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(Path(args.results).read_text())
    names = args.names or list(results)
    panels = {
        "questions (first token decides)": [f"aspect/{a}" for a in ASPECTS] + ["reversed", "all"],
        "caption probe (answer words, teacher forced)": [f"caption/{a}" for a in ASPECTS] + ["caption/all"],
    }
    width = 0.8 / len(names)
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.2), gridspec_kw={"width_ratios": [7, 6]})
    for ax, (title, columns) in zip(axes, panels.items()):
        for k, name in enumerate(names):
            values = [results[name].get(c, float("nan")) for c in columns]
            ax.bar([i + k * width for i in range(len(columns))], values, width, label=name)
        for i, c in enumerate(columns):
            level = results[names[0]].get(f"chance:{c}", float("nan"))
            ax.hlines(level, i - width / 2, i + 0.8 - width / 2, colors="black", linestyles="dashed")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(columns))])
        ax.set_xticklabels([c.split("/")[-1] for c in columns])
        ax.set_ylim(0, 1)
        ax.set_title(f"held-out {title}; dashed: chance", fontsize=9)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Tiny video-LLMs on built-in temporal QA (MovingDigits, CPU)")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print("wrote", args.out)


def binding_probe(args: argparse.Namespace) -> None:
    """Train the tiny configs' LLM (text only) on questions whose fact is given as text; print the held-out
    accuracy of the deciding token as it learns."""
    from timeloom_understanding.hf_backbone import LLMConfig
    from timeloom_understanding.model import VideoLLMConfig

    torch.manual_seed(0)
    llm = LLMConfig(
        hidden_size=128, layers=3, heads=4, intermediate_size=256
    )  # as configs/understanding/*-tiny
    module = VideoLLMModule(VideoLLMConfig(llm=llm, tokenizer_path=args.tokenizer))

    train = TemporalQA("train", length=args.steps * 16, control="text")
    test = TemporalQA("test", length=args.groups, control="text")
    held_out = flatten_groups([test[i] for i in range(args.groups)])
    optimizer = torch.optim.AdamW(module.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50))
    started = time.process_time()
    for step in tqdm(range(args.steps), desc="binding probe"):
        loss, _ = module.model.loss(module.collate(flatten_groups([train[step * 16 + k] for k in range(16)])))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        warmup.step()
        if (step + 1) % 100 == 0:
            with torch.no_grad():
                accuracy = first_token_correct(module, held_out).float().mean().item()
            cpu = (time.process_time() - started) / 60
            tqdm.write(
                f"step {step + 1}: loss {loss.item():.3f}, held-out accuracy {accuracy:.3f} ({cpu:.1f} CPU-min)"
            )


def digit_probe(args: argparse.Namespace) -> None:
    """Can the tiny configs' ViT tell digits apart at all? Trained directly on single frames (one glyph at a
    random place on the 32 px canvas, mean-pooled tokens, a linear head), scored on the test split's glyphs.
    The video-LLM only ever gets this signal through captions naming a digit."""
    from timeloom_understanding.encoders import TimmEncoder

    from timeloom.data.moving_digits import digit_glyphs, render_digits, split_glyph_indices

    torch.manual_seed(0)
    glyphs, labels = digit_glyphs(10)
    low, high = 4.5, 32 - 1 - 4.5  # glyph centres keep the glyph on the canvas

    def frames(split: str, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pool = torch.from_numpy(split_glyph_indices(split))
        chosen = pool[torch.randint(len(pool), (count,), generator=generator)]
        centres = low + (high - low) * torch.rand(count, 1, 2, generator=generator)
        ink = torch.stack(
            [
                render_digits(glyphs[i : i + 1], c[None], torch.ones(1, 1, dtype=torch.bool), 32)
                for i, c in zip(chosen, centres)
            ]
        )
        return (ink * 2 - 1).unsqueeze(1), labels[chosen]  # (count, C=1, T=1, H, W)

    encoder = TimmEncoder(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=args.patch,
        embed_dim=64,
        depth=2,
        num_heads=4,
        in_chans=1,
        class_token=False,
    )  # as configs/understanding/*-tiny
    head = torch.nn.Linear(encoder.width, 10)
    parameters = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.01)
    test_video, test_labels = frames("test", 512, torch.Generator().manual_seed(1))
    train_generator = torch.Generator().manual_seed(0)
    started = time.process_time()
    for step in tqdm(range(args.steps), desc=f"digit probe, patch {args.patch}"):
        video, target = frames("train", 64, train_generator)
        loss = torch.nn.functional.cross_entropy(head(encoder(video)[0].mean((1, 2))), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % 100 == 0:
            with torch.no_grad():
                accuracy = (
                    (head(encoder(test_video)[0].mean((1, 2))).argmax(-1) == test_labels).float().mean()
                )
            cpu = (time.process_time() - started) / 60
            tqdm.write(
                f"step {step + 1}: loss {loss.item():.3f}, held-out accuracy {accuracy:.3f} ({cpu:.1f} CPU-min)"
            )


def _ccam_attention_on_digits(model, items: list[dict], features: torch.Tensor) -> torch.Tensor:
    """Per item, the share of the first CCAM layer's cross-attention (averaged over heads and queries) that
    lands on patches a digit covers, next to those patches' share of what the queries may read."""
    from timeloom_understanding.layouts import ccam_blocks, ccam_query_mask
    from timeloom_understanding.vision_pretraining import BACKGROUND, patch_digit_targets

    projector, layer = model.projector, model.projector.layers[0]
    batch, frames, per_frame, _ = features.shape
    size = items[0]["video"].shape[-1]
    patch = size // int(per_frame**0.5)  # the projector's grid: the coarser encoder's
    digit = torch.stack(
        [patch_digit_targets(item["meta"], size, 10, patch) != BACKGROUND for item in items]
    ).flatten(1)  # (B, T·N)
    queries = projector.queries.expand(batch, -1, -1)
    queries = queries + layer.self_attention(
        layer.self_norm(queries), ccam_query_mask(projector.num_queries, frames)
    )
    attention = layer.cross_attention
    split = lambda t: t.unflatten(-1, (attention.heads, -1)).transpose(1, 2)
    q = split(attention.q(layer.cross_norm(queries)))
    k = split(attention.kv(projector.frames_in(features).flatten(1, 2)).chunk(2, dim=-1)[0])
    readable = (
        torch.arange(frames).repeat_interleave(per_frame)[None]
        <= ccam_blocks(projector.num_queries, frames)[:, None]
    )  # (Q, T·N): the causal cross-attention mask
    weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~readable, -torch.inf).softmax(-1)
    on_digits = (weights * digit[:, None, None].float()).sum(-1).mean((1, 2))
    digit_share = (digit[:, None].float() * readable).sum(-1).mean(-1) / readable.sum(-1).float().mean()
    return torch.stack((on_digits, digit_share), -1)


def _direction_features(module: VideoLLMModule, items: list[dict]) -> dict[str, torch.Tensor]:
    """Per item, what a direction probe reads at each stage of the model: the encoder's tokens of the first and
    last frame, the projector's visual tokens, the LLM's last-layer states over the visual tokens and its
    state where it picks the deciding token."""
    model = module.model
    batch = module.collate(items)
    video = batch["video"]
    features, grid = model.encode_frames(video)
    tokens, _ = model.project(features, grid)
    hidden, layout, labels = model.hidden_states(batch)
    supervised = labels[:, 1:] != -100
    rows = [torch.nonzero(supervised[b]).flatten() for b in range(len(items))]
    last_reply = [len(model.tokenizer.encode(item["conversations"][-1]["value"])) + 1 for item in items]
    deciding = torch.stack([hidden[b, r[-n]] for b, (r, n) in enumerate(zip(rows, last_reply))])
    visual = torch.stack([hidden[b][layout.visual[b]] for b in range(len(items))])
    return {
        # the main projector's attention, on the channels it reads (all of them unless a side projector)
        "attention": _ccam_attention_on_digits(
            model, items, features[..., : model.projector.frames_in.in_features]
        ),
        "encoder (frames 1, T)": features[:, [0, -1]].flatten(1),
        "projector (visual tokens)": tokens.flatten(1),
        "LLM at visual tokens": visual.flatten(1),
        "LLM at the deciding token": deciding,
    }


def direction_probe(args: argparse.Namespace) -> None:
    """Where is the direction lost? Logistic-regression probes for digit 0's direction (4 classes, chance 25
    %) on each stage's features, fitted on train-split direction items, scored on the test split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    results = {}
    for name, checkpoint in (run.split("=", 1) for run in args.runs):
        module = VideoLLMModule.from_checkpoint(checkpoint).eval()
        hp = module.hparams
        per_split = {}
        for split, groups in (("train", args.train_groups), ("test", args.groups)):
            data = TemporalQA(
                split, length=groups, size=hp["height"], frames=hp["frames"], aspects=["direction"]
            )
            chunks: dict[str, list[torch.Tensor]] = defaultdict(list)
            answers = []
            with torch.no_grad():
                for start in tqdm(range(0, groups, args.batch_groups), desc=f"{name} {split}", leave=False):
                    items = flatten_groups(
                        [data[i] for i in range(start, min(start + args.batch_groups, groups))]
                    )
                    for key, value in _direction_features(module, items).items():
                        chunks[key].append(value)
                    answers += [item["answer"] for item in items]
            per_split[split] = ({k: torch.cat(v).numpy() for k, v in chunks.items()}, answers)
        (train, train_y), (test, test_y) = per_split["train"], per_split["test"]
        attention = torch.from_numpy(test.pop("attention")).mean(0).tolist()
        train.pop("attention")
        results[name] = {"CCAM layer-0 attention on digit patches": attention[0], "their share": attention[1]}
        print(
            f"{name:24s} CCAM layer-0 attention on digit patches {attention[0]:.3f} (their share {attention[1]:.3f})"
        )
        for key in train:
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=args.c, max_iter=2000))
            probe.fit(train[key], train_y)
            results[name][key] = float(probe.score(test[key], test_y))
            print(f"{name:24s} {key:28s} dims {train[key].shape[1]:6d}  test {results[name][key]:.3f}")
    print(json.dumps(results, indent=1))


def _direction_videos(split: str, start: int, groups: int, size: int, frames: int):
    """Videos ``(2·groups, C, T, H, W)`` of direction groups ``start…`` and their answers as class indices."""
    data = TemporalQA(split, length=start + groups, size=size, frames=frames, aspects=["direction"])
    items = flatten_groups([data[i] for i in range(start, start + groups)])
    answers = torch.tensor([list(DIRECTIONS).index(item["answer"]) for item in items])
    return torch.stack([item["video"] for item in items]), answers


def _learn_direction(checkpoint: str, args: argparse.Namespace) -> list[float]:
    """Held-out accuracy every 50 steps of a fresh projector + linear head learning the direction."""
    from timeloom_understanding.projectors import make_projector

    torch.manual_seed(0)
    module = VideoLLMModule.from_checkpoint(checkpoint)
    model, size, frames = module.model, module.hparams["height"], module.hparams["frames"]
    # the side encoder's tokens too: one fresh projector reads both, whatever side_join
    encoders = [*model.encoders]
    for encoder in encoders:
        encoder.requires_grad_(args.train_encoder)
    width = sum(encoder.width for encoder in encoders)
    projector = make_projector(model.config.projector, width, 128, **model.config.projector_options)
    tokens = model.visual_tokens_per_media(frames, size, size)
    head = torch.nn.Linear(tokens * 128, len(DIRECTIONS))
    learning = [*projector.parameters(), *head.parameters()]
    learning += [p for encoder in encoders for p in encoder.parameters()] if args.train_encoder else []
    optimizer = torch.optim.AdamW(learning, lr=1e-3, weight_decay=0.01)
    test_video, test_answers = _direction_videos("test", 0, args.groups, size, frames)
    curve = []
    for step in tqdm(range(1, args.steps + 1), desc=Path(checkpoint).parts[-3], leave=False):
        video, answers = _direction_videos("train", step * 16, 16, size, frames)
        guesses = head(projector(*model.encode_frames(video))[0].flatten(1))
        loss = torch.nn.functional.cross_entropy(guesses, answers)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0:
            with torch.no_grad():
                guesses = head(projector(*model.encode_frames(test_video))[0].flatten(1)).argmax(-1)
            curve.append((guesses == test_answers).float().mean().item())
    return curve


def projector_probe(args: argparse.Namespace) -> None:
    """Can a fresh projector read the direction from a checkpoint's encoder tokens at all? The projector
    (the checkpoint's own kind and options) and a linear head on its visual tokens learn digit 0's direction
    directly (4 classes, chance 25 %), the encoder frozen or learning too; scored on held-out test-split
    videos. The signal is strong, unlike the LM's: how fast it is learnt says how readable the tokens are."""
    for name, checkpoint in (run.split("=", 1) for run in args.runs):
        started = time.process_time()
        curve = _learn_direction(checkpoint, args)
        cpu = (time.process_time() - started) / 60
        shown = " ".join(f"{50 * (k + 1)}: {a:.2f}" for k, a in enumerate(curve))
        state = "learning" if args.train_encoder else "frozen"
        print(f"{name:24s} encoder {state}: {shown} ({cpu:.1f} CPU-min)")


def table(args: argparse.Namespace) -> None:
    """The results as a Markdown table: accuracy per aspect, reversed twins, pairs, overall; chance below."""
    results = json.loads(Path(args.results).read_text())
    columns = [f"aspect/{a}" for a in ASPECTS] + ["reversed", "all", "pair/all"]
    columns += [f"caption/{a}" for a in ASPECTS] if args.captions else []
    header = ["run"] + [c.removeprefix("aspect/") for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in args.names or list(results):
        row = results[name]
        lines.append(
            f"| {name} | " + " | ".join(f"{100 * row.get(c, float('nan')):.1f}" for c in columns) + " |"
        )
    first = results[(args.names or list(results))[0]]
    chance = [first.get(f"chance:{c}", float("nan")) for c in columns]
    lines.append("| chance | " + " | ".join(f"{100 * c:.1f}" for c in chance).replace("nan", "–") + " |")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(required=True)
    scoring = commands.add_parser("score", help="score checkpoints on the test split")
    scoring.add_argument(
        "runs", nargs="+", help="NAME=CKPT[@frames=N][@control=random_frame|text][@protocol=answer|describe]"
    )
    scoring.add_argument("--groups", type=int, default=256, help="conflict groups (twice as many items)")
    scoring.add_argument("--batch-groups", type=int, default=32)
    scoring.add_argument("--out", default="benchmarks/understanding-quality.json")
    scoring.set_defaults(handler=score)
    plotting = commands.add_parser("figure", help="accuracy per aspect per run")
    plotting.add_argument("results")
    plotting.add_argument("--names", nargs="*")
    plotting.add_argument("--out", default="docs/understanding-accuracy.png")
    plotting.set_defaults(handler=figure)
    tabling = commands.add_parser("table", help="the results as a Markdown table")
    tabling.add_argument("results")
    tabling.add_argument("--names", nargs="*")
    tabling.add_argument("--captions", action="store_true", help="add the caption-probe columns")
    tabling.set_defaults(handler=table)
    probing = commands.add_parser("binding-probe", help="can the LM learn the answer format from text facts?")
    probing.add_argument("--steps", type=int, default=500)
    probing.add_argument("--lr", type=float, default=1e-3)
    probing.add_argument("--groups", type=int, default=128, help="held-out conflict groups")
    probing.add_argument("--tokenizer", default="temporal_qa")
    probing.set_defaults(handler=binding_probe)
    digits = commands.add_parser(
        "digit-probe", help="can the tiny ViT tell digits apart, supervised directly?"
    )
    digits.add_argument("--steps", type=int, default=300)
    digits.add_argument("--patch", type=int, default=8, help="patch side in pixels (8: the tiny configs)")
    digits.set_defaults(handler=digit_probe)
    directions = commands.add_parser("direction-probe", help="where does a checkpoint lose the direction?")
    directions.add_argument("runs", nargs="+", help="NAME=CKPT")
    directions.add_argument("--train-groups", type=int, default=400)
    directions.add_argument("--groups", type=int, default=128, help="held-out conflict groups")
    directions.add_argument("--batch-groups", type=int, default=32)
    directions.add_argument("--c", type=float, default=0.1, help="inverse L2 strength of the probes")
    directions.set_defaults(handler=direction_probe)
    readable = commands.add_parser("projector-probe", help="can a fresh projector learn the direction?")
    readable.add_argument("runs", nargs="+", help="NAME=CKPT (its encoder, frozen unless --train-encoder)")
    readable.add_argument("--steps", type=int, default=200)
    readable.add_argument("--groups", type=int, default=64, help="held-out conflict groups")
    readable.add_argument("--train-encoder", action="store_true")
    readable.set_defaults(handler=projector_probe)
    args = parser.parse_args()
    args.handler(args)


if __name__ == "__main__":
    main()
