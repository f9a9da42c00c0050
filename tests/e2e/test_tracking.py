"""Experiment tracking (logging.tensorboard), grad_norm in metrics.jsonl, and the LoRA variants
(lora.use_dora / init) on real tiny one-process runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import read_metrics, read_summary, run_train

TINY = ["model.name=tiny-gpt2", "method=lora", "train.max_steps=6", "train.batch_size=4", "train.warmup_steps=1", "train.lr=5e-3", "data.eval_fraction=0.25", "eval.every_steps=3", "eval.num_generation_prompts=1", "eval.max_new_tokens=4"]


def event_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in log_dir, read back by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_tensorboard_curves_equal_metrics_and_dora_reloads(instruction_file, tmp_path):
    """One DoRA run with TensorBoard: the event file's loss curve is metrics.jsonl's, grad_norm is logged,
    the held-out loss falls, and the adapter (magnitude vectors included) reloads to the same probe loss."""
    out = tmp_path / "run"
    result = run_train([f"data.train_path={instruction_file}", f"output_dir={out}", *TINY, "logging.tensorboard=true", "lora.use_dora=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(out)
    steps = [m for m in metrics if "loss" in m]
    assert all(m["grad_norm"] > 0 for m in steps)
    scalars = event_scalars(out / "tensorboard")
    assert scalars["train/loss"] == [(m["step"], pytest.approx(m["loss"], rel=1e-6)) for m in steps]
    assert scalars["train/grad_norm"] == [(m["step"], pytest.approx(m["grad_norm"], rel=1e-6)) for m in steps]
    assert [s for s, _ in scalars["train/lr"]] == [m["step"] for m in steps] and "train/tokens_per_s" in scalars
    evals = [m for m in metrics if "eval_loss" in m]
    assert [s for s, _ in scalars["eval/loss"]] == [m["step"] for m in evals]
    assert "memory/boosted/peak_gib" in scalars and "train/memory_peak_gib" in scalars
    summary = read_summary(out)
    assert summary["eval"]["after"]["loss"] < summary["eval"]["before"]["loss"]
    assert summary["reload"]["ok"] and summary["reload"]["loader"] == "PeftModel.from_pretrained", summary["reload"]
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["use_dora"] is True
    from safetensors.torch import load_file

    assert any("lora_magnitude_vector" in key for key in load_file(out / "final" / "adapter_model.safetensors"))


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_pissa_run_converts_final_to_plain_lora(instruction_file, tmp_path):
    """PiSSA trains against a residual base; final/ is converted (rank 2r) so the original base + adapter reproduce the model."""
    out = tmp_path / "run"
    result = run_train([f"data.train_path={instruction_file}", f"output_dir={out}", *TINY, "model.name=tiny-llama", "lora.init=pissa", "lora.use_rslora=true", "train.max_grad_norm=0"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(out)
    assert summary["eval"]["after"]["loss"] < summary["eval"]["before"]["loss"]
    assert summary["reload"]["ok"], summary["reload"]
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["init_lora_weights"] is True and adapter["use_rslora"] is True
    assert all(m["grad_norm"] is None for m in read_metrics(out) if "loss" in m)  # no clipping, no norm
