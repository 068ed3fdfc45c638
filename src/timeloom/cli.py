"""The `timeloom` command: LightningCLI over every installed timeloom package, plus the packages' own commands.

Model and data classes are chosen in subclass mode, so any installed `TimeloomModule` / `TimeloomDataModule`
works by its short name (``--model=VideoAutoencoder``). Model packages make themselves known through the
entry-point group ``timeloom.packages``; importing them registers their classes. Extra commands
(``timeloom.commands``, e.g. ``generate``), benchmark suites (``timeloom.bench``, run as ``timeloom bench NAME``)
and evaluation suites (``timeloom.evaluate``, run as ``timeloom evaluate NAME``) are entry points too, so a package adds one without touching this file.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

import timeloom.data  # noqa: F401  (registers the core data modules for short names)
import timeloom.models  # noqa: F401  (registers the core models for short names)
from timeloom.data import TimeloomDataModule
from timeloom.module import TimeloomModule
from timeloom.throughput import Throughput


def load_packages() -> list[str]:
    """Import every installed timeloom model package; a broken one is reported, never fatal for the rest."""
    loaded = []
    for entry in entry_points(group="timeloom.packages"):
        try:
            entry.load()
            loaded.append(entry.name)
        except Exception as error:  # noqa: BLE001 - one broken package must not take the CLI down
            warnings.warn(
                f"timeloom package {entry.name!r} ({entry.value}) failed to import: {error}", stacklevel=2
            )
    return loaded


class SaveConfigToRun(SaveConfigCallback):
    """Writes the full resolved config next to the checkpoints and sends it to every logger."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="yaml")
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_hyperparams(self.config.as_dict())
        self._config_text = config

    def on_train_start(self, trainer, pl_module) -> None:
        # The checkpoint folder is only resolved once training starts (it may depend on the logger's run id).
        if trainer.is_global_zero and trainer.checkpoint_callback is not None:
            directory = Path(trainer.checkpoint_callback.dirpath)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / self.config_filename).write_text(self._config_text)


class ModelCheckpointAtEnd(ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, whose ``last.ckpt`` also holds the final step.

    Lightning writes ``last.ckpt`` when training ends only if it never wrote one, so a run that stops between two
    saves (`CpuTimeBudget`, ``max_time``, a ``max_steps`` off the save interval) lost the steps since the last save.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class TimeloomCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_lightning_class_args(ModelCheckpointAtEnd, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})


def _plugins(group: str) -> dict[str, EntryPoint]:
    """The commands or benchmark suites that installed packages register under an entry-point group."""
    return {entry.name: entry for entry in entry_points(group=group)}


def _suite_command(group: str, verb: str, what: str) -> Callable[[list[str]], None]:
    """`timeloom VERB SUITE [...]`: dispatch to the suite an installed package registers under ``group``."""

    def run(argv: list[str]) -> None:
        suites = _plugins(group)
        if not argv or argv[0] not in suites:
            raise SystemExit(f"usage: timeloom {verb} {{{','.join(sorted(suites))}}} [--help]  ({what})")
        status = suites[argv[0]].load()(argv[1:])
        if status:
            raise SystemExit(status)

    return run


def _export(argv: list[str]) -> None:
    """`timeloom export CKPT OUT_DIR`: a Lightning checkpoint to safetensors weights plus config.json."""
    if len(argv) != 2 or argv[0].startswith("-"):
        raise SystemExit("usage: timeloom export CHECKPOINT OUT_DIR")
    load_packages()
    out = TimeloomModule.from_checkpoint(argv[0]).save_pretrained(argv[1])
    print(f"exported {argv[0]} to {out}")


CORE_COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "bench": _suite_command("timeloom.bench", "bench", "speed and memory, JSON + Markdown"),
    "evaluate": _suite_command(
        "timeloom.evaluate", "evaluate", "quality of a trained model, JSON + Markdown"
    ),
    "export": _export,
}


def extra_commands() -> dict[str, Callable[[list[str]], None]]:
    """Commands beside Lightning's: the core's, then those packages register under ``timeloom.commands``.

    Each takes the remaining command-line words; packages load only when their command is called.
    """
    commands: dict[str, Callable[[list[str]], None]] = dict(CORE_COMMANDS)
    for name, entry in _plugins("timeloom.commands").items():
        commands.setdefault(name, lambda argv, entry=entry: entry.load()(argv))
    return commands


def describe() -> str:
    """The top-level help text, listing the commands and benchmark suites that are installed."""
    commands = ", ".join(name for name in extra_commands() if name not in ("bench", "evaluate"))
    suites = ", ".join(sorted(_plugins("timeloom.bench")))
    evaluations = ", ".join(sorted(_plugins("timeloom.evaluate")))
    return (
        "timeloom: train, evaluate and benchmark causal video models.\n\n"
        "Lightning commands: fit, validate, test, predict (each takes -c CONFIG; several -c compose in order).\n"
        f"Other commands (each has --help): {commands}; bench {{{suites}}} (speed and memory, JSON + Markdown);\n"
        f"evaluate {{{evaluations}}} (quality of a trained model, JSON + Markdown).\n"
    )


def main(argv: list[str] | None = None) -> None:
    """The console script; ``argv`` (default: the command line) is for calling it from Python."""
    words = sys.argv[1:] if argv is None else list(argv)
    commands = extra_commands()
    if words and words[0] in commands:
        commands[words[0]](words[1:])
        return
    load_packages()
    # Configs nest under the subcommand (fit.model...); this keeps `${data.init_args.frames}` meaning the
    # merged config's own `data` section rather than a top-level key.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    TimeloomCLI(
        TimeloomModule,
        TimeloomDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveConfigToRun,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"logger": {"class_path": "timeloom.logging.WandbLogger"}},
        parser_kwargs={"parser_mode": "omegaconf+", "description": describe()},
        auto_configure_optimizers=False,
        args=argv,
    )


if __name__ == "__main__":
    main()
