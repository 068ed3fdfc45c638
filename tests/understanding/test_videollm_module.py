"""`VideoLLMModule` (spec §6): learning, scoring, freezing, stage chaining, and every config through the CLI."""

import sys
from pathlib import Path

import pytest
import torch
from timeloom_understanding.data import TemporalQA
from timeloom_understanding.encoders import vit_options
from timeloom_understanding.hf_backbone import LLMConfig
from timeloom_understanding.model import VideoLLMConfig
from timeloom_understanding.module import VideoLLMModule
from timeloom_understanding.vision_pretraining import DigitPatchModule

from timeloom.cli import main
from timeloom.module import StateDictMismatchError

ROOT = Path(__file__).resolve().parents[2]
# the tiny configs train on a CPU; the paper-size ones are built on the meta device in test_videollm.py
CONFIGS = sorted((ROOT / "configs/understanding").glob("*-tiny*.yaml"))
ENCODER = vit_options()


def tiny_module(tie_embeddings: bool = True, side_join: str | None = None, **kwargs) -> VideoLLMModule:
    """The tiny module; ``side_join`` adds a side encoder (ENCODER's options) joined that way."""
    torch.manual_seed(0)
    config = VideoLLMConfig(
        encoder=ENCODER,
        side_encoder=ENCODER if side_join else None,
        side_join=side_join or "channels",
        llm=LLMConfig(hidden_size=32, layers=2, heads=4, tie_embeddings=tie_embeddings),
        structure="tc_llava",
        max_length=256,
    )
    return VideoLLMModule(config, **kwargs)


def items(groups: int = 2, seed: int = 5) -> list:
    dataset = TemporalQA(length=groups, seed=seed)
    return [dataset[i] for i in range(groups)]


def test_a_few_steps_lower_the_loss_on_a_batch():
    module = tiny_module()
    batch = module.on_before_batch_transfer(items(), 0)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = module.training_step(batch, 0)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] - 1.0 and losses == sorted(losses, reverse=True), losses


def test_validation_scores_the_deciding_token_greedily(monkeypatch):
    module = tiny_module().eval()
    batch = module.on_before_batch_transfer(items(3), 0)
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **_: logged.__setitem__(name, float(value)))
    with torch.no_grad():
        module.validation_step(batch, 0)
        logits = module.model.logits(batch)
        _, _, labels = module.model.build_inputs(batch)
    decided, exact = [], []
    for b in range(labels.shape[0]):
        positions = torch.nonzero(labels[b, 1:] != -100).flatten()  # predicting labels[b, n + 1]
        greedy = logits[b, positions].argmax(-1) == labels[b, positions + 1]
        decided.append(bool(greedy[0]))
        exact.append(bool(greedy.all()))
    assert logged["val/accuracy"] == pytest.approx(sum(decided) / len(decided))
    assert logged["val/exact_match"] == pytest.approx(sum(exact) / len(exact))
    for aspect in set(batch["aspect"]):
        rows = [d for d, a in zip(decided, batch["aspect"]) if a == aspect]
        assert logged[f"val/accuracy/{aspect}"] == pytest.approx(sum(rows) / len(rows))


def test_trainable_patterns_freeze_the_rest():
    module = tiny_module(trainable=["projector.*"])
    learning = {name for name, p in module.model.named_parameters() if p.requires_grad}
    assert learning and all(name.startswith("projector.") for name in learning)
    with pytest.raises(ValueError, match=r"\['decoder\.\*'\] match no parameter"):
        tiny_module(trainable=["decoder.*"])
    with pytest.raises(ValueError, match="stage must be one of"):
        tiny_module(stage="pretrain")


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_stage_two_starts_from_stage_one(tmp_path, tie_embeddings):
    module = tiny_module(tie_embeddings)
    module.save_pretrained(tmp_path)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(1.0)
    restored = tiny_module(tie_embeddings, init_from=str(tmp_path))
    for (name, a), b in zip(module.model.state_dict().items(), restored.model.state_dict().values()):
        torch.testing.assert_close(a - 1.0 if a.is_floating_point() else a, b, msg=name)


def test_stage_two_starts_from_a_stage_one_checkpoint(tmp_path):
    module = tiny_module()  # tied embeddings: Lightning checkpoints keep the sharing
    torch.save({"state_dict": module.state_dict()}, tmp_path / "last.ckpt")
    restored = tiny_module(init_from=str(tmp_path / "last.ckpt"))
    for (name, a), b in zip(module.model.state_dict().items(), restored.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert (
        restored.model.llm.lm_head.weight.data_ptr()
        == restored.model.llm.get_input_embeddings().weight.data_ptr()
    )


def train_two_steps(module, batch) -> None:
    """Two AdamW steps at a high rate: weights no freshly built module has."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    for _ in range(2):
        module.training_step(batch, 0).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_llm_init_takes_only_the_llm_of_a_text_stage(tmp_path):
    text_stage = tiny_module()  # tied embeddings
    text_items = TemporalQA(length=2, seed=5, control="text")
    batch = text_stage.on_before_batch_transfer([text_items[0], text_items[1]], 0)
    assert batch["video"] is None
    train_two_steps(text_stage, batch)  # the LLM moves away from its initialisation
    torch.save({"state_dict": text_stage.state_dict()}, tmp_path / "text.ckpt")
    fresh = tiny_module()
    video_stage = tiny_module(llm_init=str(tmp_path / "text.ckpt"))
    for name, value in video_stage.model.state_dict().items():
        source = text_stage if name.startswith("llm.") else fresh
        torch.testing.assert_close(value, source.model.state_dict()[name], rtol=0, atol=0, msg=name)
    assert not torch.equal(
        text_stage.model.llm.lm_head.weight, fresh.model.llm.lm_head.weight
    )  # the text stage did learn
    llm = video_stage.model.llm
    assert llm.lm_head.weight.data_ptr() == llm.get_input_embeddings().weight.data_ptr()
    with pytest.raises(ValueError, match="not both"):
        tiny_module(init_from=str(tmp_path / "text.ckpt"), llm_init=str(tmp_path / "text.ckpt"))
    torch.save({"state_dict": {"model.projector.w": torch.zeros(1)}}, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="no llm"):
        tiny_module(llm_init=str(tmp_path / "bare.ckpt"))


def test_a_video_llm_starts_from_the_pretrained_encoder(tmp_path):
    torch.manual_seed(1)
    stage0 = DigitPatchModule(ENCODER)
    batch = {"video": torch.rand(2, 1, 8, 32, 32) * 2 - 1, "targets": torch.randint(11, (2, 8, 16))}
    train_two_steps(stage0, batch)  # the encoder moves away from any initialisation
    torch.save({"state_dict": stage0.state_dict()}, tmp_path / "vit.ckpt")
    fresh = tiny_module()
    run = tiny_module(encoder_init=str(tmp_path / "vit.ckpt"))
    for name, value in run.model.state_dict().items():
        source = stage0.model if name.startswith("encoder.") else fresh.model
        torch.testing.assert_close(value, source.state_dict()[name], rtol=0, atol=0, msg=name)
    wider = DigitPatchModule({**ENCODER, "embed_dim": 48})
    torch.save({"state_dict": wider.state_dict()}, tmp_path / "wider.ckpt")
    with pytest.raises(StateDictMismatchError, match="shape mismatches"):
        tiny_module(encoder_init=str(tmp_path / "wider.ckpt"))
    with pytest.raises(ValueError, match="not both"):
        tiny_module(init_from=str(tmp_path / "vit.ckpt"), encoder_init=str(tmp_path / "vit.ckpt"))
    assert run.hparams["encoder_init"] == str(tmp_path / "vit.ckpt")


def test_a_one_encoder_checkpoint_widens_with_a_side_path_that_changes_nothing(tmp_path):
    narrow = tiny_module()
    train_two_steps(narrow, narrow.on_before_batch_transfer(items(), 0))
    torch.save({"state_dict": narrow.state_dict()}, tmp_path / "narrow.ckpt")
    stage0 = DigitPatchModule(ENCODER)
    train_two_steps(
        stage0, {"video": torch.rand(2, 1, 8, 32, 32) * 2 - 1, "targets": torch.randint(11, (2, 8, 16))}
    )
    torch.save({"state_dict": stage0.state_dict()}, tmp_path / "vit.ckpt")
    wide = tiny_module(
        side_join="projector",
        init_from=str(tmp_path / "narrow.ckpt"),
        side_encoder_init=str(tmp_path / "vit.ckpt"),
    )
    for name, value in wide.model.state_dict().items():
        if name.startswith("side_encoder."):
            expected = stage0.model.state_dict()[name.removeprefix("side_")]
        elif name.startswith("side_projector."):
            continue
        else:
            expected = narrow.model.state_dict()[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    batch = narrow.on_before_batch_transfer(items(3, seed=9), 0)
    with torch.no_grad():  # before any step the widened model is the checkpoint's, bit for bit
        assert torch.equal(wide.eval().model.logits(batch), narrow.eval().model.logits(batch))
    assert wide.hparams["side_encoder_init"] == str(tmp_path / "vit.ckpt")


def test_widening_names_what_else_disagrees(tmp_path):
    narrow = tiny_module().state_dict()
    torch.save(
        {"state_dict": {k: v for k, v in narrow.items() if k != "model.projector.net.2.bias"}},
        tmp_path / "a.ckpt",
    )
    with pytest.raises(StateDictMismatchError, match=r"1 missing keys: projector\.net\.2\.bias$"):
        tiny_module(side_join="projector", init_from=str(tmp_path / "a.ckpt"))
    joined = tiny_module(side_join="channels")  # stop 14's vs-full: one projector over both encoders
    torch.save({"state_dict": joined.state_dict()}, tmp_path / "joined.ckpt")
    with pytest.raises(
        StateDictMismatchError, match="missing keys: side_projector.*shape mismatches: projector"
    ):
        tiny_module(side_join="projector", init_from=str(tmp_path / "joined.ckpt"))
    with pytest.raises(ValueError, match="holds a side path already"):
        tiny_module(
            side_join="channels",
            init_from=str(tmp_path / "joined.ckpt"),
            side_encoder_init=str(tmp_path / "a.ckpt"),
        )
    with pytest.raises(ValueError, match="the config has no side_encoder"):
        tiny_module(side_encoder_init=str(tmp_path / "a.ckpt"))
    with pytest.raises(FileNotFoundError, match="side_encoder_init: no checkpoint at"):
        tiny_module(side_join="projector", side_encoder_init=str(tmp_path / "gone.ckpt"))


def test_a_run_reloads_without_its_starting_weights(tmp_path):
    tiny_module().save_pretrained(tmp_path / "text")
    run = tiny_module(llm_init=str(tmp_path / "text"), encoder_init=str(tmp_path / "text"))
    checkpoint = {"state_dict": run.state_dict(), "hyper_parameters": dict(run.hparams)}
    torch.save(checkpoint | {"class_path": run.class_path()}, tmp_path / "run.ckpt")
    run.save_pretrained(tmp_path / "export")
    for path in (tmp_path / "text").iterdir():
        path.unlink()  # evaluate/ask read the run's own weights, not the text stage's
    for restored in (
        VideoLLMModule.from_checkpoint(tmp_path / "run.ckpt"),
        VideoLLMModule.from_pretrained(tmp_path / "export"),
    ):
        for name, value in run.model.state_dict().items():
            torch.testing.assert_close(restored.model.state_dict()[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_fits_two_steps(config, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["timeloom"])
    args = [
        "fit",
        "-c",
        str(config),
        "-c",
        str(ROOT / "configs/logger/csv.yaml"),
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        "--trainer.val_check_interval=2",
        "--data.init_args.batch_size=2",
        "--data.init_args.val_length=2",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--checkpoint.dirpath={tmp_path / 'checkpoints'}",
    ]
    main(args)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
