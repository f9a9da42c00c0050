"""The checkpoint store: atomic step directories with a manifest, prune, the fence of an abandoned branch, and final/;
saving and loading a checkpoint, every rank taking part (the package docstring has the layout on disk)."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist
from safetensors import SafetensorError

from finetune.checkpoint.files import fsync, read_json, rng_state, sync_tree, write_tree
from finetune.config import Config, mutates_base, to_dict
from finetune.errors import CheckpointError, shown
from finetune.model import write_as_plain_lora

if TYPE_CHECKING:
    from finetune.run import Run


CHECKPOINTS = "checkpoints"


READABLE_FORMATS = (1, 2)  # format 1's weights (safetensors) can still be exported; only 2 resumes


FORMAT_VERSION = 2  # 2: no pickle anywhere (1 pickled optimizer, scheduler and RNG states)


# What a resumed run must share with the run that wrote the checkpoint: anything else (max_steps, lr,
# eval and checkpoint settings, output paths) may change between the two.
IDENTITY_KEYS = (
    "task", "method", "model", "lora", "quantization", "plugin", "world_size",
    "data.train_path", "data.weights", "data.eval_path", "data.eval_fraction", "data.split_slice", "data.max_length", "data.truncation",
    "data.packing", "data.labels", "data.text_field", "data.text_pair_field", "data.label_field",
    "train.seed", "train.batch_size", "train.grad_accum_steps", "train.precision",
)  # fmt: skip


ADDED_IDENTITY = {"data.weights": []}  # identity keys added later: a checkpoint written before had them at this value


def identity(cfg: Config, world_size: int) -> dict:
    """The settings a checkpoint records and a resume must match."""
    tree = {**to_dict(cfg), "world_size": world_size}
    return {key: functools.reduce(lambda node, part: node[part], key.split("."), tree) for key in IDENTITY_KEYS}


def checkpoint_dir(output_dir: str, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step_{step:08d}"


def complete_checkpoints(output_dir: str) -> list[Path]:
    """Complete checkpoints of a run, oldest first (directories with a manifest, never `.partial` ones)."""
    root = Path(output_dir) / CHECKPOINTS
    # a link (the step dir, its state.json) would have the run read outside output_dir just to order them
    found = [p for p in root.glob("step_*") if p.is_dir() and not p.is_symlink() and not p.name.endswith(".partial") and (p / "state.json").is_file() and not (p / "state.json").is_symlink()]
    return sorted(found, key=training_order)


def training_order(path: Path) -> tuple[int, str]:
    """A checkpoint's place in its run: samples trained on, then name (after a resume under another global
    batch, step numbers count steps of another size)."""
    try:
        return int(json.loads((path / "state.json").read_text())["samples_seen"]), path.name
    except (OSError, ValueError, KeyError, TypeError):
        return -1, path.name  # an unreadable manifest: verify() names the problem if it is ever resumed


def manifest(path: Path) -> dict[str, int]:
    """Every file under a checkpoint with its size (its sha256 come from sync_tree)."""
    # Every file but the manifest itself (optimizer/state.json is a file of the checkpoint like any other).
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file() and p != path / "state.json"}


def config_hash(cfg: Config, world_size: int) -> str:
    return hashlib.sha256(json.dumps(identity(cfg, world_size), sort_keys=True).encode()).hexdigest()[:16]


def remove_partial(output_dir: str) -> list[Path]:
    """Delete half-written checkpoints a crash left behind (rank 0, before training)."""
    partial = sorted((Path(output_dir) / CHECKPOINTS).glob("*.partial"))
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def prune(output_dir: str, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints (0 keeps all)."""
    if keep_last > 0:
        for path in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)


def fence_newer(output_dir: str, resumed: Path) -> Path | None:
    """A run resumed from `resumed` owns its lineage: move the abandoned branch's newer checkpoints aside (rank 0). Returns where."""
    newer = [p for p in complete_checkpoints(output_dir) if training_order(p) > training_order(resumed)]
    if not newer:
        return None
    fence = Path(output_dir) / CHECKPOINTS / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    fence.mkdir()
    for path in newer:
        path.rename(fence / path.name)
    return fence


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


OUT_OF_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


@contextlib.contextmanager
def out_of_space_is_an_error(what: str, output_dir: str):
    """A full disk (or quota, or file-size limit) while writing `what` becomes one line. Nothing complete is
    lost: writes go to a .partial dir, so the last complete checkpoint and final/ stay as they were."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        full = err.errno in OUT_OF_SPACE if isinstance(err, OSError) else any(f"os error {code}" in str(err) for code in OUT_OF_SPACE)
        if not full:
            raise
        found = complete_checkpoints(output_dir)
        last = f"the last complete checkpoint, {found[-1]}, and final/ are untouched" if found else "no complete checkpoint exists yet; final/ is untouched"
        raise CheckpointError(f"out of space writing {what} ({str(err).splitlines()[0][:120]}): it stays a .partial dir; {last}. Free space, then resume_from=latest") from None


def save_checkpoint(run: Run, step: int) -> Path:
    """Write checkpoint `step` atomically; every rank takes part. Returns its directory.

    model/ holds what the run trains (the weights, or the adapter in peft layout) and optimizer/ its
    state, each written by the run's plugin (the same writer as final/).
    """
    cfg, rank = run.cfg, dist.get_rank()
    final = checkpoint_dir(cfg.output_dir, step)
    staging = final.with_name(final.name + ".partial")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    with out_of_space_is_an_error(f"checkpoint {step}", cfg.output_dir):
        run.plugin.write_model(run.state, staging / "model")
        run.plugin.write_optimizer(run.state, staging / "optimizer")
        write_tree(rng_state(), staging / "rng" / f"rank_{rank}")
        if rank == 0:
            (staging / "scheduler.json").write_text(json.dumps(run.scheduler.state_dict()) + "\n")  # plain data
            write_loss_scale(run.optimizer, staging)
    run.faults.maybe_kill("kill_in_checkpoint", step)
    barrier()  # every rank's files are on disk
    if rank == 0:
        world = dist.get_world_size()
        state = {
            "format": FORMAT_VERSION,
            "step": step,
            "steps_per_epoch": run.steps_per_epoch,
            "epoch": step // run.steps_per_epoch,
            "global_batch": global_batch(run),
            "samples_seen": step * global_batch(run),
            "config_hash": config_hash(cfg, world),
            "identity": identity(cfg, world),
            "config": to_dict(cfg),
            "files": manifest(staging),
            "sha256": sync_tree(staging),  # every file on disk before the manifest that vouches for it
        }
        (staging / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        fsync(staging / "state.json")
        fsync(staging)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)  # the checkpoint exists only once it is complete
        fsync(final.parent)  # the rename itself survives a power loss
        prune(cfg.output_dir, cfg.checkpoint.keep_last)
    barrier()
    return final


def write_final(run: Run, tokenizer) -> Path:
    """final/: a peft adapter dir or a HF model dir (the plugin's writer), tokenizer and task files, renamed into place complete."""
    final = Path(run.cfg.output_dir) / "final"
    staging = final.with_name("final.partial")
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    with out_of_space_is_an_error("final/", run.cfg.output_dir):
        run.plugin.write_model(run.state, staging)
        if dist.get_rank() == 0:
            if run.lora_config is not None and mutates_base(run.cfg.lora.init):  # final/ goes onto the original base
                write_as_plain_lora(run.cfg, run.lora_config, staging, run.task.labels_or_none, run.method.frozen_dtype(run.cfg.train.precision))
            tokenizer.save_pretrained(staging)
            run.task.write_artifacts(staging)
    if dist.get_rank() == 0:
        sync_tree(staging, hash_files=False)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)  # only a complete save becomes final/
        fsync(final.parent)
    barrier()
    return final


LOSS_SCALE_FILE = "loss_scale.json"  # fp16 only: {"scale": float, "good_steps": int}, the same for every rank


def write_loss_scale(optimizer, staging: Path) -> None:
    """Rank 0: the fp16 loss scale, so that a resume goes on at the scale it had (not at 2^16 again)."""
    from finetune.loss_scaling import loss_scale_state

    state = loss_scale_state(optimizer)
    if state is not None:
        (staging / LOSS_SCALE_FILE).write_text(json.dumps(state) + "\n")


def read_loss_scale(optimizer, path: Path) -> None:
    """The checkpoint's fp16 loss scale into this run's scaler, where both have one (another precision starts afresh)."""
    from finetune.loss_scaling import load_loss_scale_state

    file = path / LOSS_SCALE_FILE
    if not file.is_file():
        return
    state = read_json(file)
    scale, good = (state.get("scale"), state.get("good_steps")) if isinstance(state, dict) else (None, None)
    if not (isinstance(scale, float) and math.isfinite(scale) and scale > 0 and type(good) is int and good >= 0):
        raise CheckpointError(f"resume_from: {file} must hold a positive finite scale and a whole number of good_steps, got {shown(state)}")
    load_loss_scale_state(optimizer, state)


@contextlib.contextmanager
def failing_together():
    """A CheckpointError on any rank is raised on every rank, so rank 0 reports it: ranks read different
    files (pipeline stages, per-rank RNG), and one failing alone would leave the others waiting in the next
    collective. Every rank must reach the end of the block (a collective inside it must not be left half-way)."""
    error = None
    try:
        yield
    except CheckpointError as err:
        error = str(err)
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise CheckpointError(first)


def move_scheduler(scheduler, step: int) -> None:
    """Put a restored LR scheduler at `step` of this run's schedule (its lr set on the optimizer too): a
    resume under another global batch counts its own steps."""
    if scheduler.last_epoch != step:
        scheduler.last_epoch = step - 1
        scheduler.step()  # the schedule's closed form at `step`; _step_count > 1 after a restore: no ordering warning


def rng_stem(path: Path, rank: int) -> Path:
    """This rank's RNG state in a checkpoint; a rank the writing run did not have takes rank 0's (a fresh run seeds every rank alike)."""
    own = path / "rng" / f"rank_{rank}"
    return own if own.with_name(own.name + ".json").is_file() else path / "rng" / "rank_0"


def global_batch(run: Run) -> int:
    """Samples per optimizer step over all data-parallel ranks."""
    return run.cfg.train.batch_size * run.cfg.train.grad_accum_steps * run.layout.dp_size
