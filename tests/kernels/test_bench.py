"""`timeloom bench kernels --tiny`: the harness runs end to end and writes consistent JSON and Markdown."""

import json

import pytest
from timeloom_kernels.bench import HAND_WRITTEN, PATTERNS, crossover, iqr_mean, main, write_report


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    cells = [json.loads(line) for line in (out / "kernels.jsonl").read_text().splitlines()]
    summary = json.loads((out / "kernels_summary.json").read_text())
    return cells, summary, (out / "kernels.md").read_text()


def test_cells_cover_every_section_with_environment(tiny_run):
    cells, _, _ = tiny_run
    for cell in cells:
        assert {
            "device",
            "torch",
            "dtype",
            "pattern",
            "backend",
            "q_len",
            "kv_len",
            "fwd_ms",
            "fwd_bwd_ms",
        } <= set(cell)
        assert cell["device"] == "cpu" and cell["dtype"] == "float32"
        assert cell["status"] == "ok" or cell["reason"]
        if cell["status"] == "ok":
            assert cell["fwd_ms"] > 0
    cab = [c for c in cells if c["section"] == "cab"]
    assert {c["pattern"] for c in cab} == set(PATTERNS)
    ok = {(c["pattern"], c["backend"]) for c in cab if c["status"] == "ok"}
    assert {
        ("NS", "lightning"),
        ("CS", "lightning"),
        ("CS", "vanilla"),
        ("CS", "sdpa"),
        ("CC", "reference"),
    } <= ok
    shortest = min(c["q_len"] for c in cab if c["pattern"] == "CS")
    first = [c for c in cab if c["q_len"] == shortest and c["backend"] in ("sdpa", "lightning")]
    assert first and all(c["fwd_bwd_ms"] > 0 for c in first)  # longer cells may be skipped by projected time
    # Lightning is a self-attention op; flex has no backward pass on CPU
    assert not any(c["backend"] == "lightning" for c in cab if c["pattern"] in ("NC", "CC"))
    flex = [c for c in cab if c["backend"] == "flex" and c["status"] == "ok"]
    assert flex and all(c["fwd_bwd_ms"] is None and "backward" in c["reason"] for c in flex)
    block = {c["backend"]: c for c in cells if c["section"] == "block_causal"}
    assert block["sdpa_dense"]["status"] == "ok" and block["tiled"]["status"] == "ok"
    assert block["flex_compiled"]["status"] == "skipped"
    assert sorted(c["q_len"] for c in cells if c["section"] == "lightning") == [64, 256]


def test_summary_and_markdown_agree(tiny_run):
    _, summary, markdown = tiny_run
    assert set(summary["efficiency_length"]) == {
        f"{p}/{m}/{b}"
        for p in ("NS", "CS")
        for m in ("fwd_ms", "fwd_bwd_ms")
        for b in ("vanilla", "best_exact")
    }
    block = summary["block_causal"]
    assert block["speedup"] == pytest.approx(block["baseline_ms"] / block["best_ms"])
    assert block["ideal"] == pytest.approx(1 / (5 / 8))  # 4 frames: 10 of 16 blocks
    scaling = summary["lightning_scaling"]
    assert scaling["length_ratio"] == 4 and scaling["ratio"] > 0
    for heading in (
        "## NS",
        "## CS",
        "## NC",
        "## CC",
        "Efficiency length",
        "Block-causal",
        "Lightning Attention-2",
    ):
        assert heading in markdown
    assert f"{scaling['ratio']:.1f}" in markdown


def test_iqr_mean_drops_outliers():
    assert iqr_mean([1.0, 1.0, 1.1, 0.9, 1.0, 50.0, 0.01, 1.05]) == pytest.approx(1.0, abs=0.05)
    assert iqr_mean([2.0, 4.0]) == 3.0


def test_crossover_of_quadratic_and_linear_fits():
    lengths = [256, 512, 1024, 2048]
    quadratic = [1e-4 * n * n for n in lengths]
    linear = [0.2 * n for n in lengths]  # equal at n = 2000
    assert crossover(lengths, quadratic, linear) == pytest.approx(2000, rel=1e-6)
    assert crossover(lengths, [0.1 * n for n in lengths], linear) is None  # the baseline is always faster
    assert crossover(lengths, [1e-4 * n * n + 500 for n in lengths], linear) == 0.0  # never faster


def test_a_bench_report_keeps_the_sections_a_person_marked_as_hand_written(tmp_path):
    report = tmp_path / "suite.md"
    write_report(report, "# bench\n\n| old table |\n")
    assert report.read_text() == "# bench\n\n| old table |\n"
    report.write_text(
        report.read_text() + f"\nnotes lost on a rerun\n\n## Study {HAND_WRITTEN}\n\n| kept |\n"
    )
    write_report(report, "# bench\n\n| new table |")
    assert report.read_text() == f"# bench\n\n| new table |\n\n## Study {HAND_WRITTEN}\n\n| kept |\n"
