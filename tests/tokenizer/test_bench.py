"""`timeloom bench tokenizer --tiny`: the suite runs through the CLI and writes consistent JSON and Markdown,
and its FLOP counts equal a count by hand."""

import json

import pytest
import torch
from timeloom_tokenizer.bench import CPU_PRESETS, tiny_config

from timeloom.cli import main as timeloom_main
from timeloom.throughput import flop_counter


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    timeloom_main(["bench", "tokenizer", "--tiny", "--device", "cpu", "--out", str(out)])
    return json.loads((out / "tokenizer.json").read_text()), (out / "tokenizer.md").read_text()


def forward_flops(config, batch: int, frames: int, size: int) -> dict[str, int]:
    """Multiply-adds × 2 of one forward pass, by hand, split by how the backward pass costs them.

    `sdpa`: attention through the fused kernel, whose backward recomputes the scores (5 matmuls to the
    forward's 2). `matmul`: everything else (linears, the window attention, whose learned bias needs a
    gradient and so runs unfused, one sequence per window, and the depth-wise PEG convs), whose backward
    costs twice the forward.
    """
    p, t, d = config.patch, config.temporal_patch, config.dim
    inner, ff, c = config.heads * config.head_dim, config.feedforward_dim, config.channels
    latent_frames, side = 1 + (frames - 1) // t, size // p
    grid = side * side
    tokens = batch * latent_frames * grid

    def linear(rows: int, fan_in: int, fan_out: int) -> int:
        return 2 * rows * fan_in * fan_out

    def scores(sequences: int, length: int) -> int:  # q·kᵀ and p·v
        return 2 * 2 * sequences * length * length * inner

    projections = linear(tokens, d, 3 * inner) + linear(tokens, inner, d)
    feedforward = linear(tokens, d, 2 * ff) + linear(tokens, ff, d)
    peg = 2 * 27 * d * tokens  # depth-wise 3×3×3: 27 multiply-adds per channel and token
    spatial, temporal = scores(batch * latent_frames, grid), scores(batch * grid, latent_frames)
    windowed = scores(batch * latent_frames * grid // config.window**2, config.window**2)

    matmul = linear(batch * grid, c * p * p, d) + linear(batch * (latent_frames - 1) * grid, c * t * p * p, d)
    matmul += linear(tokens, d, 2 * config.latent_dim) + linear(
        tokens, config.latent_dim, d
    )  # KL: mean, log-var
    matmul += linear(batch * grid, d, c * p * p) + linear(
        batch * (latent_frames - 1) * grid, d, c * t * p * p
    )
    sdpa = 0
    for kind in config.encoder_spatial:
        matmul += projections + feedforward
        if kind == "t":
            matmul += peg
            sdpa += spatial
        else:
            matmul += windowed
    temporal_blocks = config.encoder_temporal_depth + config.decoder_temporal_depth
    matmul += temporal_blocks * (projections + feedforward + peg)
    sdpa += temporal_blocks * temporal
    matmul += config.decoder_spatial_depth * (projections + feedforward + peg)
    sdpa += config.decoder_spatial_depth * spatial
    return {"matmul": matmul, "sdpa": sdpa}


def test_cells_cover_widths_inputs_and_discriminators(tiny_run):
    result, _ = tiny_run
    assert result["environment"]["device"] == "cpu" and result["environment"]["dtype"] == "float32"
    assert result["peak_flops"] > 0 and result["wall_s"] > 0
    assert result["load_average"]["cpus"] >= 1
    assert {(c["input"], c["discriminator"]) for c in result["train"]} == {
        ("image", "none"),
        ("image", "2d"),
        ("clip", "none"),
        ("clip", "3d"),
    }
    assert {c["input"] for c in result["latency"]} == {"image", "clip", "long_clip"}
    inputs = CPU_PRESETS["tiny"].widths["tiny"]
    for cell in result["train"]:
        assert cell["width"] == "tiny" and cell["runs"] >= 1
        for name in ("params", "flops", "step_ms", "clips_per_s", "tokens_per_s", "flops_per_s", "mfu"):
            assert cell[name] > 0, name
        seconds = cell["step_ms"] / 1e3
        assert cell["clips_per_s"] == pytest.approx(inputs.batch / seconds)
        assert cell["tokens_per_s"] == pytest.approx(cell["tokens"] / seconds)
        assert cell["mfu"] == pytest.approx(cell["flops"] / seconds / result["peak_flops"])
        assert (cell["discriminator_params"] > 0) == (cell["discriminator"] != "none")
    for cell in result["latency"]:
        for name in ("encode_ms", "decode_ms", "encode_flops", "decode_flops"):
            assert cell[name] > 0, name
        assert cell["encode_ms_per_frame"] == pytest.approx(cell["encode_ms"] / cell["frames"])
    frames = {c["input"]: c["frames"] for c in result["latency"]}
    assert frames == {"image": 1, "clip": inputs.clip_frames, "long_clip": inputs.long_frames}


def test_flops_equal_a_count_by_hand(tiny_run):
    result, _ = tiny_run
    config, inputs = tiny_config(), CPU_PRESETS["tiny"].widths["tiny"]
    cells = {(c["input"], c["discriminator"]): c for c in result["train"]}
    latency = {c["input"]: c for c in result["latency"]}
    for input_kind, frames in (("image", 1), ("clip", inputs.clip_frames)):
        forward = forward_flops(config, inputs.batch, frames, inputs.size)
        # backward: twice the forward for matmuls; 5 of the fused attention's 2 forward matmuls
        step = 3 * forward["matmul"] + forward["sdpa"] * 7 // 2
        assert cells[input_kind, "none"]["flops"] == step, input_kind
        assert (
            cells[input_kind, "none"]["tokens"]
            == inputs.batch * (1 + (frames - 1) // 2) * (inputs.size // 4) ** 2
        )
        # the discriminator adds work to the step, never removes any
        discriminator = "2d" if input_kind == "image" else "3d"
        assert cells[input_kind, discriminator]["flops"] > step
        one = forward_flops(config, 1, frames, inputs.size)
        assert latency[input_kind]["encode_flops"] + latency[input_kind]["decode_flops"] == sum(one.values())


def test_grouped_conv_backward_counts_grouped_work():
    """torch's table counts a depth-wise conv's weight gradient as a dense conv's; ours does not."""
    conv = torch.nn.Conv3d(8, 8, 3, groups=8, padding=1)
    x = torch.randn(2, 8, 3, 4, 4, requires_grad=True)
    with flop_counter() as counter:
        conv(x).sum().backward()
    forward = 2 * 27 * 8 * 2 * 3 * 4 * 4
    assert counter.get_total_flops() == 3 * forward  # forward, input gradient, weight gradient


def test_markdown_reports_the_same_numbers(tiny_run):
    result, markdown = tiny_run
    assert "## Training step" in markdown and "## Encode / decode latency" in markdown
    assert "Machine load" in markdown and "## Summary" in markdown
    steps = {(c["input"], c["discriminator"]): c["step_ms"] for c in result["train"]}
    summary = result["summary"]["tiny"]
    assert summary["discriminator_cost_clip"] == pytest.approx(steps["clip", "3d"] / steps["clip", "none"])
    assert f"{summary['discriminator_cost_image']:.3g}x" in markdown
    for cell in result["train"]:
        assert f"{cell['step_ms']:.1f}" in markdown
    for cell in result["latency"]:
        assert f"{cell['encode_ms']:.2f}" in markdown
