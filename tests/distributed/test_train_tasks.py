"""Real runs per task: 2 ranks through torchrun on tiny models.
Each asserts what the task must achieve, not merely that the run finished."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import read_metrics, read_summary, run_train, write_classification_file, write_summarization_file


def run_args(out: Path, steps: int) -> list[str]:
    return [f"output_dir={out}", f"train.max_steps={steps}", "train.warmup_steps=1", "eval.num_generation_prompts=2", "eval.max_new_tokens=6"]


def check_task_run(result, out: Path) -> dict:
    """What every task run must show: success, best and last eval in summary.json and metrics.jsonl, a faithful reload."""
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    summary = read_summary(out)
    evals = summary["eval"]
    assert evals["last"] == {"step": summary["steps"], **evals["after"]}
    assert evals["best"]["step"] in [0, summary["steps"]] + [e["step"] for e in evals["history"]]
    final_line = read_metrics(out)[-1]
    assert final_line["step"] == summary["steps"] and final_line["eval_loss"] == evals["after"]["loss"] and final_line["eval_best"] == evals["best"]
    assert summary["reload"]["ok"], summary["reload"]
    return summary


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_summarization_two_ranks_packed(tmp_path):
    data, out = write_summarization_file(tmp_path / "samsum.json"), tmp_path / "run"
    args = [f"data.train_path={data}", "task=summarization", "model.name=tiny-llama", "method=full", "data.packing=true", "data.max_length=256", "train.batch_size=2", "eval.every_steps=4"]
    result = run_train(args + run_args(out, 8), launcher="torchrun", nproc=2)
    summary = check_task_run(result, out)
    assert summary["eval"]["after"]["loss"] < summary["eval"]["before"]["loss"] - 0.3, summary["eval"]
    assert summary["data"]["packed_rows"] < summary["data"]["train_samples"] / 4  # several dialogues per row
    generations = json.loads((out / "generations.json").read_text())
    assert len(generations) == 2 and generations[0]["prompt"].startswith(generations[0]["reference"].split()[0] + ":")
    assert "prompt:    " in result.stdout  # shown on rank 0


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_chat_on_chatterbot_conversations_two_ranks_zero2_lora_packed(tmp_path):
    out = tmp_path / "run"
    args = ["task=chat", "data.train_path=chatterbot-corpus:chat", "model.name=tiny-gpt2", "method=lora", "train.lr=2e-2", "lora.dropout=0"]
    args += ["--config", "booster_configs/zero2.yaml", "data.packing=true", "train.batch_size=4", "eval.every_steps=5", "data.max_eval_samples=48"]
    result = run_train(args + run_args(out, 10), launcher="torchrun", nproc=2)
    summary = check_task_run(result, out)
    assert summary["eval"]["after"]["loss"] < summary["eval"]["before"]["loss"] - 0.05, summary["eval"]
    assert summary["data"]["train_samples"] > 700 and summary["plugin"] == "low_level_zero"
    tokenizer_config = json.loads((out / "final" / "tokenizer_config.json").read_text())
    assert "### Assistant:" in tokenizer_config["chat_template"]  # the template trained with is saved with the adapter


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_classification_two_ranks_reaches_90_percent(tmp_path):
    data, out, cache = write_classification_file(tmp_path / "topics.csv"), tmp_path / "run", tmp_path / "cache"
    args = [f"data.train_path={data}", "task=classification", "model.name=tiny-roberta", "method=full", "--config", "booster_configs/zero1.yaml"]
    args += ["data.eval_fraction=0.25", "train.batch_size=8", "train.lr=3e-3", "train.lr_scheduler=constant", "eval.every_steps=10"]
    result = run_train(args + run_args(out, 40), launcher="torchrun", nproc=2, env={"FINETUNE_CACHE": str(cache)})
    summary = check_task_run(result, out)
    after = summary["eval"]["after"]
    assert after["accuracy"] >= 0.9 and after["macro_f1"] >= 0.9 and after["samples"] == 24, summary["eval"]
    assert summary["eval"]["best"]["accuracy"] >= after["accuracy"]
    assert summary["data"]["labels"] == ["food", "sports", "weather"] and json.loads((out / "final" / "labels.json").read_text()) == ["food", "sports", "weather"]
    assert json.loads((out / "final" / "config.json").read_text())["id2label"] == {"0": "food", "1": "sports", "2": "weather"}
    assert json.loads((out / "generations.json").read_text()) == []
    assert [m["eval_accuracy"] for m in read_metrics(out) if "eval_accuracy" in m][-1] == after["accuracy"]
    # rank 0 tokenized into the data cache (one entry); rank 1 read it
    assert summary["data"]["cache"].startswith("built ") and len(list((cache / "data").glob("classification-*.npz"))) == 1
