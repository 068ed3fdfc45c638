"""`timeloom bench generation` (spec §7.5): the ideal speedup formula and a tiny cell timed
end to end through the command."""

import json

import torch
from timeloom_generation.bench import main, rollout_ideal, time_chunk, time_rollout


def test_a_cell_times_both_paths_and_reports_the_ideal(random_model):
    model = random_model()
    row = time_chunk(model, prefix=7, chunk=2, steps=20, grid=(8, 8), batch=2, rounds=1)
    assert round(row["ideal"], 2) == 4.29  # spec §7.5: P = 7, C = 2, S = 20
    assert row["batch"] == 2
    for statistic in ("best", "median", "best_cpu"):
        cell = row[statistic]
        assert cell["cached_chunk_s"] > 0 and cell["window_chunk_s"] > 0
        assert cell["speedup"] == cell["window_chunk_s"] / cell["cached_chunk_s"]
        assert cell["of_ideal"] == cell["speedup"] / row["ideal"]
        reads = 19 * cell["read_ms"] + cell["first_read_ms"]  # the first read after the write restages
        assert cell["cached_chunk_s"] == (reads + cell["write_ms"]) / 1e3
        assert cell["cache_overhead"] == cell["read_ms"] / cell["chunk_only_ms"] - 1
    assert round(time_chunk(model, 25, 8, 100, (8, 8), 1, rounds=1)["ideal"], 2) == 4.08


def test_a_rollout_is_timed_in_both_modes_against_the_frames_each_runs(random_model):
    # chunks [0, 3) and [3, 5): windowed 2·(0 + 3) + 2·(3 + 2) frames, cached 2·3 + 2·2 + a write of 3
    assert rollout_ideal(frames=5, prefix=3, chunk=2, steps=2) == 16 / 13
    row = time_rollout(random_model(), frames=5, prefix=3, chunk=2, steps=2, grid=(8, 8), batch=2)
    assert row["cached_s"] > 0 and row["window_s"] > 0
    assert row["of_ideal"] == row["window_s"] / row["cached_s"] / row["ideal"]


def test_the_command_writes_json_and_markdown(tmp_path, monkeypatch):
    import timeloom_generation.bench as bench

    monkeypatch.setattr(bench, "GRID", [(3, 2, 2)])
    threads = torch.get_num_threads()
    try:
        argv = [
            "--out",
            str(tmp_path),
            "--size",
            "8",
            "--rounds",
            "1",
            "--device",
            "cpu",
            "--batch",
            "1",
            "2",
        ]
        argv += ["--rollout-frames", "3", "--rollout-batch", "2"]
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # the command pins one thread
    result = json.loads((tmp_path / "generation.json").read_text())
    assert result["environment"]["threads"] == 1 and [r["batch"] for r in result["rows"]] == [1, 2]
    assert "| 2 | 3 | 2 | 2 |" in (tmp_path / "generation.md").read_text()
    assert [r["batch"] for r in result["rollouts"]] == [2]
