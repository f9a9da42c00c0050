"""NaN and inf never read as a result: evals that measure a broken model say so and are never best, the reload check
fails on them, and non-finite weights are named."""

from __future__ import annotations

import math

import pytest
import torch

from finetune.checks import non_finite_parameters
from finetune.config import ModelConfig
from finetune.evaluation import best_eval, eval_line, evaluate, evaluate_classification, module_batch_loss, module_logits, reload_matches, summed_loss
from finetune.model import build_model

SAMPLES = [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}, {"input_ids": [9, 10, 11], "labels": [-100, 10, 11]}, {"input_ids": [3, 4], "labels": [-100, -100]}]


def poisoned(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        next(p for p in model.parameters() if p.dim() == 2).fill_(float("nan"))
    return model.eval()


def test_a_nan_model_evaluates_to_nan_not_to_a_perfect_loss():
    """summed_loss turned NaN into 0: a NaN adapter read 'loss 0.0000, perplexity 1.00'."""
    model, _ = build_model(ModelConfig(name="tiny-gpt2"), seed=0)
    healthy = evaluate(module_batch_loss(model.eval()), SAMPLES, batch_size=1, pad_token_id=0, device="cpu", layout=None)
    assert math.isfinite(healthy["loss"]) and healthy["tokens"] == 5  # a batch of masked labels only adds nothing, and no NaN
    broken = evaluate(module_batch_loss(poisoned(model)), SAMPLES, batch_size=2, pad_token_id=0, device="cpu", layout=None)
    assert math.isnan(broken["loss"]) and math.isnan(broken["perplexity"])
    assert eval_line(broken).startswith("not finite (loss nan)")


def test_a_batch_without_label_tokens_weighs_nothing():
    outputs = type("Out", (), {"loss": torch.tensor(float("nan"))})()  # HF's mean over no tokens
    assert summed_loss(outputs, {"labels": torch.tensor([[-100, -100, -100]])}).item() == 0.0
    assert math.isnan(summed_loss(outputs, {"labels": torch.tensor([[-100, 4, 5]])}).item())


def test_a_nan_classifier_has_no_accuracy():
    model, _ = build_model(ModelConfig(name="tiny-roberta"), seed=0, labels=["a", "b"])
    samples = [{"input_ids": [0, 5, 6, 2], "label": 0}, {"input_ids": [0, 7, 2], "label": 1}]
    result = evaluate_classification(module_logits(poisoned(model)), samples, 2, 1, "cpu", None, num_labels=2)
    assert all(math.isnan(result[k]) for k in ("loss", "accuracy", "macro_f1")), result


def test_a_non_finite_eval_is_never_best():
    evals = [{"step": 0, "loss": float("nan"), "perplexity": float("nan")}, {"step": 5, "loss": 2.0, "perplexity": 7.4}, {"step": 9, "loss": float("inf"), "perplexity": float("inf")}]
    assert best_eval(evals)["step"] == 5
    assert best_eval([evals[0], evals[2]]) is None
    classified = [{"step": 0, "loss": float("nan"), "accuracy": float("nan"), "macro_f1": float("nan")}, {"step": 3, "loss": 0.7, "accuracy": 0.5, "macro_f1": 0.4}]
    assert best_eval(classified)["step"] == 3


@pytest.mark.parametrize("reloaded, trained, ok", [(float("nan"), float("nan"), False), (1.0, float("nan"), False), (float("inf"), float("inf"), False), (2.0, 2.0 + 1e-5, True), (2.0, 2.1, False)])
def test_the_reload_check_fails_on_non_finite_losses(reloaded, trained, ok):
    assert reload_matches(reloaded, trained, "fp32") is ok


def test_non_finite_parameters_are_named():
    model, _ = build_model(ModelConfig(name="tiny-gpt2"), seed=0)
    assert non_finite_parameters(model) == []
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.bias[3] = float("inf")
    assert non_finite_parameters(model) == ["transformer.h.1.mlp.c_fc.bias"]
