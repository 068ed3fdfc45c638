"""OmniTokenizer: one tokenizer for images (T=1) and videos, with VQ, KL and LFQ bottlenecks.

Importing this package registers its LightningModules with the `timeloom` CLI (entry point group
`timeloom.packages`). The models land with the tokenizer issue.
"""

from timeloom_tokenizer.model import OmniTokenizer, OmniTokenizerConfig
from timeloom_tokenizer.module import OmniTokenizerModule, TokenizerLossConfig
from timeloom_tokenizer.quantizers import (
    DiagonalGaussian,
    EMAVectorQuantizer,
    LookupFreeQuantizer,
    Quantizer,
    QuantizerOutput,
)

__all__ = [
    "DiagonalGaussian",
    "EMAVectorQuantizer",
    "LookupFreeQuantizer",
    "OmniTokenizer",
    "OmniTokenizerConfig",
    "OmniTokenizerModule",
    "Quantizer",
    "QuantizerOutput",
    "TokenizerLossConfig",
]

__version__ = "0.1.0"
