"""The README's demo script runs, and cannot look like success when its model does not work."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "quickstart.py"


def test_quickstart_exits_nonzero_when_continuations_are_mostly_wrong(tmp_path):
    # One optimizer step cannot learn the task, so every layout's continuations are wrong: the demo must fail.
    run = subprocess.run([sys.executable, str(SCRIPT), "--steps", "1", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "FAILED: fewer than 50% exact continuations" in run.stderr
    assert "reloaded: TensorAttnForCausalLM + TensorAttnByteTokenizer" in run.stdout
    assert run.stdout.count("continuations exact") == 4  # every layout was tried before failing
