"""timeloom_kernels: every attention in timeloom goes through here.

- `attend` is the one entry point for softmax attention; `Attend` is the module form that processors reach.
- `timeloom_kernels.masks`: the mask algebra (one predicate per mask, materialised per backend).
- `timeloom_kernels.positions`: RoPE 1-D / axial, TC-LLaVA TAD-RoPE, CCA concentric ids.
- `timeloom_kernels.kv_cache`: `KVCache` / `KVCacheStack` for decoding, diffusion and memory.
- `timeloom_kernels.linear`: Lightning Attention-2, LightNet, Aaren, each beside a naive reference.
"""

from timeloom_kernels import linear, masks, positions
from timeloom_kernels.attention import attend, select_backend
from timeloom_kernels.kv_cache import KVCache, KVCacheStack
from timeloom_kernels.masks import Mask
from timeloom_kernels.processors import (
    Attend,
    AttentionStore,
    attention_context,
    clear_processors,
    name_attention_layers,
    set_processor,
)

__version__ = "0.1.0"

__all__ = [
    "Attend",
    "AttentionStore",
    "KVCache",
    "KVCacheStack",
    "Mask",
    "attend",
    "attention_context",
    "clear_processors",
    "linear",
    "masks",
    "name_attention_layers",
    "positions",
    "select_backend",
    "set_processor",
]
