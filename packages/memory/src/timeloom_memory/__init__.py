"""Long-term memory for sequence models: Titans (LMM, MAC, MAG, MAL), HCAM, a video memory, and recall tasks.

Importing this package registers its LightningModules and DataModules with the `timeloom` CLI (entry point
group `timeloom.packages`).
"""

from timeloom_memory.hcam import HCAMAttention, HCAMState
from timeloom_memory.module import MemoryLMModule
from timeloom_memory.neural_memory import NeuralMemory, NeuralMemoryConfig, NeuralMemoryState
from timeloom_memory.tasks import (
    MQAR,
    SNIAH,
    MQARDataModule,
    SelectiveCopying,
    SelectiveCopyingDataModule,
    SNIAHDataModule,
)
from timeloom_memory.titans import TitansConfig, TitansLM
from timeloom_memory.video import VideoMemory, VideoMemoryConfig, VideoRecallModule
from timeloom_memory.video_tasks import LongVideoRecall, LongVideoRecallDataModule

__all__ = [
    "MQAR",
    "SNIAH",
    "HCAMAttention",
    "HCAMState",
    "LongVideoRecall",
    "LongVideoRecallDataModule",
    "MQARDataModule",
    "MemoryLMModule",
    "NeuralMemory",
    "NeuralMemoryConfig",
    "NeuralMemoryState",
    "SNIAHDataModule",
    "SelectiveCopying",
    "SelectiveCopyingDataModule",
    "TitansConfig",
    "TitansLM",
    "VideoMemory",
    "VideoMemoryConfig",
    "VideoRecallModule",
]

__version__ = "0.1.0"
