"""W&B by default: online with an API key, offline (and saying so) without one."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info


def wandb_has_api_key() -> bool:
    """True when W&B could authenticate: ``WANDB_API_KEY`` is set or ``~/.netrc`` holds the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class WandbLogger(LightningWandbLogger):
    """Lightning's `WandbLogger`, offline unless an API key is configured or ``WANDB_MODE`` says otherwise.

    Offline runs live under ``<save_dir>/wandb/offline-run-*``; ``wandb sync <that folder>`` uploads them later.
    """

    def __init__(
        self, project: str = "timeloom", save_dir: str = "runs", offline: bool | None = None, **kwargs: Any
    ):
        self._reason = "set offline" if offline else ""
        if offline is None:
            # "disabled" stays disabled: were it passed on as offline, Lightning would set WANDB_MODE=dryrun
            # for the rest of the process.
            offline = (
                os.environ.get("WANDB_MODE", "") not in ("online", "disabled") and not wandb_has_api_key()
            )
            self._reason = "no API key"
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(project=project, save_dir=save_dir, offline=offline, **kwargs)
        self._announce_offline = offline

    @property
    def experiment(self):
        run = super().experiment
        if self._announce_offline and getattr(run, "dir", None):
            self._announce_offline = False
            run_dir = Path(run.dir).parent
            rank_zero_info(
                f"W&B is offline ({self._reason}): this run lives in {run_dir}. "
                f"Upload it with `wandb sync {run_dir}`."
            )
        return run
