"""The README's demo script runs, and cannot look like success when its model does not work."""

import subprocess
import sys
from pathlib import Path

from hf_tensor_attn.cache import LAYOUTS

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "quickstart.py"


def test_quickstart_exits_nonzero_when_continuations_are_mostly_wrong(tmp_path):
    # One optimizer step cannot learn the task, so every layout's continuations are wrong: the demo must fail.
    run = subprocess.run([sys.executable, str(SCRIPT), "--steps", "1", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "FAILED: fewer than 50% exact continuations" in run.stderr
    assert "reloaded: TensorAttnForCausalLM + TensorAttnByteTokenizer" in run.stdout
    # every exact layout was tried before failing
    assert run.stdout.count("continuations exact") == sum(not c.changes_the_kernel for c in LAYOUTS.values())
