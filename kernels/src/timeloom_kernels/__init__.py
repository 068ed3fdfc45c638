"""timeloom_kernels: every attention in timeloom goes through here."""

__version__ = "0.1.0"
