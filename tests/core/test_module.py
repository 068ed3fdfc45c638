"""The base module: optimiser/scheduler defaults, export, shape errors, throughput, W&B offline default."""

import math
import time

import lightning.pytorch as pl
import pytest
import torch

from timeloom.logging import WandbLogger, wandb_has_api_key
from timeloom.models import VideoAutoencoder, VideoAutoencoderConfig
from timeloom.module import (
    TRAINING_ONLY_ARGS,
    StateDictMismatchError,
    TimeloomModule,
    WarmupCosine,
    default_optimizer,
    load_state_dict_checked,
)
from timeloom.throughput import CpuTimeBudget, interleaved_times, measure_matmul_peak


def tiny_module(**kwargs) -> VideoAutoencoder:
    return VideoAutoencoder(config=VideoAutoencoderConfig(width=8, latent_channels=4, levels=1), **kwargs)


class StartsFromWeights(VideoAutoencoder):
    """A module whose run starts from another run's weights (as a fine-tuning stage does)."""

    starting_weights = ("init_weights",)

    def __init__(self, init_weights: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if init_weights is not None:
            load_state_dict_checked(
                self.model, torch.load(init_weights, weights_only=True), source=init_weights
            )


def test_warmup_cosine_shape():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupCosine(optimizer, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    factors = [schedule.factor(step) for step in range(120)]
    assert factors[0] < factors[5] < factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factors[110] == factors[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_warmup_cosine_without_a_horizon_holds_the_rate():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupCosine(optimizer, warmup_steps=4)
    assert [schedule.factor(step) for step in (4, 100, 10**6)] == [1.0, 1.0, 1.0]


def test_warmup_cosine_follows_a_progress_share_when_steps_are_unbounded():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupCosine(optimizer, warmup_steps=4, min_lr_ratio=0.1)
    shares = iter([0.0, 0.5, 1.0, 1.5])
    schedule.progress = lambda: next(shares)
    assert schedule.factor(2) == pytest.approx(3 / 5)  # warm-up still counts steps, not the share
    assert [schedule.factor(10) for _ in range(4)] == pytest.approx([1.0, 0.55, 0.1, 0.1])


class TinyRegression(TimeloomModule):
    def __init__(self, horizon: str):
        super().__init__(scheduler=lambda optimizer: WarmupCosine(optimizer, warmup_steps=0, horizon=horizon))
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()


def test_a_cosine_over_the_cpu_budget_decays_an_unbounded_run(tmp_path, monkeypatch):
    # the budget reads the process's CPU time; a clock that advances 5 ms per reading keeps the number of steps
    # the budget allows independent of the machine's load (a loaded CI once fitted only 2 batches in 0.3 CPU-s)
    ticks = iter(range(10**6))
    monkeypatch.setattr(time, "process_time", lambda: 0.005 * next(ticks))
    rates = []

    class RecordRate(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = pl.Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0,
                         callbacks=[CpuTimeBudget(0.005, check_every_n_batches=1), RecordRate()])  # fmt: skip
    trainer.fit(TinyRegression("cpu_budget"), torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=8))
    assert len(rates) > 10 and all(a >= b for a, b in zip(rates, rates[1:]))
    assert rates[0] > 0.9e-3 and rates[-1] < 0.2e-3  # from the base rate to near the floor (0.1 of it)
    schedule = trainer.lr_scheduler_configs[0].scheduler
    torch.save(schedule.state_dict(), tmp_path / "schedule.pt")  # a checkpoint holds no clock
    assert torch.load(tmp_path / "schedule.pt", weights_only=True)["horizon"] == "cpu_budget"


def test_a_cosine_over_the_cpu_budget_without_one_is_a_clear_error():
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    with pytest.raises(ValueError, match="needs a CpuTimeBudget"):
        trainer.fit(
            TinyRegression("cpu_budget"), torch.utils.data.DataLoader(torch.randn(16, 4), batch_size=8)
        )
    with pytest.raises(ValueError, match="horizon must be"):
        WarmupCosine(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), horizon="wall")


def test_save_and_load_pretrained_roundtrip(tmp_path):
    module = tiny_module()
    video = torch.rand(2, 1, 3, 8, 8) * 2 - 1
    expected = module.model(video)
    module.save_pretrained(tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    loaded = TimeloomModule.from_pretrained(tmp_path / "export")
    assert isinstance(loaded, VideoAutoencoder) and loaded.config == module.config
    torch.testing.assert_close(loaded.model(video), expected, rtol=0, atol=0)


def test_from_pretrained_refuses_another_class(tmp_path):
    tiny_module().save_pretrained(tmp_path / "export")

    class Other(TimeloomModule):
        pass

    with pytest.raises(ValueError, match="not a Other"):
        Other.from_pretrained(tmp_path / "export")


@pytest.mark.parametrize("shape", [(2, 3, 4, 8, 8), (2, 1, 4, 7, 8), (1, 4, 8, 8)])
def test_wrong_shape_is_a_clear_value_error(shape):
    with pytest.raises(ValueError, match=r"expected a video \(B, C=1, T, H, W\).*got shape"):
        tiny_module().model(torch.zeros(shape))


def test_reconstruction_is_causal_in_time():
    model = tiny_module().model
    video = torch.rand(1, 1, 5, 8, 8) * 2 - 1
    changed = video.clone()
    changed[:, :, 3:] = 0
    torch.testing.assert_close(model(video)[:, :, :3], model(changed)[:, :, :3], rtol=0, atol=0)


def test_matmul_peak_is_a_positive_rate_by_either_clock():
    assert measure_matmul_peak("cpu", torch.float32, n=256) > 1e6
    assert measure_matmul_peak("cpu", torch.float32, n=256, cpu_time=True) > 1e6
    with pytest.raises(ValueError, match="cpu_time needs a CPU device"):
        measure_matmul_peak("cuda", torch.float32, n=256, cpu_time=True)


def test_wandb_goes_offline_without_an_api_key(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_has_api_key()
    logger = WandbLogger(save_dir=str(tmp_path / "runs"))
    try:
        run = logger.experiment
        assert run.settings.mode == "offline" or run.offline
    finally:
        import wandb

        wandb.finish()
    assert (tmp_path / "runs" / "wandb").exists()


def test_from_pretrained_with_another_config_names_the_shape_mismatches(tmp_path):
    tiny_module().save_pretrained(tmp_path / "export")
    other = {"width": 8, "latent_channels": 2, "levels": 1}  # saved with 4 latent channels
    with pytest.raises(StateDictMismatchError) as error:
        TimeloomModule.from_pretrained(tmp_path / "export", config=other)
    message = str(error.value)
    assert message.startswith(
        f"{tmp_path / 'export' / 'model.safetensors'} does not fit the CausalVideoAutoencoder"
    )
    assert message.endswith(
        "3 shape mismatches: encoder.6.weight (saved (4, 8, 1, 3, 3), model (2, 8, 1, 3, 3)), "
        "encoder.6.bias (saved (4,), model (2,)), decoder.0.weight (saved (8, 4, 3, 3, 3), model (8, 2, 3, 3, 3))"
    )


def test_from_checkpoint_names_missing_and_unexpected_keys_and_loads_nothing(tmp_path):
    module = tiny_module()
    state = dict(module.state_dict())
    state.pop("model.decoder.7.bias")
    state["model.extra.weight"] = torch.zeros(2)
    path = tmp_path / "other.ckpt"
    hparams = dict(module.hparams)
    torch.save({"class_path": module.class_path(), "hyper_parameters": hparams, "state_dict": state}, path)
    with pytest.raises(StateDictMismatchError) as error:
        TimeloomModule.from_checkpoint(path)
    assert str(error.value).endswith(
        "1 missing keys: model.decoder.7.bias; 1 unexpected keys: model.extra.weight"
    )

    target = tiny_module()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(StateDictMismatchError):
        load_state_dict_checked(target, {k: v + 1 for k, v in state.items()}, source=path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_key_lists_are_cut_short_with_a_count():
    module = tiny_module()
    with pytest.raises(
        StateDictMismatchError, match=r"20 missing keys: model\.encoder\.0\.weight, .*, … and 10 more$"
    ):
        load_state_dict_checked(module, {}, source="empty.ckpt")


def test_from_checkpoint_with_overrides_rebuilds_and_loads(tmp_path):
    module = tiny_module()
    path = tmp_path / "model.ckpt"
    hparams = dict(module.hparams)
    torch.save(
        {"class_path": module.class_path(), "hyper_parameters": hparams, "state_dict": module.state_dict()},
        path,
    )
    loaded = TimeloomModule.from_checkpoint(path, log_video_every_n_epochs=5)
    assert loaded.log_video_every_n_epochs == 5
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), module.state_dict().values()))


@pytest.mark.parametrize("export", ["checkpoint", "pretrained"])
def test_a_saved_module_rebuilds_without_the_weights_its_run_started_from(tmp_path, export):
    start = tmp_path / "start.pt"
    torch.save(tiny_module().model.state_dict(), start)
    module = StartsFromWeights(init_weights=str(start), config=tiny_module().config)
    assert module.hparams["init_weights"] == str(start)  # the record of where the run started stays
    with torch.no_grad():
        next(module.model.parameters()).add_(1.0)  # training moved the weights away from the start
    if export == "checkpoint":
        saved = tmp_path / "run.ckpt"
        torch.save(
            {
                "class_path": module.class_path(),
                "hyper_parameters": dict(module.hparams),
                "state_dict": module.state_dict(),
            },
            saved,
        )
    else:
        saved = module.save_pretrained(tmp_path / "export")
    start.unlink()
    loaded = getattr(TimeloomModule, f"from_{export}")(saved)
    assert loaded.hparams["init_weights"] is None
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.model.state_dict().values(), module.model.state_dict().values())
    )


def test_cpu_time_budget_stops_training_once_spent_and_not_before():
    from lightning.pytorch.demos.boring_classes import BoringModel

    def steps_taken(minutes: float) -> int:
        trainer = pl.Trainer(max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0,
                             callbacks=[CpuTimeBudget(minutes, check_every_n_batches=4)])  # fmt: skip
        trainer.fit(BoringModel())
        return trainer.global_step

    assert steps_taken(1e-9) == 1  # spent at the first check (batch 0): stops after that batch
    assert steps_taken(60) == 12  # an hour is never spent by 12 tiny steps
    with pytest.raises(ValueError, match="positive"):
        CpuTimeBudget(0)


def test_interleaved_calls_take_turns_after_warming_up():
    calls = []
    times = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b"] * 5  # two warm-up rounds, then three timed ones
    assert {clock: [len(v) for v in values.values()] for clock, values in times.items()} == {
        "wall": [3, 3],
        "cpu": [3, 3],
    }


def test_interleaved_rounds_go_on_while_the_budget_lasts_up_to_the_cap():
    calls = []
    times = interleaved_times({"a": lambda: calls.append("a")}, 2, budget_s=60.0, max_rounds=5, warmup=0)
    assert len(calls) == 5 and len(times["wall"]["a"]) == 5  # a long budget stops at the cap
    times = interleaved_times({"a": lambda: None}, 2, budget_s=0.0, max_rounds=5, warmup=0)
    assert len(times["wall"]["a"]) == 2  # a spent budget stops at the minimum


@pytest.mark.parametrize("decay_vectors", [True, False])
def test_decay_vectors_off_leaves_gains_and_biases_undecayed(decay_vectors):
    module = tiny_module(
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.1, weight_decay=0.5),
        decay_vectors=decay_vectors,
    )
    optimizer = module.configure_optimizers()["optimizer"]
    vectors = {id(p) for p in module.parameters() if p.dim() < 2}
    assert vectors and len(vectors) < len(list(module.parameters()))
    before = {id(p): p.detach().clone() for p in module.parameters()}
    for p in module.parameters():  # a zero gradient: only the decay moves a tensor
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p in module.parameters():
        moved = not torch.equal(p, before[id(p)])
        shrinks = decay_vectors or id(p) not in vectors
        assert moved == (shrinks and bool(before[id(p)].abs().sum() > 0))


class TakesNoDecayOption(VideoAutoencoder):
    """A subclass that names the base's arguments instead of forwarding ``**kwargs`` (as most packages' do)."""

    def __init__(
        self,
        config: VideoAutoencoderConfig | None = None,
        log_video_every_n_epochs: int = 1,
        optimizer=default_optimizer,
    ):
        super().__init__(config, log_video_every_n_epochs, optimizer=optimizer)


def test_training_only_arguments_are_not_saved_so_any_subclass_rebuilds(tmp_path):
    module = TakesNoDecayOption(VideoAutoencoderConfig(width=8, latent_channels=4, levels=1))
    assert not set(TRAINING_ONLY_ARGS) & set(module.hparams)
    module.save_pretrained(tmp_path / "export")
    loaded = TimeloomModule.from_pretrained(tmp_path / "export")
    assert isinstance(loaded, TakesNoDecayOption) and loaded.model.config == module.model.config
