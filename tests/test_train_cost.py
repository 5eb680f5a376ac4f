"""`hypersd bench train-cost` on a tiny SD1.5-shaped model: it times the loop's own step."""

import json

from hypersd.cli import main


def test_train_cost_times_the_loops_step_and_each_pass(tmp_path, tiny_dirs):
    args = ["bench", "train-cost", "--repeats", "1", "--out", str(tmp_path), "--recipe", "hyper-sd-mini:1",
            "--recipe", "hyper-sd-mini:0", "--set", f"model={tiny_dirs['sd15']}", "--set", "stages.0.batch_size=2",
            "--set", "stages.1.batch_size=2", "--set", "lora.rank=4"]
    assert main(args) == 0
    rows = json.loads((tmp_path / "train_cost.json").read_text())["rows"]
    adversarial, plain = rows
    assert adversarial["phases"] == ["student", "critic"] and plain["phases"] == ["student"]
    # the adversarial stage's floor counts the critic's passes; the plain stage's does not
    assert {"generator_term_fwd_bwd", "critic_fwd_bwd"} <= set(adversarial["passes_ms"])
    assert set(plain["passes_ms"]) == {"teacher", "target", "student_fwd_bwd"}
    for row in rows:
        assert row["batch"] == 2 and row["lora_rank"] == 4 and row["step_ms"] > 0 and row["floor_ms"] > 0
    assert "| hyper-sd-mini:1 | tscd | student+critic | 2 |" in (tmp_path / "train_cost.md").read_text()


def test_train_cost_of_a_dmd_stage_counts_both_phases(tmp_path, tiny_dirs):
    args = ["bench", "train-cost", "--repeats", "1", "--out", str(tmp_path), "--recipe", "dmd2-mini:0",
            "--set", f"model={tiny_dirs['sd15']}", "--set", "stages.0.batch_size=2", "--set", "lora.rank=4"]
    assert main(args) == 0
    row, = json.loads((tmp_path / "train_cost.json").read_text())["rows"]
    assert row["phases"] == ["student", "fake"]
    assert set(row["passes_ms"]) == {"generator_fwd_bwd", "real_score", "fake_score", "fake_fwd_bwd"}
