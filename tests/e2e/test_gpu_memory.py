"""Issue 15 on CPU: the fit check stops a run before any weights load, and warns and goes on when asked."""

from __future__ import annotations

import pytest

from tests.conftest import run_train


@pytest.mark.e2e
def test_fit_check_stops_before_weights_load_and_warn_goes_on(tmp_path, instruction_file):
    args = [f"data.train_path={instruction_file}", "model.name=tiny-gpt2", "method=full", "train.max_steps=1", "eval.num_generation_prompts=0"]
    refused = run_train([*args, f"output_dir={tmp_path / 'a'}"], env={"FINETUNE_AVAILABLE_BYTES": str(100 * 2**20)})
    assert refused.returncode == 2, refused.stderr[-2000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "predicted peak" in errors[0] and "does not fit the 0.10 GiB available on cpu" in errors[0], refused.stderr[-2000:]
    assert "model_loaded" not in refused.stdout  # stopped before the model was built
    warned = run_train([*args, f"output_dir={tmp_path / 'b'}", "train.fit_check=warn"], env={"FINETUNE_AVAILABLE_BYTES": str(100 * 2**20)})
    assert warned.returncode == 0, warned.stderr[-2000:]
    assert "warning: predicted peak" in warned.stdout and (tmp_path / "b" / "final").is_dir()
