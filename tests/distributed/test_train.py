"""Real training runs of finetune/train.py: 2 ranks on gloo through torchrun and `colossalai run`.
Each asserts what must hold, not merely that the run finished."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.config import load_config
from tests.conftest import REPO, read_metrics, read_summary, run_train

STAGES = ["start", "model_loaded", "boosted", "train_step_peak", "after_training"]


def common_args(data: Path, out: Path) -> list[str]:
    return [
        f"data.train_path={data}",
        "data.eval_fraction=0.25",
        f"output_dir={out}",
        "train.max_steps=8",
        "train.batch_size=4",
        "train.warmup_steps=1",
        "eval.num_generation_prompts=1",
        "eval.max_new_tokens=4",
    ]


def check_run_contract(out: Path, world_size: int, replicated: bool = True) -> dict:
    """The output contract every run writes, with values that must hold for any healthy run.

    Args:
        replicated: every rank holds the whole model (not so under tensor/pipeline parallelism), so
            the ranks' parameter digests must be identical.
    """
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "generations.json"):
        assert (out / name).is_file(), name
    assert not (out / "final.partial").exists()
    summary = read_summary(out)
    metrics = [m for m in read_metrics(out) if "loss" in m]
    assert summary["world_size"] == world_size
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert {"step", "loss", "lr", "tokens_per_s", "memory"} <= set(metrics[0])
    assert metrics[-1]["loss"] < metrics[0]["loss"], "training loss did not go down"
    assert summary["eval"]["after"]["loss"] < summary["eval"]["before"]["loss"], "eval loss did not go down"
    assert [s["name"] for s in summary["memory"]["stages"]] == STAGES
    assert all(s["peak_bytes"] >= s["current_bytes"] > 0 for s in summary["memory"]["stages"])
    assert summary["throughput"]["tokens_per_s"] > 0
    if replicated:
        assert summary["checks"]["replicas_identical"] and len(summary["checks"]["replica_digests"]) == world_size
    assert summary["reload"]["ok"], summary["reload"]
    assert load_config(["--config", str(out / "config.yaml")], world_size=world_size).output_dir == str(out)
    return summary


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_full_finetune_two_ranks_torchrun(instruction_file, tmp_path):
    out = tmp_path / "run"
    result = run_train(common_args(instruction_file, out) + ["model.name=tiny-gpt2", "method=full"], launcher="torchrun", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = check_run_contract(out, world_size=2)
    checks = summary["checks"]
    assert checks["frozen_tensors"] == 0
    assert checks["trainable_changed"] == checks["trainable_tensors"] > 0
    assert summary["trainable_params"] == summary["all_params"]
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "config.json").is_file()
    assert "trainable params: " in result.stdout and " || trainable%: 100.0000" in result.stdout


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_lora_tensor_parallel_config_colossalai_run(instruction_file, tmp_path):
    """booster_configs/tp2_lora.yaml end to end: LoRA adapters split over 2 tensor-parallel ranks,
    starting from an adapter trained by a single process (split on loading)."""
    from peft import PeftModel

    from finetune.config import ModelConfig
    from finetune.model import build_model

    lora = ["model.name=tiny-llama", "method=lora", "train.lr=5e-3", "lora.dropout=0"]
    first = tmp_path / "single"
    assert run_train(common_args(instruction_file, first) + lora + ["train.max_steps=2"]).returncode == 0
    out = tmp_path / "run"
    config = ["--config", str(REPO / "booster_configs" / "tp2_lora.yaml")]
    args = config + common_args(instruction_file, out) + lora + [f"lora.init_from={first / 'final'}"]
    result = run_train(args, launcher="colossalai", nproc=2)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    summary = check_run_contract(out, world_size=2, replicated=False)
    assert (summary["method"], summary["plugin_options"]["tp_size"]) == ("lora", 2)
    # the split adapter computes what the single process's trained adapter did
    assert abs(summary["eval"]["before"]["loss"] - read_summary(first)["eval"]["after"]["loss"]) < 1e-5
    checks = summary["checks"]
    assert checks["trainable_changed"] == checks["trainable_tensors"] == 2 * 2 * 4  # lora_A/B x 4 projections x 2 layers
    assert checks["frozen_tensors"] > 0 and checks["frozen_changed"] == 0
    assert summary["trainable_params"] < summary["all_params"] / 10
    # The adapter is a plain peft dir: it loads onto a fresh base and carries trained (non-zero) lora_B.
    base, _ = build_model(ModelConfig(name="tiny-llama"), seed=42)
    model = PeftModel.from_pretrained(base, str(out / "final"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_bad_data_row_stops_both_ranks_with_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    out = tmp_path / "run"
    result = run_train([f"data.train_path={bad}", f"output_dir={out}", "model.name=tiny-gpt2"], launcher="torchrun", nproc=2)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {bad} row 2: missing field 'output'"], result.stderr[-2000:]
    assert not (out / "final").exists()
