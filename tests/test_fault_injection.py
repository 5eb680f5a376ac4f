"""The fault-injection command, shortened: three SIGKILLs, then the run must finish with the
uninterrupted run's LoRAs bit for bit (`python scripts/fault_injection.py` does twenty)."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fault_injection.py"


@pytest.mark.slow
def test_three_kills_are_survived_bit_for_bit(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--kills", "3", "--out", str(tmp_path / "work"),
                          "--report", str(tmp_path / "report")], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "3 SIGKILLs of 3 planned" in out.stdout and "all equal, bit for bit" in out.stdout
