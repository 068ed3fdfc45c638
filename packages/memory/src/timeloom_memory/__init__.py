"""Long-term memory for sequence models: Titans (LMM, MAC, MAG, MAL), HCAM, and recall tasks.

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

__all__ = [
    "MQAR",
    "SNIAH",
    "HCAMAttention",
    "HCAMState",
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
]

__version__ = "0.1.0"
