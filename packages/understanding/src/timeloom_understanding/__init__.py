"""Video-LLMs with temporal attention structure: Video-CCAM, TC-LLaVA, AKI, CCA, LITA, PINE.

Importing this package registers its LightningModule and data module with the `timeloom` CLI (entry point
group `timeloom.packages`), so configs name them by their short names.
"""

from timeloom_understanding.data import ConversationDataset, TemporalQA, TemporalQADataModule
from timeloom_understanding.hf_backbone import LLMConfig
from timeloom_understanding.layouts import STRUCTURES, TokenLayout, make_structure
from timeloom_understanding.model import VideoLLM, VideoLLMConfig
from timeloom_understanding.module import VideoLLMModule
from timeloom_understanding.pine import OptionSpans, option_segments
from timeloom_understanding.projectors import CCAMProjector, MLPProjector, SlowFastProjector
from timeloom_understanding.streaming import OnlineStream
from timeloom_understanding.time_tokens import TimedAnswer, render
from timeloom_understanding.vision_pretraining import DigitPatchesDataModule, DigitPatchModule

__all__ = [
    "STRUCTURES",
    "CCAMProjector",
    "ConversationDataset",
    "DigitPatchModule",
    "DigitPatchesDataModule",
    "LLMConfig",
    "MLPProjector",
    "OnlineStream",
    "OptionSpans",
    "SlowFastProjector",
    "TemporalQA",
    "TemporalQADataModule",
    "TimedAnswer",
    "TokenLayout",
    "VideoLLM",
    "VideoLLMConfig",
    "VideoLLMModule",
    "make_structure",
    "option_segments",
    "render",
]

__version__ = "0.1.0"
