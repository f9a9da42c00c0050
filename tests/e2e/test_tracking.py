"""Experiment tracking (logging.tensorboard / logging.wandb), grad_norm in metrics.jsonl, and the LoRA
variants (lora.use_dora / use_rslora / init) on real tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.config import build_config, parse_args, validate
from tests.conftest import read_metrics, read_summary, run_train

TINY = ["model.name=tiny-gpt2", "method=lora", "train.max_steps=6", "train.batch_size=4", "train.warmup_steps=1", "train.lr=5e-3", "data.eval_fraction=0.25", "eval.every_steps=3", "eval.num_generation_prompts=1", "eval.max_new_tokens=4"]


def event_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in log_dir, read back by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def problems_for(*overrides: str) -> list[str]:
    return validate(build_config(parse_args(["model.name=tiny-gpt2", *overrides])), world_size=1, has_cuda=False)


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


def test_variant_and_tracker_refusals():
    assert any("wandb package is not installed" in p for p in problems_for("logging.wandb=true"))
    assert any("DoRA's magnitude vector" in p for p in problems_for("plugin.name=hybrid_parallel", "plugin.tp_size=2", "model.name=tiny-llama", "lora.use_dora=true"))
    assert any("lora.init: unknown value 'loftq'" in p for p in problems_for("lora.init=loftq"))
    assert not problems_for("model.name=tiny-llama", "lora.init=pissa_niter_4", "lora.use_dora=true", "lora.use_rslora=true")
    assert any("trains no adapter" in p for p in problems_for("method=full", "lora.use_dora=true"))
    assert any("4/8-bit base" in p for p in problems_for("method=qlora", "lora.init=olora"))
    assert any("Conv1D" in p for p in problems_for("lora.init=pissa"))  # tiny-gpt2


def test_estimator_counts_dora_magnitude():
    """DoRA adds one trained magnitude per output row of each adapted projection (tiny-llama's attention projections)."""
    from finetune import estimate

    config = estimate.load_model_config("tiny-llama")
    lora = lambda *o: build_config(parse_args(["model.name=tiny-llama", *o])).lora  # noqa: E731
    plain, dora = (estimate.model_shape(config, "lora", lora(*o)) for o in ((), ("lora.use_dora=true",)))
    from finetune.architectures import architecture

    kv_rows = config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    out_rows = {"q_proj": config.hidden_size, "k_proj": kv_rows, "v_proj": kv_rows, "o_proj": config.hidden_size}
    rows = sum(out_rows[t] for t in architecture("llama").lora_targets)
    assert dora.trainable_params - plain.trainable_params == config.num_hidden_layers * rows
    assert estimate.model_shape(config, "lora", lora("lora.init=pissa")).trainable_params == plain.trainable_params


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
