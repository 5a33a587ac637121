"""The crash benchmark as a (slow) test: SIGKILL a run at random steps, some during
checkpoint writes, resume each time with the same command, and land on the uninterrupted
run's weights exactly. `make test-all` runs it; `benchmarks/crash_resume.py` is the full
10-kill version."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


@pytest.mark.slow
def test_sigkill_resume_is_exact(tmp_path):
    out = tmp_path / "crash.json"
    p = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "crash_resume.py"),
                        "--kills", "4", "--steps", "48", "--seed", "3", "--work", str(tmp_path / "w"),
                        "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(out.read_text())
    assert r["resumes_succeeded"] == r["resumes_attempted"] == 4
    assert r["killed_during_checkpoint_write"] >= 1
    assert r["max_abs_diff"] == {"model": 0.0, "ema": 0.0, "optimizer": 0.0}
    assert r["max_abs_loss_diff"] == 0.0 and r["logged_steps_equal"]
