"""Models that ship with the core: small, real, and used by the quick-start demo and the core tests."""

from timeloom.models.autoencoder import CausalVideoAutoencoder, VideoAutoencoder, VideoAutoencoderConfig

__all__ = ["CausalVideoAutoencoder", "VideoAutoencoder", "VideoAutoencoderConfig"]
