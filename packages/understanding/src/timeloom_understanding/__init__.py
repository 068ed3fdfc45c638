"""Video-LLMs with temporal attention structure: Video-CCAM, TC-LLaVA, AKI, CCA, LITA, PINE.

Importing this package registers its LightningModules with the `timeloom` CLI (entry point group
`timeloom.packages`). The models land with the understanding issue.
"""

__version__ = "0.1.0"
