"""Networks under FSDP: torch's FSDP runs on CPU processes (accelerate's FSDP plugin does not:
it requires an accelerator), so this drives the sharded path of ``Networks`` directly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_sharded_student_weights_are_read_averaged_and_loaded_whole(tmp_path, kind):
    out = tmp_path / "result.json"
    worker = Path(__file__).with_name("fsdp_networks_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={29600 + (kind == 'lora')}", str(worker), kind, str(out)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads(out.read_text())
    for r in ranks:
        assert r["shapes_full"], "a sharded role's state must come back whole"
        assert r["target_between"] > 0  # the EMA moved the target towards the updated student
        assert r["reload_equal"]
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-12)  # one model
