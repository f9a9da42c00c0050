"""Resume on any layout: a checkpoint written under one plugin / world size / split of the global batch
resumes under another (weights and optimizer states are full and by parameter name; the data position
is a global sample index): where a resume goes on, what it refuses, and how a ZeRO rank reads its part
(tests/distributed/test_resharding.py resumes real runs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune import checkpoint
from finetune.config import load_config, parallel_plan
from finetune.parallel import zero
from tests.distributed.test_fidelity import equal_length_data  # noqa: F401 (a fixture: equal-length instruction records)


def state_of(argv: list[str], world_size: int, step: int = 6, steps_per_epoch: int = 4) -> dict:
    """What state.json records of a run with these settings (on a CUDA machine, which Gemini needs), at `step`."""
    cfg = load_config(argv, world_size=world_size, has_cuda=True)
    batch = cfg.train.batch_size * cfg.train.grad_accum_steps * parallel_plan(cfg, world_size).dp
    return {"step": step, "steps_per_epoch": steps_per_epoch, "global_batch": batch, "samples_seen": step * batch, "identity": checkpoint.identity(cfg, world_size)}


@pytest.mark.parametrize("shape", [(7, 5), (1,), (), (3, 2, 4)])
def test_a_zero_rank_reads_the_part_zero_would_cut_from_the_full_tensor(shape, tmp_path):
    """load_zero_optimizer's slice reading equals LowLevelZeroOptimizer.load_state_dict's split: flattened,
    zero-padded to a multiple of the group's size, split evenly (ranks past a small tensor get zeros)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    full = torch.randn(shape)
    save_file({"state/w/exp_avg": full}, tmp_path / "t.safetensors")
    with safe_open(tmp_path / "t.safetensors", "pt") as handle:
        for size in (1, 2, 3, 8):
            pad = (size - full.numel() % size) % size
            expected = torch.nn.functional.pad(full.flatten(), [0, pad]).split((full.numel() + pad) // size)
            for rank in range(size):
                assert torch.equal(zero.zero_part(handle, "state/w/exp_avg", size, rank), expected[rank])


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


def test_the_same_global_batch_with_other_steps_an_epoch_keeps_the_epoch_and_its_offset():
    # e.g. 43 samples: 2 ranks x 4 pad to 44 (5 steps of 8), 8 ranks x 1 pad to 48 (6 steps of 8)
    got, line = checkpoint.resume_position({"step": 7, "steps_per_epoch": 5, "global_batch": 8}, 8, 6)
    assert got == 8  # epoch 1, 2 steps in
    assert "(5 steps an epoch)" in line and "8 (6 steps an epoch)" in line and "16 samples into epoch 1" in line and "exactly there" in line


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
    bigger_buckets = load_config(["--config", "booster_configs/zero2.yaml", *DDP, "plugin.reduce_bucket_size_in_m=24"], world_size=2)
    assert checkpoint.layout_change_line(state, bigger_buckets, 2).startswith("resuming a zero2 x2 checkpoint under zero2 x2 with other plugin settings:")


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


def test_the_lr_schedule_follows_the_resumed_run_s_step_count():
    from transformers import get_scheduler

    def scheduler_after(steps: int):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=20)
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
        return optimizer, scheduler

    optimizer, scheduler = scheduler_after(6)
    optimizer.param_groups[0]["lr"] = 123.0  # what a restored optimizer state may hold: the schedule must overwrite it
    checkpoint.move_scheduler(scheduler, 9)
    _, expected = scheduler_after(9)
    assert scheduler.last_epoch == 9 and optimizer.param_groups[0]["lr"] == pytest.approx(expected.get_last_lr()[0]) == pytest.approx(scheduler.get_last_lr()[0])
    assert expected.get_last_lr()[0] != scheduler_after(6)[1].get_last_lr()[0]  # the move changed something


def test_checkpoints_are_ordered_by_samples_trained_on_not_by_step_number(tmp_path):
    """After a resume under a global batch twice as large, step 4 of the new run comes after step 6 of the old one."""

    def fake(step: int, batch: int) -> Path:
        path = checkpoint.checkpoint_dir(str(tmp_path), step)
        path.mkdir(parents=True)
        (path / "state.json").write_text(json.dumps({"step": step, "samples_seen": step * batch}))
        return path

    old_3, old_6, new_4, old_7 = fake(3, 4), fake(6, 4), fake(4, 8), fake(7, 4)
    assert checkpoint.complete_checkpoints(str(tmp_path)) == [old_3, old_6, old_7, new_4]
    fence = checkpoint.fence_newer(str(tmp_path), old_6)  # resuming from step 6 abandons what came after it
    assert sorted(p.name for p in fence.iterdir()) == [new_4.name, old_7.name]
    assert checkpoint.complete_checkpoints(str(tmp_path)) == [old_3, old_6]


def test_gemini_layout_changes_are_refused_in_one_line():
    state = state_of(["--config", "booster_configs/gemini.yaml", *DDP], 2)
    with pytest.raises(checkpoint.CheckpointError, match=r"gemini checkpoints are not resharded .*\(Gemini runs on CUDA only") as err:
        checkpoint.check_compatible(state, load_config(DDP, world_size=2), 2)
    assert "\n" not in str(err.value)
