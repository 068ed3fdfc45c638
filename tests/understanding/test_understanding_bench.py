"""`timeloom bench understanding --tiny`: the harness runs end to end and writes what it promises."""

import json

from timeloom_understanding.bench import main


def test_tiny_bench_writes_json_and_markdown(tmp_path):
    assert main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "understanding.json").read_text())
    cells = {(cell["projector"], cell["frames"]): cell for cell in result["latency"]}
    assert set(cells) == {(projector, frames) for projector in ("mlp", "ccam") for frames in (2, 4)}
    assert cells["mlp", 4]["visual_tokens"] == 2 * cells["mlp", 2]["visual_tokens"] == 64  # 16 per frame
    assert cells["ccam", 2]["visual_tokens"] == cells["ccam", 4]["visual_tokens"] == 64  # Q whatever T
    assert all(cell[key] > 0 for cell in cells.values() for key in ("prefill_ms", "decode_ms_per_token"))
    streams = result["streaming"]
    assert [stream["answer_tokens"] for stream in streams] == [1, 2]
    assert all(s["questions"] == 2 and s["speedup"] == s["rebuild_s"] / s["cached_s"] for s in streams)
    report = (tmp_path / "understanding.md").read_text()
    assert "cache reused across questions" in report
    # a section a person adds under the tables survives the next run; the tables are rewritten
    (tmp_path / "understanding.md").write_text(report + "\n## Accuracy (not written by the bench)\n\n| a |\n")
    assert main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rerun = (tmp_path / "understanding.md").read_text()
    assert rerun.count("## Accuracy (not written by the bench)\n\n| a |\n") == 1
    assert rerun.count("# `timeloom bench understanding`") == 1
