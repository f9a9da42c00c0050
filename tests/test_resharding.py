"""Resume on any layout: a checkpoint written under one plugin / world size / split of the global batch
resumes under another (weights and optimizer states are full and by parameter name; the data position
is a global sample index), reproducing the uninterrupted run."""

from __future__ import annotations

import pytest

from finetune import checkpoint
from finetune.booster import PLUGINS, TorchDDP, register
from finetune.config import load_config, parallel_plan


def state_of(argv: list[str], world_size: int, step: int = 6, steps_per_epoch: int = 4) -> dict:
    """What state.json records of a run with these settings, at `step`."""
    cfg = load_config(argv, world_size=world_size)
    batch = cfg.train.batch_size * cfg.train.grad_accum_steps * parallel_plan(cfg, world_size).dp
    return {"step": step, "steps_per_epoch": steps_per_epoch, "global_batch": batch, "samples_seen": step * batch, "identity": checkpoint.identity(cfg, world_size)}


def test_same_global_batch_continues_exactly():
    assert checkpoint.resume_position({"step": 6, "steps_per_epoch": 4, "global_batch": 8}, 8, 4) == (6, "")
    # checkpoints written before global_batch was recorded: samples_seen / step
    assert checkpoint.resume_position({"step": 6, "steps_per_epoch": 4, "samples_seen": 48}, 8, 4) == (6, "")


@pytest.mark.parametrize(
    "batch, per_epoch, start, drift",
    [
        (16, 2, 3, "exactly there"),  # 16 samples into epoch 1 = one step of 16
        (6, 5, 8, "2 samples of the epoch skipped"),  # 16 / 6 = 2.7 -> boundary 3 (18 samples)
        (12, 2, 3, "4 samples of the epoch seen again"),  # 16 / 12 = 1.3 -> boundary 1 (12 samples)
    ],
)
def test_another_global_batch_goes_on_at_the_nearest_step_boundary(batch, per_epoch, start, drift):
    # the checkpoint: step 6 of 4-step epochs at 8 samples a step = epoch 1, 16 samples in
    got, line = checkpoint.resume_position({"step": 6, "steps_per_epoch": 4, "global_batch": 8}, batch, per_epoch)
    assert got == start
    assert "\n" not in line and line.startswith(f"resuming at step {start}, not 6:")
    assert "16 samples into epoch 1" in line and drift in line and "LR schedule" in line


def test_a_batch_past_the_epoch_end_goes_on_with_the_next_epoch():
    # 3 steps of 8 into a 4-step epoch = 24 samples; at 32 a step (1 step an epoch) the nearest boundary is the epoch's end
    got, line = checkpoint.resume_position({"step": 3, "steps_per_epoch": 4, "global_batch": 8}, 32, 1)
    assert got == 1 and "8 samples of the epoch skipped" in line


DDP = ["model.name=tiny-gpt2", "method=full"]


def test_layout_and_batch_split_changes_resume_with_one_line():
    state = state_of(["--config", "booster_configs/zero2.yaml", *DDP], 2)
    for argv, world, label in [
        (["--config", "booster_configs/fsdp.yaml", *DDP], 2, "resuming a zero2 x2 checkpoint under fsdp x2:"),
        ([*DDP, "train.grad_accum_steps=2"], 1, "resuming a zero2 x2 checkpoint under single:"),
        (["--config", "booster_configs/zero1.yaml", *DDP, "train.batch_size=2"], 4, "resuming a zero2 x2 checkpoint under zero1 x4:"),
    ]:
        cfg = load_config(argv, world_size=world)
        checkpoint.check_compatible(state, cfg, world)  # no refusal
        line = checkpoint.layout_change_line(state, cfg, world)
        assert line.startswith(label) and "\n" not in line, line
    same = load_config(["--config", "booster_configs/zero2.yaml", *DDP, "train.batch_size=2"], world_size=2)
    assert checkpoint.layout_change_line(state, same, 2) == ""  # only the batch split changed: resume_position says that


def test_what_is_trained_must_still_match_and_tensor_pipeline_layouts_reshard():
    state = state_of(DDP, 2)
    with pytest.raises(checkpoint.CheckpointError, match=r'model.name="tiny-gpt2", this run has model.name="tiny-llama"; resume with the same model'):
        checkpoint.check_compatible(state, load_config(["model.name=tiny-llama", "method=full"], world_size=2), 2)
    with pytest.raises(checkpoint.CheckpointError, match="train.seed=.*; resume with the same train.seed"):
        checkpoint.check_compatible(state, load_config([*DDP, "train.seed=7"], world_size=2), 2)
    # tensor/pipeline parallelism writes and reads full tensors by name too: both ways resume
    tp2 = load_config(["--config", "booster_configs/tp2.yaml", *DDP], world_size=2)
    checkpoint.check_compatible(state, tp2, 2)
    assert checkpoint.layout_change_line(state, tp2, 2).startswith("resuming a ddp x2 checkpoint under tp2:")
    tp2_pp2 = state_of(["--config", "booster_configs/tp2_pp2.yaml", *DDP], 4)
    checkpoint.check_compatible(tp2_pp2, load_config(DDP, world_size=1), 1)


class PinnedDDP(TorchDDP):
    """A plugin registered by a test whose checkpoints resume only on the layout that wrote them."""

    name = "test_pinned_ddp"
    resume_layout_refusal = "its optimizer states are saved per rank"


def test_a_plugin_bound_to_its_layout_says_why_in_one_line():
    register(PinnedDDP())
    try:
        pinned = load_config(["plugin.name=test_pinned_ddp", *DDP], world_size=2)
        with pytest.raises(checkpoint.CheckpointError, match=r'plugin.name="torch_ddp", this run has plugin.name="test_pinned_ddp"; test_pinned_ddp checkpoints are not resharded') as err:
            checkpoint.check_compatible(state_of(DDP, 2), pinned, 2)
        assert "\n" not in str(err.value)
        checkpoint.check_compatible(state_of(["plugin.name=test_pinned_ddp", *DDP], 2), pinned, 2)  # its own layout resumes
    finally:
        del PLUGINS[PinnedDDP.name]
