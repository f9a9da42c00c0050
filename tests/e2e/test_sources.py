"""Model sources through the CLI: pickle-only dirs refused without running them, a hub id trained end to end,
a model dir that needs its own code refused in one line."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from finetune import export
from finetune.config import load_config
from tests.conftest import TRAIN, run_env, run_python, run_train, write_instruction_file
from tests.unit.test_sources import CVE, Payload, remote_code_dir
from tests.unit.test_sources import offline_hub, world  # noqa: F401 (fixtures: the hub cache built here)


def refused_run(args: list[str]) -> subprocess.CompletedProcess:
    result = run_python([TRAIN, *args], timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    return errors[0]


@pytest.mark.e2e
def test_pickle_only_model_and_adapter_dirs_are_refused_without_running_them(world, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}))
    torch.save({"weight": Payload(tmp_path / "marker")}, adapter / "adapter_model.bin")
    data = write_instruction_file(tmp_path / "train.jsonl")
    common = [f"data.train_path={data}", f"output_dir={tmp_path / 'out'}", "train.max_steps=1"]
    line = refused_run([f"model.name={world['root'] / 'pickled'}", *common])
    assert "model.name:" in line and "pytorch_model.bin" in line and CVE in line and "model.allow_pickle=true" in line
    line = refused_run(["model.name=tiny-llama", f"lora.init_from={adapter}", *common])
    assert "lora.init_from:" in line and "adapter_model.bin" in line and CVE in line and "model.allow_pickle=true" in line
    assert not (world["root"] / "marker").exists() and not (tmp_path / "marker").exists()


@pytest.mark.e2e
def test_training_from_a_hub_id_end_to_end(world, offline_hub, tmp_path):
    """One real run (1 process, 2 LoRA steps) from `org/name`, then its export and a lora.init_from on that base."""
    data = write_instruction_file(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    args = ["model.name=acme/tiny-llama", "method=lora", "train.max_steps=2", f"data.train_path={data}", f"output_dir={out}"]
    args += ["eval.every_steps=0", "eval.num_generation_prompts=0"]
    result = run_train(args, env={**run_env(), "HF_HUB_CACHE": str(offline_hub)})
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = out / "final"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "acme/tiny-llama"
    load_config(["model.name=acme/tiny-llama", f"lora.init_from={adapter}"], world_size=1)  # targets read from the cached config
    report = export.export(out, tmp_path / "merged")
    assert report["merged_adapter"] and report["max_logit_difference"] <= export.LOGITS_TOLERANCE


@pytest.mark.e2e
def test_a_model_dir_that_needs_its_own_code_stops_the_cli_in_one_line(world, tmp_path):
    """The reported hang: launched with stdin closed, the run refuses in one line instead of prompting."""
    marker = tmp_path / "code_ran"
    base = remote_code_dir(world, tmp_path / "evil", marker)
    data = write_instruction_file(tmp_path / "train.jsonl", n=8)
    args = [f"model.name={base}", "method=full", f"data.train_path={data}", f"output_dir={tmp_path / 'out'}", "train.fit_check=error"]
    result = run_python([TRAIN, *args], timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "set model.trust_remote_code=true" in lines[0], result.stderr[-2000:]
    assert "[y/N]" not in result.stdout + result.stderr and not marker.exists()
