"""DoRA and PiSSA LoRA on 2 pipeline-parallel ranks."""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics, read_summary, run_train
from tests.e2e.test_tracking import TINY


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_dora_pissa_under_pipeline_two_ranks(instruction_file, tmp_path):
    """DoRA and PiSSA together across two pipeline stages: the held-out loss falls, the converted adapter
    reloads onto the original base, and the norm the hybrid optimizer clipped by is logged."""
    out = tmp_path / "run"
    args = [f"data.train_path={instruction_file}", f"output_dir={out}", *TINY, "model.name=tiny-llama", "eval.every_steps=0"]
    pipeline = ["plugin.name=hybrid_parallel", "plugin.pp_size=2", "plugin.num_microbatches=2", "lora.use_dora=true", "lora.init=pissa"]
    result = run_train(args + pipeline, launcher="torchrun", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(out)
    assert summary["eval"]["after"]["loss"] < summary["eval"]["before"]["loss"]
    assert summary["reload"]["ok"], summary["reload"]
    assert all(m["grad_norm"] > 0 for m in read_metrics(out) if "loss" in m)
