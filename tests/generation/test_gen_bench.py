"""`timeloom bench generation` (spec §7.5): the ideal speedup formula and a tiny cell timed end to end."""

from timeloom_generation.bench import Budget, time_chunk


def test_a_cell_times_both_paths_and_reports_the_ideal(random_model):
    model = random_model()
    quick = Budget(warmup_s=0.0, min_runs=1, max_runs=1, budget_s=0.0)
    row = time_chunk(model, prefix=7, chunk=2, steps=20, grid=(8, 8), batch=1, budget=quick)
    assert round(row["ideal"], 2) == 4.29  # spec §7.5: P = 7, C = 2, S = 20
    assert row["cached_chunk_s"] > 0 and row["window_chunk_s"] > 0
    assert row["speedup"] == row["window_chunk_s"] / row["cached_chunk_s"]
    assert round(time_chunk(model, 25, 8, 100, (8, 8), 1, quick)["ideal"], 2) == 4.08
