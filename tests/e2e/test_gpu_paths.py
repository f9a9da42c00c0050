"""The GPU check (python -m finetune.gpu_check) on this machine: what it can run, and why it skips the rest."""

from __future__ import annotations

import pytest


@pytest.mark.e2e
def test_the_gpu_check_runs_what_this_machine_can_and_says_why_it_skips_the_rest(tmp_path):
    """python -m finetune.gpu_check: a real run per row; on CPU Gemini is skipped with its config refusal."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO, run_env

    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, "-m", "finetune.gpu_check", "--only", "torch_ddp.yaml,gemini.yaml", "--steps", "1", "--json", str(out)],
                            cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["torch_ddp.yaml"]["status"] == "pass" and rows["torch_ddp.yaml"]["processes"] == 2
    assert rows["gemini.yaml"]["status"] == "skip" and "needs a CUDA GPU" in rows["gemini.yaml"]["detail"]
    assert result.stdout.splitlines()[-1] == "1 passed, 0 failed, 1 skipped"
