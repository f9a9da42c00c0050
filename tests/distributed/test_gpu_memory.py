"""Issue 15 on CPU, 2 ranks: a LoRA base held in the compute dtype (bf16 under FSDP)."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from tests.conftest import read_summary, run_train


@pytest.mark.distributed
def test_bf16_lora_holds_the_frozen_base_in_bf16_under_fsdp(tmp_path, instruction_file):
    """2 ranks, FSDP with bf16 mixed precision: the base is bf16 (2 bytes/param), the adapter trains and is saved in fp32."""
    out = tmp_path / "run"
    args = [f"data.train_path={instruction_file}", "model.name=tiny-llama", "method=lora", "train.precision=bf16", "train.max_steps=2", "--config", "booster_configs/fsdp.yaml", f"output_dir={out}", "eval.num_generation_prompts=0"]
    result = run_train(args, launcher="torchrun", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = read_summary(out)["memory"]["model_weights"]
    assert set(weights["unquantized"]) == {"bfloat16"}, weights  # the whole base, no float32 copy
    assert weights["unquantized"]["bfloat16"]["bytes"] == 2 * weights["unquantized"]["bfloat16"]["params"]
    with safe_open(str(out / "final" / "adapter_model.safetensors"), "pt") as adapter:
        assert {str(adapter.get_tensor(k).dtype) for k in adapter.keys()} == {"torch.float32"}
    summary = read_summary(out)
    assert summary["reload"]["ok"] and summary["checks"]["trainable_changed"] > 0 and summary["checks"]["frozen_changed"] == 0, json.dumps(summary["checks"])
