"""``hypersd bench realsize`` on the tiny SD1.5 shape: each case runs in its own process through
the loop's StageTrainer and reports a step time and its own peak memory."""

import json

from hypersd.bench.realsize import RealSizeConfig, bench_realsize


def test_realsize_bench_runs_each_case_in_its_own_process(tmp_path):
    cfg = RealSizeConfig(cases=("tscd+gc", "dmd"), model="tiny", rank=4, steps=1, out_dir=str(tmp_path))
    rows = bench_realsize(cfg)
    assert [r["case"] for r in rows] == ["tscd+gc", "dmd"]
    assert all(r["step_s"] > 0 and 0.1 < r["peak_rss_gib"] < 20 for r in rows)
    assert "fake" in rows[1]["phases_step0"]  # DMD's step 0 runs the fake score's phase too
    table = (tmp_path / "tiny.md").read_text()
    assert "| tscd+gc | tscd | yes | no |" in table
    assert json.loads((tmp_path / "tiny.json").read_text())["rows"] == rows
