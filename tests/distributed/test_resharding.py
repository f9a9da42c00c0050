"""Real runs resumed on another layout reproduce the uninterrupted run.

The runs (fp32, dropout 0, records of equal length so that any split of a global batch gives the
same mean loss) train 6 steps with a checkpoint at 3; a copy of that run resumes from step 3 under
another layout with the same global batch (8 samples: 4 x 2 ranks, or 4 x 2 accumulated on one).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune import checkpoint
from finetune.config import load_config
from tests.conftest import read_metrics, run_grouped, run_train, selected_params
from tests.distributed.test_fidelity import equal_length_data  # noqa: F401 (a fixture: equal-length instruction records)
from tests.distributed.test_fidelity import run_args as fidelity_args

STEPS, RESUME_AT = 6, 3
# processes, booster config, method and settings of each layout; every one has a global batch of 8
LAYOUTS = {
    "ddp2": (2, "torch_ddp", "full", []),
    "single": (1, "torch_ddp", "full", ["train.grad_accum_steps=2"]),
    "zero2": (2, "zero2", "full", []),
    "fsdp": (2, "fsdp", "full", []),
    "ddp2_qlora": (2, "torch_ddp", "qlora", []),
    "single_qlora": (1, "torch_ddp", "qlora", ["train.grad_accum_steps=2"]),
    "fsdp_qlora": (2, "fsdp_cpu_offload", "qlora", []),  # plugin.cpu_offload=true: a no-op on CPU (forced off there)
    "pp2": (2, "pp2", "full", ["train.batch_size=8"]),  # one data-parallel rank
    "tp2": (2, "tp2", "full", ["train.batch_size=8"]),
}
# written under the first, resumed under the second, with the one line the resume must say
CASES = {
    "ddp2_to_single": ("ddp2", "single", "resuming a ddp x2 checkpoint under single:"),
    "single_to_ddp2": ("single", "ddp2", "resuming a single checkpoint under ddp x2:"),
    "zero2_to_fsdp": ("zero2", "fsdp", "resuming a zero2 x2 checkpoint under fsdp x2:"),
    "fsdp_to_ddp2": ("fsdp", "ddp2", "resuming a fsdp x2 checkpoint under ddp x2:"),
    # into ZeRO: each rank reads only its part of every optimizer state (finetune.parallel.zero.load_zero_optimizer)
    "fsdp_to_zero2": ("fsdp", "zero2", "resuming a fsdp x2 checkpoint under zero2 x2:"),
    "ddp2_qlora_to_single": ("ddp2_qlora", "single_qlora", "resuming a ddp x2 checkpoint under single:"),
    # the adapter trained on FSDP's sharded 4-bit base goes on over the whole (uint8-packed) base on one process
    "fsdp_qlora_to_single": ("fsdp_qlora", "single_qlora", "resuming a fsdp x2 checkpoint under single:"),
    # into a pipeline: GPT-2's tied lm_head (stored once) read from the input embedding on the last stage
    "ddp2_to_pp2": ("ddp2", "pp2", "resuming a ddp x2 checkpoint under pp2 1f1b:"),
    # into tensor parallelism: rows/columns read from one HF file, fused q/k/v split, the vocabulary padded
    "ddp2_to_tp2": ("ddp2", "tp2", "resuming a ddp x2 checkpoint under tp2:"),
}


def layout_args(layout: str, data: Path, out: Path) -> list[str]:
    """test_fidelity's settings (fp32, dropout 0, batch 4, clipping), 6 steps with a checkpoint at 3."""
    _, config, method, extra = LAYOUTS[layout]
    checkpoints = [f"train.max_steps={STEPS}", "eval.every_steps=0", f"checkpoint.every_steps={RESUME_AT}"]
    return fidelity_args(config, "tiny-gpt2", method, [*checkpoints, *extra], data, out)


def launch(layout: str, args: list[str]):
    nproc = LAYOUTS[layout][0]
    return run_train(args, launcher="torchrun" if nproc > 1 else "python", nproc=nproc)


@pytest.fixture(scope="module")
def uninterrupted(request, tmp_path_factory, equal_length_data) -> dict[str, Path]:  # noqa: F811
    """layout -> the output dir of its uninterrupted run: every layout a selected test writes under, in shared launches."""
    layouts = {CASES[case][0] for case in selected_params(request, "test_a_checkpoint_resumes_under_another_layout")}
    layouts |= {"ddp2"} if selected_params(request, "test_another_global_batch_goes_on_at_the_nearest_step_and_schedule", None) else set()
    root = tmp_path_factory.mktemp("any-layout")
    results = run_grouped({layout: (LAYOUTS[layout][0], layout_args(layout, equal_length_data, root / layout)) for layout in sorted(layouts)}, root / "launches")
    for layout, result in results.items():
        assert result.returncode == 0, result.stderr[-3000:]
    return {layout: root / layout for layout in results}


@pytest.fixture(scope="module")
def resumed(request, uninterrupted, tmp_path_factory, equal_length_data) -> dict[str, tuple[Path, object]]:  # noqa: F811
    """case -> (run dir, result): a copy of the written layout's run resumed from step 3 under the case's other layout."""
    root = tmp_path_factory.mktemp("resumed")
    runs = {}
    for case in selected_params(request, "test_a_checkpoint_resumes_under_another_layout"):
        written, layout, _ = CASES[case]
        shutil.copytree(uninterrupted[written], root / case)  # a checkpoint resumes only into its own run (output_dir)
        runs[case] = (LAYOUTS[layout][0], layout_args(layout, equal_length_data, root / case) + [f"resume_from={checkpoint.checkpoint_dir(str(root / case), RESUME_AT)}"])
    results = run_grouped(runs, root / "launches")
    return {case: (root / case, results[case]) for case in runs}


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}


def saved_weights(path: Path) -> dict[str, torch.Tensor]:
    """The adapter or the full weights a plugin's writer put in `path` (final/ or a checkpoint's model/)."""
    if (path / "adapter_model.safetensors").is_file():
        return load_file(path / "adapter_model.safetensors")
    return checkpoint.read_safetensors_dir(path)


@pytest.mark.distributed
@pytest.mark.timeout(2400)  # the first case waits for the shared launches (each bounded by run_many)
@pytest.mark.parametrize("case", list(CASES))
def test_a_checkpoint_resumes_under_another_layout(case, uninterrupted, resumed):
    written, _, line = CASES[case]
    reference, (run, result) = uninterrupted[written], resumed[case]
    assert result.returncode == 0, result.stderr[-3000:]
    said = [text for text in (result.stdout + result.stderr).splitlines() if "resuming a " in text]
    assert len(said) == 1 and line in said[0], said
    assert "resuming at step" not in result.stdout + result.stderr  # the same global batch: the sequence continues exactly
    expected, got = losses(reference), losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(RESUME_AT + 1, STEPS + 1):
        assert abs(got[step] - expected[step]) <= 1e-5 * max(1.0, abs(expected[step])), f"step {step}: {got[step]} vs {expected[step]}"
    a, b = saved_weights(reference / "final"), saved_weights(run / "final")
    # tied weights: a plugin's writer may store them once (HF) or twice (FSDP's gathered state dict)
    shared = a.keys() & b.keys()
    assert shared == a.keys() or shared == b.keys(), sorted(a.keys() ^ b.keys())
    at_checkpoint = saved_weights(checkpoint.checkpoint_dir(str(reference), RESUME_AT) / "model")
    moved = max((a[k].float() - at_checkpoint[k].float()).abs().max().item() for k in shared & at_checkpoint.keys())
    assert moved > 1e-3, "the weights barely moved after the checkpoint: the comparison would mean nothing"
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in shared)
    assert worst <= 1e-4, f"final weights differ by {worst}"
    state = json.loads((checkpoint.checkpoint_dir(str(reference), RESUME_AT) / "state.json").read_text())
    assert state["samples_seen"] == RESUME_AT * state["global_batch"] == RESUME_AT * 8


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_another_global_batch_goes_on_at_the_nearest_step_and_schedule(uninterrupted, equal_length_data, tmp_path):  # noqa: F811
    """ddp x2 at 8 a step, resumed on one process at 4 a step: its step 3 (24 samples) is step 6 there, and the LR schedule follows."""
    from finetune.run import build_scheduler

    run = tmp_path / "run"
    shutil.copytree(uninterrupted["ddp2"], run)
    args = layout_args("single", equal_length_data, run) + ["train.grad_accum_steps=1", "train.max_steps=8", f"resume_from={checkpoint.checkpoint_dir(str(run), RESUME_AT)}"]
    result = launch("single", args)
    assert result.returncode == 0, result.stderr[-3000:]
    said = [text for text in (result.stdout + result.stderr).splitlines() if "resuming at step" in text]
    assert len(said) == 1 and said[0].startswith("resuming at step 6, not 3:") and "24 samples into epoch 0" in said[0] and "exactly there" in said[0], said
    logged = {m["step"]: m["lr"] for m in read_metrics(run) if "lr" in m and m["step"] > RESUME_AT}
    assert sorted(logged) == [7, 8]
    cfg = load_config(args, world_size=1)
    scheduler = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr), cfg, total_steps=8)
    expected = {step: cfg.train.lr * scheduler.lr_lambdas[0](step) for step in (7, 8)}
    assert logged == pytest.approx(expected, rel=1e-6) and expected[7] != expected[8]
