"""Linear and recurrent attention: Lightning Attention-2, LightNet's additive recurrence, Aaren's prefix scan.

Every op has the signature `op(q, k, v, ..., causal=True, initial_state=None, output_final_state=False,
[chunk_size=64,] backend="auto") -> (o, final_state)` on the `(B, H, L, D)` layout, and a readable reference
(`naive.py`) beside its fast form.
"""

from timeloom_kernels.linear.aaren import AarenState, aaren_attention
from timeloom_kernels.linear.lightnet import LightNetState, lightnet_attention
from timeloom_kernels.linear.lightning import alibi_decay, lightning_attention

__all__ = [
    "AarenState",
    "LightNetState",
    "aaren_attention",
    "alibi_decay",
    "lightnet_attention",
    "lightning_attention",
]
