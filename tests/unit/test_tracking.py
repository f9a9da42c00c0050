"""Tracking and LoRA variant settings validated in process, and the estimator's count of DoRA's magnitude vectors."""

from __future__ import annotations

from finetune.config import build_config, parse_args, validate


def problems_for(*overrides: str) -> list[str]:
    return validate(build_config(parse_args(["model.name=tiny-gpt2", *overrides])), world_size=1, has_cuda=False)


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
