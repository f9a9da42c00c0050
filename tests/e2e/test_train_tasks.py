"""Real one-process runs of a task: chatterbot topics classification with LoRA; a reward model reloaded from final/."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from tests.conftest import read_metrics, run_train, write_pairs
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


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["full", "lora"])
def test_reward_model_final_scores_held_out_pairs_with_the_reported_accuracy(method, tmp_path, monkeypatch):
    """task=reward trains (accuracy on held-out pairs rising); final/ (full: as it is; LoRA: merged by finetune.export,
    the head kept) loads as a user would with AutoModelForSequenceClassification and scores each held-out sequence on
    its own (no padding) with the accuracy and loss the run reported."""
    from transformers import AutoModelForSequenceClassification

    from finetune.config import load_config
    from finetune.data import build_data, load_splits
    from finetune.export import export
    from finetune.model import build_model

    out = tmp_path / "run"
    args = ["task=reward", f"data.train_path={write_pairs(tmp_path / 'pairs.jsonl', 64)}", "model.name=tiny-gpt2", f"method={method}", "data.max_length=48",
            "data.eval_fraction=0.25", f"train.lr={1e-3 if method == 'full' else 3e-3}", "train.batch_size=8", "eval.every_steps=0"]  # fmt: skip
    result = run_train(args + run_args(out, 12))
    summary = check_task_run(result, out)
    before, after = summary["eval"]["before"], summary["eval"]["after"]
    assert after["accuracy"] > before["accuracy"] and after["margin"] > before["margin"] and after["pairs"] >= 12, summary["eval"]
    assert {"accuracy", "margin", "reward_chosen"} <= set(read_metrics(out)[1]) and json.loads((out / "generations.json").read_text()) == []

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    cfg = load_config(args + [f"output_dir={tmp_path / 'unused'}"], world_size=1)
    splits = load_splits(cfg.data, cfg.train.seed, cfg.task)
    _, tokenizer = build_model(cfg.model, cfg.train.seed, labels=splits.task.labels_or_none)
    pairs = build_data(cfg.data, tokenizer, splits).eval  # the run's held-out pairs, tokenized as it did
    export(out, tmp_path / "exported")
    for model_dir in [out / "final", tmp_path / "exported"] if method == "full" else [tmp_path / "exported"]:
        reward_model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
        assert reward_model.config.num_labels == 1 and reward_model.config.pad_token_id == tokenizer.pad_token_id
        with torch.no_grad():
            scores = torch.tensor([[reward_model(input_ids=torch.tensor([pair[key]])).logits[0, 0].item() for key in ("input_ids", "rejected_input_ids")] for pair in pairs])
        margins = scores[:, 0] - scores[:, 1]
        assert len(pairs) == after["pairs"]
        assert (margins > 0).float().mean().item() == after["accuracy"], model_dir
        assert -F.logsigmoid(margins).mean().item() == pytest.approx(after["loss"], abs=1e-5), model_dir
        assert margins.mean().item() == pytest.approx(after["margin"], abs=1e-5), model_dir
