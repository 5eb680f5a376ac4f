"""`hypersd bench train-cost` on a tiny SD1.5-shaped model."""

import json

from hypersd.cli import main


def test_train_cost_times_a_step_and_its_passes(tmp_path, tiny_dirs):
    args = ["bench", "train-cost", "--repeats", "1", "--out", str(tmp_path), "--recipe", "hyper-sd-mini",
            "--set", f"model={tiny_dirs['sd15']}", "--set", "stages.1.batch_size=2", "--set", "lora.rank=4"]
    assert main(args) == 0
    result = json.loads((tmp_path / "train_cost.json").read_text())
    assert result["lora_rank"] == 4 and result["batch"] == 2
    parts = result["teacher_cfg_ms"] + result["target_ms"] + result["student_fwd_bwd_ms"]
    assert abs(result["floor_ms"] - parts) < 1e-6 and result["step_ms"] > 0
    assert "LoRA rank 4" in (tmp_path / "train_cost.md").read_text()
