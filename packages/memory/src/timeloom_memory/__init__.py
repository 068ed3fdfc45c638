"""Long-term memory for sequence models: Titans (MAC, MAG, MAL), HCAM, EM-LLM.

Importing this package registers its LightningModules with the `timeloom` CLI (entry point group
`timeloom.packages`). The models land with the memory issue.
"""

__version__ = "0.1.0"
