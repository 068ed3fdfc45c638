"""timeloom: the shared core (LightningModule base, data, logging, video I/O) and the `timeloom` CLI."""

__version__ = "0.1.0"
