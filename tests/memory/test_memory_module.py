"""`MemoryLMModule` on MQAR, the shipped configs, and paper-size parameter counts on the meta device."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from timeloom_memory import MemoryLMModule, MQARDataModule, NeuralMemoryConfig, TitansConfig, TitansLM

from timeloom.module import StateDictMismatchError

ROOT = Path(__file__).resolve().parents[2]


def smoke_batch(n=16):
    data = MQARDataModule(vocab_size=512, seq_len=64, num_pairs=4, train_length=n).dataset("train")
    return {k: torch.stack([data[i][k] for i in range(n)]) for k in ("input_ids", "labels")}


@pytest.mark.parametrize("block", ["attention", "mac"])
def test_loss_falls_on_mqar_smoke(block):
    torch.manual_seed(0)
    memory = NeuralMemoryConfig(heads=2, head_dim=16, chunk_size=16)
    config = TitansConfig(vocab_size=512, dim=32, depth=2, heads=2, block=block, segment=32, ffn_mult=0.0,
                          memory=memory)  # fmt: skip
    module = MemoryLMModule(config)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    batch = smoke_batch()
    first, _, _ = module.scores(batch)
    for _ in range(25):
        loss, acc, exact = module.scores(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss < 0.8 * first, (float(first), float(loss))
    assert 0 <= exact <= acc <= 1


def test_scores_count_only_labelled_positions():
    torch.manual_seed(0)
    module = MemoryLMModule(TitansConfig(vocab_size=512, dim=32, block="attention"))
    batch = smoke_batch(4)
    with torch.no_grad():
        logits = module(batch["input_ids"])
        loss, acc, exact = module.scores(batch)
    labelled = batch["labels"] != -100
    expected = torch.nn.functional.cross_entropy(logits[labelled], batch["labels"][labelled])
    torch.testing.assert_close(loss, expected)
    correct = logits.argmax(-1) == batch["labels"]
    torch.testing.assert_close(acc, correct[labelled].float().mean())
    torch.testing.assert_close(exact, (correct | ~labelled).all(1).float().mean())
    with pytest.raises(ValueError, match="vocab_size"):
        MemoryLMModule(TitansConfig(vocab_size=100, dim=32, block="attention")).scores(batch)


def expected_parameters(c: TitansConfig) -> int:
    """The parameter count written out from the architecture (spec §2, §9)."""
    d, m = c.dim, c.memory
    inner = m.heads * m.head_dim
    memory = (
        3 * d * inner  # q, k, v projections
        + 3 * inner * m.conv_kernel  # depthwise convs
        + 3 * m.heads * (d + 1)  # θ, η, α gates
        + m.heads * sum(o * i for o, i in m.layer_shapes)  # W_0
        + m.head_dim  # output RMSNorm
        + 2 * d * inner  # output gate and projection
    )
    total = c.vocab_size * d * (1 if c.tie_embeddings else 2) + d
    for layer in range(c.depth):
        kind = c.kind_of(layer)
        total += d + c.persistent_tokens * d
        total += 4 * d * d if kind != "lmm" else 0
        total += memory if kind in ("lmm", "mac", "mag", "mal") else 0
        total += 2 * d + d * d if kind in ("mac", "mag") else 0
        total += d if kind == "mal" and c.mal_attend == "residual" else 0  # the attention's own RMSNorm
        hidden = int(c.ffn_mult * d)
        total += d + 3 * d * hidden if hidden else 0
    return total


@pytest.mark.parametrize("kind", ["mac", "mag", "mal"])
def test_paper_size_configs_count_on_the_meta_device(kind):
    config = yaml.safe_load((ROOT / f"configs/memory/titans-{kind}-base.yaml").read_text())
    config = TitansConfig(**config["model"]["init_args"]["config"])
    with torch.device("meta"):
        model = TitansLM(config)
    count = model.num_parameters()
    assert count == expected_parameters(config)
    assert 4.0e8 < count < 5.5e8, count  # d 1024 × 24 layers: attention + memory + SwiGLU per block


def test_tiny_configs_match_the_formula():
    for path in sorted((ROOT / "configs/memory").glob("*-tiny.yaml")):
        model = yaml.safe_load(path.read_text())["model"]
        if model["class_path"].rsplit(".", 1)[-1] != "MemoryLMModule":
            continue  # e.g. the video-recall model, with its own config class
        raw = model["init_args"]["config"]
        raw["vocab_size"] = 256
        config = TitansConfig(**raw)
        assert TitansLM(config).num_parameters() == expected_parameters(config), path.name


def test_timeloom_fit_runs_a_tiny_config(tmp_path):
    run = subprocess.run(
        [str(Path(sys.executable).parent / "timeloom"), "fit", "-c", str(ROOT / "configs/memory/titans-mac-tiny.yaml"),
         "-c", str(ROOT / "configs/logger/csv.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}",
         f"--trainer.default_root_dir={tmp_path}", f"--checkpoint.dirpath={tmp_path}/ckpt",
         "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1", "--data.init_args.train_length=16",
         "--data.init_args.val_length=8", "--data.init_args.batch_size=8", "--trainer.enable_progress_bar=false"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "train/loss" in metrics and "val/acc" in metrics


def test_bench_memory_tiny_preset_writes_its_tables(tmp_path):
    from timeloom_memory.bench import main

    assert main(["--preset", "tiny", "--out", str(tmp_path), "--mqar-steps", "1"]) == 0
    result = json.loads((tmp_path / "memory.json").read_text())
    assert {c["update"] for c in result["cells"]} == {"sequential", "scan", "dual"}
    assert {u["update"] for u in result["speedups"]} == {"scan", "dual"}
    assert result["matmul_peak_flops"] > 0
    for c in result["cells"]:  # one layer's update does the same work whichever kernel runs it (within 2×)
        sequential = next(s for s in result["cells"] if s["update"] == "sequential")
        assert 0.5 < c["forward_backward_flops"] / sequential["forward_backward_flops"] < 2
    models = {r["model"] for r in result["training"]}
    assert {"timeloom Titans MAC", "timeloom plain transformer (yardstick)"} <= models
    if importlib.util.find_spec("titans_pytorch") is None:
        assert any("titans-pytorch side by side: not installed" in s for s in result["skipped"])
    else:
        assert "titans-pytorch MAC (batch_size = b)" in models
    for row in result["training"]:
        assert row["tokens_per_s"] > 0 and row["flops_per_token"] > 0
    assert set(result["mqar_accuracy"]) == models
    assert all(0 <= a <= 1 for a in result["mqar_accuracy"].values())
    text = (tmp_path / "memory.md").read_text()
    assert "| dual |" in text and "| timeloom Titans MAC |" in text and "fwd: 10× needs" in text


def test_save_pretrained_round_trip(tmp_path):
    from timeloom.module import TimeloomModule

    torch.manual_seed(0)
    config = TitansConfig(vocab_size=64, dim=16, block="mag", window=8, memory=NeuralMemoryConfig(head_dim=8))
    module = MemoryLMModule(config)
    module.save_pretrained(tmp_path)
    loaded = TimeloomModule.from_pretrained(tmp_path)
    assert isinstance(loaded, MemoryLMModule) and loaded.config == module.config
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), module(ids), atol=0, rtol=0)


def test_init_from_starts_a_stage_from_an_earlier_checkpoint(tmp_path):
    torch.manual_seed(0)
    config = TitansConfig(vocab_size=64, dim=16, block="mac", segment=8,
                          memory=NeuralMemoryConfig(head_dim=8, chunk_size=4))  # fmt: skip
    earlier = MemoryLMModule(config)
    torch.save({"state_dict": earlier.state_dict()}, tmp_path / "stage1.ckpt")
    later = MemoryLMModule(config, init_from=str(tmp_path / "stage1.ckpt"))
    assert not torch.equal(later.model.embed.weight, earlier.model.embed.weight)  # fresh until fit starts
    later.load_initial_weights(later.init_from)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(later(ids), earlier(ids), atol=0, rtol=0)
    other = MemoryLMModule(TitansConfig(vocab_size=64, dim=16, block="attention"))
    with pytest.raises(StateDictMismatchError, match="init_from .*stage1.ckpt does not fit.*unexpected keys"):
        other.load_initial_weights(tmp_path / "stage1.ckpt")
    with pytest.raises(FileNotFoundError, match="init_from: no checkpoint"):
        other.load_initial_weights(tmp_path / "none.ckpt")
    assert MemoryLMModule.starting_weights == ("init_from",)  # a saved module rebuilds without the file


def test_fit_on_an_mqar_mixture_reports_every_setting(tmp_path):
    from lightning.pytorch import Trainer

    torch.manual_seed(0)
    config = TitansConfig(vocab_size=256, dim=16, depth=1, heads=2, block="attention", ffn_mult=0.0)
    data = MQARDataModule(vocab_size=256, seq_len=64, num_pairs=4, mix_with=[[32, 2]], train_length=32,
                          val_length=8, batch_size=4)  # fmt: skip
    trainer = Trainer(max_steps=4, val_check_interval=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(MemoryLMModule(config), data)
    metrics = trainer.callback_metrics
    # the main setting under val/ (what early stopping watches), the mixed-in one under its own name
    assert {"val/acc", "val/loss", "val_seq32x2/acc", "val_seq32x2/loss"} <= set(metrics)
    assert not any("dataloader_idx" in name for name in metrics)
