"""A real single-process training run: gradient accumulation, bf16 and checkpointing."""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics, run_train
from tests.distributed.test_train import check_run_contract, common_args


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_single_process_accumulation_bf16_checkpointing(instruction_file, tmp_path):
    out = tmp_path / "run"
    args = common_args(instruction_file, out) + [
        "model.name=tiny-gpt2",
        "method=lora",
        "train.lr=5e-3",
        "train.grad_accum_steps=2",
        "train.precision=bf16",
        "train.gradient_checkpointing=true",
        "train.lr_scheduler=linear",
    ]
    result = run_train(args, launcher="python")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = check_run_contract(out, world_size=1)
    assert summary["precision"] == "bf16"
    assert summary["checks"]["frozen_changed"] == 0
    lrs = [m["lr"] for m in read_metrics(out) if "lr" in m]
    assert lrs[-1] < lrs[1], "linear schedule did not decay"
