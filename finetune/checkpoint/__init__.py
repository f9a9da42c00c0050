"""Checkpoints that survive crashes: periodic, atomic, exactly resumable, safe to load.

    output_dir/checkpoints/step_00000040/
        model/           full fine-tuning: the Booster's sharded model checkpoint (safetensors);
                         (Q)LoRA: the adapter only, in peft layout (adapter_model.safetensors)
        optimizer/       state.safetensors + state.json: the full optimizer state, its tensors keyed by
                         parameter name ("state/<name>/exp_avg"), step counters and hyper-parameters in
                         JSON; under tensor/pipeline parallelism the same, its tensors gathered along
                         their splits, one file per pipeline stage (state-stage-0000K.safetensors) listed
                         in state.safetensors.index.json
        scheduler.json   LR scheduler state (plain data)
        loss_scale.json  fp16 only: the loss scale and its good steps (every plugin's scaler reads it)
        rng/rank_N.*     every rank's torch / numpy RNG states (tensors) and python's (JSON)
        state.json       step, epoch, steps an epoch, global batch, samples seen, what produced it, file sizes and sha256

Any layout: weights (or the adapter) and optimizer states are full tensors by parameter name, so a checkpoint
resumes under another plugin, world size or split of the global batch (batch_size x grad_accum_steps x
data-parallel ranks; tensor/pipeline parallelism included: a rank reads only its parameters' tensors). The data
position is a global sample index: the same global batch continues the same batch sequence; another one
continues at the nearest step boundary, said in one line (resume_position).

Atomicity: every rank writes into `step_N.partial/`; only when all ranks are done does rank 0 write
state.json (the manifest, listing every file with its size and sha256), fsync every file and
directory, and rename the directory into place. A crash or a power loss at any moment leaves the
previous checkpoints untouched and at most a `.partial` directory, which is ignored and removed by
the next run. `resume_from=latest` takes the newest complete one; a resume verifies sizes and hashes.

Lineage: a checkpoint is resumed only into the run that wrote it (its output_dir), and a run resumed
from an older checkpoint moves the newer ones of the abandoned branch into `checkpoints/abandoned-TIME/`.

Safe loading: nothing in a checkpoint is unpickled, and nothing outside it is read. This project writes and reads every file itself as
safetensors + JSON (never torch.load, pickle, or a ColossalAI loader that unpickles); the sharded full
weights that ColossalAI reads back (Gemini, tensor/pipeline parallelism) must be safetensors files
listed in their index. Format 1 checkpoints (pickled optimizer, scheduler and RNG) are refused at resume.
verify() checks, before any model is built, every field of state.json for type and range, that no file the
checkpoint names (manifest, indexes) or links resolves outside it (sources.outside_problem), and that its
weights and safetensors headers are readable: a damaged or edited checkpoint is one CheckpointError line.

The package, by job: files (the safetensors + JSON format and the one weights reader), optimizer_state (the
optimizer state by parameter name), model_state (weights and adapters of a replicated model), store (atomic
step directories, manifest, prune, fence, final/) and resume (identity, compatibility, position). What a
plugin writes or reads in its own way lives with the plugin (finetune.parallel).
"""

from __future__ import annotations

from finetune.checkpoint.files import (
    check_weight_files,
    file_sha256,
    read_adapter,
    read_json,
    read_safetensors_dir,
    read_tree,
    rng_state,
    set_rng_state,
    weight_files,
    weight_key,
    write_tree,
)
from finetune.checkpoint.model_state import gathered_adapter_state, init_adapter, load_adapter, load_replicated_model, local_adapter_state, write_adapter_dir
from finetune.checkpoint.optimizer_state import full_optimizer_stem, load_optimizer, save_optimizer
from finetune.checkpoint.resume import check_compatible, layout_change_line, load_checkpoint, open_resume, resolve_resume, resume_position, verify
from finetune.checkpoint.store import (
    LOSS_SCALE_FILE,
    checkpoint_dir,
    complete_checkpoints,
    failing_together,
    fence_newer,
    identity,
    manifest,
    move_scheduler,
    read_loss_scale,
    remove_partial,
    rng_stem,
    save_checkpoint,
    write_final,
    write_loss_scale,
)
from finetune.errors import CheckpointError

__all__ = [
    "CheckpointError", "LOSS_SCALE_FILE", "check_compatible", "check_weight_files", "checkpoint_dir", "complete_checkpoints", "failing_together",
    "fence_newer", "file_sha256", "full_optimizer_stem", "gathered_adapter_state", "identity", "init_adapter", "layout_change_line", "load_adapter",
    "load_checkpoint", "load_optimizer", "load_replicated_model", "local_adapter_state", "manifest", "move_scheduler", "open_resume", "read_adapter",
    "read_json", "read_loss_scale", "read_safetensors_dir", "read_tree", "remove_partial", "resolve_resume", "resume_position", "rng_state", "rng_stem",
    "save_checkpoint", "save_optimizer", "set_rng_state", "verify", "weight_files", "weight_key", "write_adapter_dir", "write_final", "write_loss_scale",
    "write_tree",
]  # fmt: skip
