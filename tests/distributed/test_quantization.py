"""QLoRA on 2 ranks (DDP, ZeRO-2, pipeline parallel): adapters train over frozen 4/8-bit weights; the estimator against
real QLoRA under FSDP and LoRA and QLoRA under tensor parallelism."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import read_summary, run_grouped, selected_params, write_fixed_length_file, write_instruction_file
from tests.distributed.test_train import check_run_contract, common_args


# --- real 2-rank runs ----------------------------------------------------------------------------


QLORA_TWO_RANKS = [("torch_ddp.yaml", "tiny-gpt2", 4), ("zero2.yaml", "tiny-gpt2", 8), ("torch_ddp.yaml", "tiny-llama", 8), ("zero2.yaml", "tiny-llama", 4)]
QLORA_ARGS = ["method=qlora", "train.lr=5e-3"]
# tests/e2e/test_estimate.py's setup (GPT-2 124M, batch 2 x 64, 3 steps): the model state is a large part of the peak
ESTIMATE_ARGS = [
    "model.name=gpt2", "method=qlora", "data.eval_fraction=0.25", "data.max_eval_samples=4", "data.max_length=64", "train.max_steps=3",
    "train.batch_size=2", "eval.batch_size=2", "eval.every_steps=0", "eval.num_generation_prompts=0", "train.cpu_allocator=exact",
]  # fmt: skip


# Under tp2 (the rest as ESTIMATE_ARGS): LoRA on GPT-2 124M, and QLoRA on small-llama (GPT-2's scale, Llama's layout,
# whose shards are whole 4-bit blocks), single quantization as tensor parallelism requires.
TP_ESTIMATE_SETUPS = {"tp2-lora-gpt2": ["method=lora"], "tp2-qlora-small-llama": ["model.name=small-llama", "quantization.double_quant=false"]}


@pytest.fixture(scope="module")
def qlora_runs(request, tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """name -> (output dir, result) of the selected 2-rank QLoRA runs, all in one shared launch (tests/run_many.py)."""
    root = tmp_path_factory.mktemp("qlora")
    data = write_instruction_file(root / "train.jsonl")
    runs = {}
    for config, model, bits in selected_params(request, "test_qlora_two_ranks", "setup"):
        name = f"{config}-{model}-{bits}"
        runs[name] = (2, ["--config", f"booster_configs/{config}", f"model.name={model}", f"quantization.bits={bits}", *QLORA_ARGS, *common_args(data, root / name)])
    if selected_params(request, "test_qlora_pipeline_parallel", None):
        runs["pp2"] = (2, ["--config", "booster_configs/pp2.yaml", "model.name=tiny-llama", *QLORA_ARGS, *common_args(data, root / "pp2")])
    if selected_params(request, "test_qlora_under_fsdp_within_15_percent_of_the_estimate", None):
        runs["fsdp-gpt2"] = (2, ["--config", "booster_configs/fsdp.yaml", *ESTIMATE_ARGS, f"data.train_path={write_fixed_length_file(root / 'fixed.jsonl')}", f"output_dir={root / 'fsdp-gpt2'}"])
    for name in selected_params(request, "test_tensor_parallel_peaks_within_15_percent_of_the_estimate", "setup"):
        runs[name] = (2, ["--config", "booster_configs/tp2_lora.yaml", *ESTIMATE_ARGS, *TP_ESTIMATE_SETUPS[name], f"data.train_path={write_fixed_length_file(root / f'{name}.jsonl')}", f"output_dir={root / name}"])
    results = run_grouped(runs, root / "launches")
    return {name: (root / name, results[name]) for name in runs}


@pytest.mark.distributed
@pytest.mark.timeout(1800)  # the first case waits for the shared launch (bounded by run_many)
@pytest.mark.parametrize("setup", QLORA_TWO_RANKS, ids=lambda setup: "-".join(map(str, setup)))
def test_qlora_two_ranks(qlora_runs, setup):
    out, result = qlora_runs["-".join(map(str, setup))]
    assert result.returncode == 0, result.stderr[-3000:]
    summary = check_run_contract(out, world_size=2)  # loss down, adapters identical on both ranks, reload ok
    checks = summary["checks"]
    assert checks["frozen_changed"] == 0 and checks["frozen_tensors"] > 0  # quantized weights bit-identical
    assert checks["trainable_changed"] == checks["trainable_tensors"] > 0
    weights = summary["memory"]["model_weights"]
    assert weights["quantized"]["params"] > 0 and weights["quantized"]["bytes_per_param"] < (0.75 if setup[2] == 4 else 1.1)
    assert (out / "final" / "adapter_model.safetensors").is_file() and not (out / "final" / "model.safetensors").exists()


@pytest.mark.distributed
@pytest.mark.timeout(1800)
def test_qlora_pipeline_parallel(qlora_runs):
    out, result = qlora_runs["pp2"]
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(out)
    assert summary["eval"]["after"]["loss"] < summary["eval"]["before"]["loss"]
    assert summary["checks"]["frozen_changed"] == 0 and summary["reload"]["ok"]


@pytest.mark.distributed
@pytest.mark.timeout(1800)
def test_qlora_under_fsdp_within_15_percent_of_the_estimate(qlora_runs):
    """GPT-2 124M QLoRA under fsdp x2: each rank holds about half the packed 4-bit data (the block constants whole), and
    the estimator, which shards it and gathers the blocks as stored, predicts the measured peak within 15%."""
    out, result = qlora_runs["fsdp-gpt2"]
    assert result.returncode == 0, result.stderr[-3000:]
    memory = read_summary(out)["memory"]
    whole, shares = memory["model_weights"]["quantized"], [rank["quantized"] for rank in memory["model_weights"]["per_rank"]]
    assert sum(share["packed_bytes"] for share in shares) == whole["packed_bytes"]
    assert all(0.45 * whole["bytes"] < share["bytes"] < 0.55 * whole["bytes"] for share in shares), (shares, whole)
    estimate = memory["estimate"]
    assert 0.85 <= estimate["ratio_measured_to_predicted"] <= 1.15, estimate
    per_rank = estimate["per_rank"]
    assert per_rank["weights"] > 0.15 * estimate["measured_train_step_peak_bytes"]  # not a prediction made of the process baseline


@pytest.mark.distributed
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("setup", list(TP_ESTIMATE_SETUPS))
def test_tensor_parallel_peaks_within_15_percent_of_the_estimate(qlora_runs, setup):
    """Issue 26: LoRA and QLoRA under tp2 at a size where the model state matters: the estimator (split projections and
    vocabulary, the column-parallel layers' kept inputs, the vocabulary-parallel loss) predicts the measured peak within 15%."""
    out, result = qlora_runs[setup]
    assert result.returncode == 0, result.stderr[-3000:]
    memory = read_summary(out)["memory"]
    estimate = memory["estimate"]
    assert estimate["per_rank"]["setup"]["tp"] == 2
    assert 0.85 <= estimate["ratio_measured_to_predicted"] <= 1.15, estimate
    # not a prediction made of the process baseline: the weights are a large part of what the run adds to its start stage
    # (a shared launch's later run starts with what the earlier ones left in its processes)
    start = next(s["current_bytes"] for s in memory["stages"] if s["name"] == "start")
    assert estimate["per_rank"]["weights"] > 0.3 * (estimate["measured_train_step_peak_bytes"] - start)
