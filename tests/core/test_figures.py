"""Figures of masks and attention maps render, and show what the masks allow."""

import torch
from timeloom_kernels import Attend, AttentionStore, attention_context, masks, set_processor
from torch import nn

from timeloom.figures import plot_attention_maps, plot_masks, plot_reconstructions


def test_mask_panels_show_the_dense_pattern(tmp_path):
    figure = plot_masks({"causal": masks.causal(), "frames": masks.block_causal(3)}, q_len=9)
    panels = [ax for ax in figure.axes if ax.images]
    assert [ax.get_title().splitlines()[0] for ax in panels] == ["causal", "frames"]
    shown = panels[1].images[0].get_array()
    assert (shown == masks.block_causal(3).dense(1, 1, 9, 9)[0, 0].numpy()).all()
    assert "56% allowed" in panels[0].get_title()  # 45 of 81 pairs
    figure.savefig(tmp_path / "masks.png")
    assert (tmp_path / "masks.png").stat().st_size > 1000


def test_attention_maps_from_a_store(tmp_path):
    class TwoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = Attend(), Attend()

        def forward(self, x):
            return self.second(self.first(x, x, x, masks.causal()), x, x, masks.causal())

    model, store = TwoLayers(), AttentionStore()
    set_processor(model, "*", store)
    with attention_context(step=0, num_steps=1):
        model(torch.randn(2, 2, 6, 4))
    figure = plot_attention_maps(store.maps)
    assert [ax.get_title() for ax in figure.axes if ax.images] == ["first", "second"]
    figure.savefig(tmp_path / "maps.png")
    assert (tmp_path / "maps.png").stat().st_size > 1000


def test_reconstruction_filmstrips_show_input_over_reconstruction_at_spread_frames(tmp_path):
    grey = torch.linspace(-1, 1, 9).view(1, 9, 1, 1).expand(1, 9, 4, 4)
    colour = torch.zeros(3, 3, 4, 4)  # shorter than the frames asked for: every frame once
    figure = plot_reconstructions({"grey": (grey, -grey), "colour": (colour, colour)}, frames=4)
    grey_panel, colour_panel = figure.subfigs
    assert grey_panel._suptitle.get_text() == "grey"
    shown = [ax for ax in grey_panel.axes if ax.images]
    assert [ax.get_title() for ax in shown[:4]] == ["t=0", "t=3", "t=5", "t=8"]
    # input row over reconstruction row, mapped from [-1, 1] to [0, 1]
    assert shown[0].images[0].get_array()[0, 0] == 0.0 and shown[4].images[0].get_array()[0, 0] == 1.0
    assert len([ax for ax in colour_panel.axes if ax.images]) == 6
    figure.savefig(tmp_path / "filmstrips.png")
    assert (tmp_path / "filmstrips.png").stat().st_size > 1000
