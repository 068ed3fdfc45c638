"""Pictures: mask patterns, collected attention maps and reconstructions (matplotlib figures).

Both return a `matplotlib.figure.Figure`; save it (``fig.savefig("masks.png")``) or log it to W&B
(``wandb.Image(fig)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")  # figures are files and W&B media here, never windows

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from timeloom_kernels.masks import Mask  # noqa: E402


def _grid(count: int, columns: int) -> tuple[int, int]:
    columns = min(columns, count)
    return math.ceil(count / columns), columns


def plot_masks(
    masks: Mapping[str, Mask], q_len: int, kv_len: int | None = None, *, columns: int = 4, sample: int = 0
) -> Figure:
    """One panel per mask: which keys (columns) each query (row) may attend to, allowed in dark.

    Batched masks show ``sample``; each title gives the share of allowed pairs.
    """
    kv_len = q_len if kv_len is None else kv_len
    rows, columns = _grid(len(masks), columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, mask) in zip(axes.flat, masks.items()):
        allowed = mask.dense(max(mask.batch_size, sample + 1), 1, q_len, kv_len)[sample, 0]
        ax.imshow(allowed.cpu().numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{title}\n{allowed.float().mean().item():.0%} allowed", fontsize=9)
    figure.tight_layout()
    return figure


def plot_attention_maps(maps: Mapping[str, torch.Tensor], *, columns: int = 4, sample: int = 0) -> Figure:
    """One panel per layer of attention probabilities ``(B, Lq, Lk)`` (e.g. `AttentionStore.maps`).

    A list of maps per layer (one per call) is averaged, so a sampler's steps show as one picture.
    """
    rows, columns = _grid(len(maps), columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.8 * columns, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, value) in zip(axes.flat, maps.items()):
        probs = torch.stack(list(value)).mean(0) if isinstance(value, (list, tuple)) else value
        ax.imshow(probs[sample].float().cpu().numpy(), cmap="viridis", interpolation="nearest")
        ax.set_title(name, fontsize=8)
    figure.tight_layout()
    return figure


def plot_reconstructions(
    clips: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    frames: int = 8,
    captions: Mapping[str, str] = {},
) -> Figure:
    """Filmstrips of ``name -> (input, reconstruction)`` videos ``(C, T, H, W)`` in [-1, 1]: for each clip an
    input row above a reconstruction row, ``frames`` frames spread evenly over the clip."""
    figure = plt.figure(figsize=(1.2 * frames + 1, 3.0 * len(clips)), layout="constrained")
    for panel, (name, pair) in zip(figure.subfigures(len(clips), 1, squeeze=False).flat, clips.items()):
        panel.suptitle(captions.get(name, name), fontsize=9, x=0.02, ha="left")
        length = pair[0].shape[1]
        shown = torch.linspace(0, length - 1, min(frames, length)).round().long()
        axes = panel.subplots(2, len(shown), squeeze=False)
        for row, (label, video) in enumerate(zip(("input", "reconstruction"), pair)):
            pictures = ((video.detach().float().cpu().clamp(-1, 1) + 1) / 2)[:, shown].permute(1, 2, 3, 0)
            for ax, picture, frame in zip(axes[row], pictures, shown.tolist()):
                gray = picture.shape[-1] == 1
                ax.imshow(
                    picture.squeeze(-1) if gray else picture, cmap="gray" if gray else None, vmin=0, vmax=1
                )
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"t={frame}", fontsize=7)
            axes[row, 0].set_ylabel(label, fontsize=8)
    return figure
