"""Suite-wide settings: W&B never touches the network, and runs write under a temporary folder."""

import os
import tempfile

# Set before any test imports wandb; subprocesses (CLI runs) inherit them.
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="timeloom-wandb-"))
os.environ.setdefault("WANDB_SILENT", "true")
