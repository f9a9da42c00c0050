"""Tensor/pipeline-parallel checkpoints resume on another layout (issue 16): a run under layout X writes a
checkpoint at step 3 of 6, a copy of its output dir resumes from it under layout Y, and Y's steps 4-6 and
final weights must be X's (fp32, dropout 0, equal-length samples, so any split of a batch has the same
mean loss). The uninterrupted X run is the reference. The pp2 case is also the SIGTERM acceptance: its
checkpoint is written by a preempted pp2 run, and the resume goes on under tp2 x pp2 (4 ranks).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from finetune import checkpoint
from tests.conftest import REPO, run_grouped, selected_params
from tests.distributed.test_checkpoint import final_weights, launch, launch_ranks, train_losses
from tests.distributed.test_fidelity import equal_length_data  # noqa: F401 (a fixture)

pytestmark = pytest.mark.distributed

STEPS, CHECKPOINT_AT = 6, 3
LOSS, WEIGHTS = 1e-5, 1e-4
LLAMA_FULL = ["model.name=tiny-llama", "method=full"]
GPT2_LORA = ["model.name=tiny-gpt2", "method=lora", "lora.target_modules=[c_attn,c_proj]"]  # fused q/k/v rows split under TP
LLAMA_QLORA = ["model.name=tiny-llama-wide", "method=qlora", "quantization.double_quant=false"]  # 4-bit shards quantized per rank under TP


def run_args(layout: str, data: Path, out: Path, extra: list[str]) -> list[str]:
    """A 6-step run under booster_configs/`layout`.yaml with a checkpoint at step 3 (and 6); `extra` wins."""
    return [
        "--config", str(REPO / "booster_configs" / f"{layout}.yaml"),
        f"data.train_path={data}", "data.max_length=64", "data.eval_fraction=0.1", f"output_dir={out}",
        f"train.max_steps={STEPS}", "train.batch_size=4", "train.lr=5e-3", "train.warmup_steps=1", "train.max_grad_norm=1.0",
        "lora.dropout=0", "eval.num_generation_prompts=0", f"checkpoint.every_steps={CHECKPOINT_AT}", *extra,
    ]  # fmt: skip


def assert_continues(reference: Path, resumed: Path) -> None:
    """Steps 4-6 and the final weights of the resumed run are the uninterrupted run's."""
    expected, got = train_losses(reference), train_losses(resumed)
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    for step in range(CHECKPOINT_AT + 1, STEPS + 1):
        assert abs(got[step] - expected[step]) <= LOSS * max(1.0, abs(expected[step])), f"step {step}: {got[step]} vs {expected[step]}"
    a, b = final_weights(reference), final_weights(resumed)
    assert a.keys() == b.keys()
    at_checkpoint = weights_in(checkpoint.checkpoint_dir(str(reference), CHECKPOINT_AT) / "model")
    moved = max((a[k].float() - at_checkpoint[k].float()).abs().max().item() for k in a.keys() & at_checkpoint.keys())
    assert moved > 1e-3, "the weights barely moved after the checkpoint: the comparison would mean nothing"
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= WEIGHTS, f"final weights differ by {worst}"


def weights_in(path: Path) -> dict:
    """A checkpoint's model/: the adapter, or the full weights (sharded under tensor/pipeline parallelism)."""
    return load_file(path / "adapter_model.safetensors") if (path / "adapter_model.safetensors").is_file() else checkpoint.read_safetensors_dir(path)


# The uninterrupted runs (layout, its settings) and the resumes of their step-3 checkpoints under another layout
# (written layout, resumed layout, its settings) that each test needs; they share launches (tests/run_many.py).
UNINTERRUPTED = {"tp2": LLAMA_FULL, "pp2": LLAMA_FULL, "tp2_lora": GPT2_LORA, "tp2_qlora": LLAMA_QLORA, "sp2_lora": LLAMA_FULL}
RESUMES = {
    "tp2-to-pp2": ("tp2", "pp2", LLAMA_FULL),
    "tp2-lora-to-ddp2": ("tp2_lora", "torch_ddp", [*GPT2_LORA, "train.batch_size=2"]),  # ddp2 x 2 samples: tp2's global batch of 4
    "tp2-qlora-to-one": ("tp2_qlora", "torch_ddp", LLAMA_QLORA),  # one process, the model quantized whole
    "sp2-to-ddp2": ("sp2_lora", "torch_ddp", [*LLAMA_FULL, "train.batch_size=2"]),  # sp2's ranks share one batch of 4
}
CONFIGS = {"tp2_qlora": "tp2_lora"}  # a run's booster_configs/ file where its name is not one
RANKS = {"tp2-qlora-to-one": 1}  # processes where 2 are not meant
NEEDS = {
    "test_sp2_checkpoint_resumes_under_ddp2": ["sp2-to-ddp2"],
    "test_tp2_checkpoint_resumes_under_pp2": ["tp2-to-pp2"],
    "test_pp2_preempted_checkpoint_resumes_under_tp2_pp2": ["pp2"],
    "test_tp2_lora_checkpoint_resumes_under_ddp2": ["tp2-lora-to-ddp2"],
    "test_tp2_qlora_checkpoint_resumes_in_one_process": ["tp2-qlora-to-one"],
}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, equal_length_data) -> tuple[Path, dict]:  # noqa: F811
    """(the module's run dir, name -> result) with every uninterrupted run and resume the selected tests need."""
    root = tmp_path_factory.mktemp("hybrid-reshard")
    needed = {name for test, names in NEEDS.items() if selected_params(request, test, None) for name in names}
    layouts = {name for name in needed if name in UNINTERRUPTED} | {RESUMES[name][0] for name in needed if name in RESUMES}
    results = run_grouped({layout: (2, run_args(CONFIGS.get(layout, layout), equal_length_data, root / layout, UNINTERRUPTED[layout])) for layout in sorted(layouts)}, root / "launches")
    resumes = {}
    for name in sorted(needed & RESUMES.keys()):
        written, layout, extra = RESUMES[name]
        if results[written].returncode == 0:
            shutil.copytree(root / written, root / name)  # a checkpoint resumes only into its own run (output_dir)
            resumes[name] = (RANKS.get(name, 2), run_args(layout, equal_length_data, root / name, extra) + [f"resume_from={checkpoint.checkpoint_dir(str(root / name), CHECKPOINT_AT)}"])
    results.update(run_grouped(resumes, root / "resume-launches"))
    return root, results


def succeeded(runs: tuple[Path, dict], *names: str) -> str:
    """The named runs' output (all of it), asserting that each succeeded."""
    for name in names:
        result = runs[1][name]
        assert result.returncode == 0, result.stderr[-3000:]
    return "".join(runs[1][name].stdout + runs[1][name].stderr for name in names)


@pytest.mark.timeout(1800)  # the first test waits for the shared launches (each bounded by run_many)
def test_tp2_checkpoint_resumes_under_pp2(runs):
    root, _ = runs
    succeeded(runs, "tp2")
    optimizer = checkpoint.checkpoint_dir(str(root / "tp2"), CHECKPOINT_AT) / "optimizer"
    # the optimizer state is any layout's: full tensors by parameter name, the padded vocabulary unpadded
    assert not list(optimizer.glob("rank_*"))
    state = checkpoint.read_tree(optimizer / "state")
    assert state["state"]["lm_head.weight"]["exp_avg"].shape == (50257, 64)
    assert state["state"]["model.layers.0.self_attn.q_proj.weight"]["exp_avg"].shape == (64, 64)
    assert "resuming a tp2 checkpoint under pp2 1f1b:" in succeeded(runs, "tp2-to-pp2")
    assert_continues(root / "tp2", root / "tp2-to-pp2")


@pytest.mark.timeout(1200)
def test_pp2_preempted_checkpoint_resumes_under_tp2_pp2(equal_length_data, runs):  # noqa: F811
    """SIGTERM under pp2 after step 3 (rank 0 only hears it): both stages stop there, write one checkpoint, exit 3;
    the resume under tp2 x pp2 (4 ranks) ends where the uninterrupted pp2 run ends."""
    from finetune.preemption import PREEMPTED_EXIT_CODE

    root, _ = runs
    succeeded(runs, "pp2")
    pp2, stopped = root / "pp2", root / "pp2-stopped"
    ranks = launch_ranks(run_args("pp2", equal_length_data, stopped, [*LLAMA_FULL, "checkpoint.every_steps=0"]), 2, f"sigterm_after_step:{CHECKPOINT_AT}", root / "logs")
    assert [r.returncode for r in ranks] == [PREEMPTED_EXIT_CODE] * 2, ranks[0].stderr[-3000:]
    assert f"preempted: stopped after step {CHECKPOINT_AT}" in ranks[0].stdout and not (stopped / "final").exists()
    assert [p.name for p in checkpoint.complete_checkpoints(str(stopped))] == [f"step_{CHECKPOINT_AT:08d}"]
    optimizer = checkpoint.checkpoint_dir(str(stopped), CHECKPOINT_AT) / "optimizer"
    assert sorted(p.name for p in optimizer.glob("*.safetensors")) == ["state-stage-00001.safetensors", "state-stage-00002.safetensors"]
    with safe_open(optimizer / "state-stage-00001.safetensors", "pt") as f:  # each stage wrote only its own layers
        assert any(".layers.0." in k for k in f.keys()) and not any(".layers.1." in k for k in f.keys())
    assert max(train_losses(stopped)) == CHECKPOINT_AT
    assert_one_line_when_one_stage_cannot_read(stopped, equal_length_data, root / "pp2-broken")
    resumed = launch(run_args("tp2_pp2", equal_length_data, stopped, [*LLAMA_FULL, "checkpoint.every_steps=0", "resume_from=latest"]), 4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming a pp2 1f1b checkpoint under tp2 pp2 1f1b:" in resumed.stdout + resumed.stderr
    assert_continues(pp2, stopped)


def assert_one_line_when_one_stage_cannot_read(run: Path, data: Path, copy: Path) -> None:
    """A tensor only the last stage reads is missing from the index (the manifest re-signed, as an editor
    would): that stage's error reaches rank 0, which says it in one line, and no rank waits forever."""
    shutil.copytree(run, copy)
    ckpt = checkpoint.checkpoint_dir(str(copy), CHECKPOINT_AT)
    index = ckpt / "optimizer" / "state.safetensors.index.json"
    dropped = "state/model.layers.1.mlp.down_proj.weight/exp_avg"
    weight_map = json.loads(index.read_text())["weight_map"]
    del weight_map[dropped]
    index.write_text(json.dumps({"weight_map": weight_map}))
    state = json.loads((ckpt / "state.json").read_text())
    state["files"] = checkpoint.manifest(ckpt)
    state["sha256"] = {name: checkpoint.file_sha256(ckpt / name) for name in state["files"]}
    (ckpt / "state.json").write_text(json.dumps(state))
    result = launch(run_args("pp2", data, copy, [*LLAMA_FULL, "resume_from=latest"]), 2)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1 and dropped in errors[0], result.stderr[-3000:]


@pytest.mark.timeout(1800)
def test_tp2_lora_checkpoint_resumes_under_ddp2(runs):
    root, _ = runs
    assert "resuming a tp2 checkpoint under ddp x2:" in succeeded(runs, "tp2_lora", "tp2-lora-to-ddp2")
    assert_continues(root / "tp2_lora", root / "tp2-lora-to-ddp2")


@pytest.mark.timeout(1800)
def test_tp2_qlora_checkpoint_resumes_in_one_process(runs):
    """QLoRA under tp2 (each rank quantized its shards) resumes in one process on the model quantized whole: the shards
    were bit-identical slices of it, so steps 4-6 and the gathered adapter are the tp2 run's."""
    root, _ = runs
    assert "resuming a tp2 checkpoint under" in succeeded(runs, "tp2_qlora", "tp2-qlora-to-one")
    assert_continues(root / "tp2_qlora", root / "tp2-qlora-to-one")


def test_sp2_checkpoint_resumes_under_ddp2(runs):
    """A sequence-parallel (all_to_all) run's checkpoint goes on under plain DDP exactly (issue 27)."""
    root, _ = runs
    assert "resuming a sp2 all_to_all checkpoint under ddp x2:" in succeeded(runs, "sp2_lora", "sp2-to-ddp2")
    assert_continues(root / "sp2_lora", root / "sp2-to-ddp2")
