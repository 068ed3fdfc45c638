"""Regenerate docs/masks.png, the README's gallery of the mask constructors: python scripts/mask_gallery.py"""

from pathlib import Path

import torch
from timeloom_kernels import masks as M

from timeloom.figures import plot_masks

L = 24
masks = {
    "causal": M.causal(),
    "block_causal(4)": M.block_causal(4),
    "sliding_window(5)": M.sliding_window(5),
    "frame_window(4, 2)": M.frame_window(4, 2),
    "spatial_window(2x2 in 4x4)": M.spatial_window(4, 4, 2, 2),
    "prefix(8, full, causal)": M.prefix(8, M.full(), M.causal()),
    "FBCAM: causal | same_frame": M.causal() | M.same_frame([[(4, 20)]], 4),
    "concentric (CCA, 4x4 image)": M.concentric([[(4, 20)]], 4, 4),
    "modality_mutual (AKI)": M.modality_mutual(4, 16, 20),
    "segment_bidirectional (PINE)": M.segment_bidirectional(
        torch.tensor([[0] * 4 + [1] * 6 + [2] * 6 + [0] * 8])
    ),
    "chunk(6, causal)": M.chunk(6, causal_within=True),
    "sliding_window(8) & block_causal(4)": M.sliding_window(8) & M.block_causal(4),
}
plot_masks(masks, L).savefig(Path(__file__).resolve().parents[1] / "docs/masks.png", dpi=80)
