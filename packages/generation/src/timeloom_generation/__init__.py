"""Causal video diffusion (ViD-GPT) with frame prompts and a temporal KV cache, plus the training-free
temporal plug-ins BroadWay (ByTheWay) and VSTAR's attention regularisation.

Importing this package registers its LightningModules and data modules with the `timeloom` CLI (entry point group
`timeloom.packages`).
"""

from timeloom_generation.broadway import BroadWay
from timeloom_generation.codec import PixelCodec, TokenizerCodec
from timeloom_generation.latents import MovingDigitsLatentsDataModule
from timeloom_generation.model import CausalSTDiT, CausalSTDiTConfig
from timeloom_generation.module import CausalVDM
from timeloom_generation.sampling import ARSampler, NoiseSource
from timeloom_generation.text import MiniLMTextEncoder, TextConditioner, VocabTextEncoder
from timeloom_generation.vstar import TemporalAttentionRegularization

__all__ = [
    "ARSampler",
    "BroadWay",
    "CausalSTDiT",
    "CausalSTDiTConfig",
    "CausalVDM",
    "MiniLMTextEncoder",
    "MovingDigitsLatentsDataModule",
    "NoiseSource",
    "PixelCodec",
    "TemporalAttentionRegularization",
    "TextConditioner",
    "TokenizerCodec",
    "VocabTextEncoder",
]

__version__ = "0.1.0"
