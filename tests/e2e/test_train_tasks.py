"""A real one-process run of a task: chatterbot topics classification with LoRA."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from tests.conftest import run_train
from tests.distributed.test_train_tasks import check_task_run, run_args


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_chatterbot_topics_classification_with_lora(tmp_path):
    out = tmp_path / "run"
    args = ["task=classification", "data.train_path=chatterbot-corpus:topics", "model.name=tiny-roberta", "method=lora", "lora.r=16", "lora.dropout=0"]
    args += ["train.lr=3e-3", "train.batch_size=16", "data.max_eval_samples=64", "eval.every_steps=0"]
    result = run_train(args + run_args(out, 12))
    summary = check_task_run(result, out)
    assert summary["eval"]["after"]["loss"] < summary["eval"]["before"]["loss"], summary["eval"]
    assert len(summary["data"]["labels"]) == 21 and "greetings" in summary["data"]["labels"]
    with safe_open(str(out / "final" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("classifier" in k for k in keys) and any("lora_A" in k for k in keys)  # the new head is saved with the adapter
