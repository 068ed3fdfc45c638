"""Causal video diffusion (ViD-GPT) with frame prompts and a temporal KV cache.

Importing this package registers its LightningModules with the `timeloom` CLI (entry point group
`timeloom.packages`).
"""

from timeloom_generation.codec import PixelCodec, TokenizerCodec
from timeloom_generation.model import CausalSTDiT, CausalSTDiTConfig, ar_window
from timeloom_generation.module import CausalVDM
from timeloom_generation.sampling import ARSampler, NoiseSource
from timeloom_generation.text import MiniLMTextEncoder, TextConditioner, VocabTextEncoder

__all__ = [
    "ARSampler",
    "CausalSTDiT",
    "CausalSTDiTConfig",
    "CausalVDM",
    "MiniLMTextEncoder",
    "NoiseSource",
    "PixelCodec",
    "TextConditioner",
    "TokenizerCodec",
    "VocabTextEncoder",
    "ar_window",
]

__version__ = "0.1.0"
