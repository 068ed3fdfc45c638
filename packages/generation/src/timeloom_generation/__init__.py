"""Causal video diffusion (ViD-GPT) with frame prompts, a KV cache, and BroadWay / VSTAR guidance.

Importing this package registers its LightningModules with the `timeloom` CLI (entry point group
`timeloom.packages`). The models land with the generation issue.
"""

__version__ = "0.1.0"
