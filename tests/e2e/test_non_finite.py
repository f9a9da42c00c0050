"""NaN through the CLI: a NaN init adapter is refused at load, and a run that trained nothing writes no final/."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from finetune.config import LoraConfig, ModelConfig
from finetune.model import build_lora_config, build_model
from tests.conftest import TRAIN, run_python, write_instruction_file


def nan_adapter(path: Path) -> Path:
    """A peft adapter for tiny-gpt2 with this run's default rank, alpha and targets, whose lora_B weights are NaN."""
    from peft import get_peft_model

    model, _ = build_model(ModelConfig(name="tiny-gpt2"), seed=0)
    peft_model = get_peft_model(model, build_lora_config(model, LoraConfig()))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.fill_(float("nan"))
    peft_model.save_pretrained(str(path))
    return path


def run_cli(args: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """A real run: its result and its `error:` lines (progress bars and log lines share stderr once training runs)."""
    result = run_python([TRAIN, *args], env, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result, [line for line in result.stderr.splitlines() if line.startswith("error:")]


def base_args(tmp_path: Path) -> list[str]:
    data = write_instruction_file(tmp_path / "train.jsonl", n=16)
    return [f"data.train_path={data}", "data.eval_fraction=0.25", "model.name=tiny-gpt2", "train.max_steps=1", "train.batch_size=4", "eval.every_steps=0", "eval.num_generation_prompts=0", f"output_dir={tmp_path / 'out'}"]


@pytest.mark.e2e
def test_a_nan_init_adapter_is_refused_at_load(tmp_path):
    result, lines = run_cli([*base_args(tmp_path), "method=lora", f"lora.init_from={nan_adapter(tmp_path / 'adapter')}"])
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"error: lora.init_from: the adapter in {tmp_path / 'adapter'} hold NaN or infinite values (") and "lora_B" in lines[0], lines[0]
    assert not (tmp_path / "out" / "final").exists()


@pytest.mark.e2e
def test_a_run_whose_every_step_was_skipped_writes_no_final(tmp_path):
    """It ended in an IndexError in outputs.finish, after writing final/ (the untrained model) as if trained."""
    result, lines = run_cli([*base_args(tmp_path), "method=full", "train.on_nan=skip"], env={"FINETUNE_FAULT": "nan_at_step:1"})
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: all 1 step(s) had a non-finite loss and were skipped (train.on_nan=skip): nothing was trained, so no final/ is written"), lines[0]
    assert not (tmp_path / "out" / "final").exists() and not (tmp_path / "out" / "summary.json").exists()
    assert json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])["skipped"] == "non-finite loss"
