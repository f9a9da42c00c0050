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
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from finetune import sources
from finetune.config import Config, mutates_base, to_dict
from finetune.errors import FinetuneError, shown
from finetune.methods import method_named
from finetune.model import trains_with_adapter, write_as_plain_lora
from finetune.lora_tp import full_like, full_tensor, local_shard, read_split

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


class CheckpointError(FinetuneError):
    """A checkpoint cannot be used: missing, incomplete, unsafe, or from an incompatible run."""


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


def identity(cfg: Config, world_size: int) -> dict:
    """The settings a checkpoint records and a resume must match."""
    tree = {**to_dict(cfg), "world_size": world_size}
    return {key: functools.reduce(lambda node, part: node[part], key.split("."), tree) for key in IDENTITY_KEYS}


def resolve_resume(cfg: Config) -> Path | None:
    """The checkpoint `resume_from` names (latest or a path), verified complete; None for a fresh run.

    Raises:
        CheckpointError: nothing to resume from, or the checkpoint is incomplete.
    """
    if not cfg.resume_from:
        return None
    if cfg.resume_from == "latest":
        found = complete_checkpoints(cfg.output_dir)
        if not found:
            raise CheckpointError(f"resume_from=latest: no complete checkpoint in {Path(cfg.output_dir) / CHECKPOINTS}")
        path = found[-1]
    else:
        path = Path(cfg.resume_from)
    verify(path, resuming=True)
    return path


def open_resume(cfg: Config, world_size: int) -> tuple[Path | None, dict | None, list[str]]:
    """Everything a resume checks before any model is built (train.main): the checkpoint resume_from names, verified,
    its state.json, and the settings that changed harmlessly since; (None, None, []) for a fresh run.

    Raises:
        CheckpointError: the checkpoint is missing, damaged, edited, unsafe, or not this run's to continue.
    """
    path = resolve_resume(cfg)
    if path is None:
        return None, None, []
    state = read_state(path)
    changed = check_compatible(state, cfg, world_size, path)
    check_owner(path, state, cfg)
    return path, state, changed


def read_state(path: Path, resuming: bool = False) -> dict:
    """A checkpoint's state.json, every field checked for type and range (check_state; `resuming`: its format must resume)."""
    try:
        state = json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"resume_from={path}: not a complete checkpoint (no state.json); incomplete ones end in .partial") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"resume_from={path}: state.json is corrupt ({err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"resume_from={path}: state.json cannot be read ({type(err).__name__})") from None
    return check_state(state, path, resuming)


def verify(path: Path, resuming: bool = False) -> dict:
    """The one check of a checkpoint before anything is built from it (resume and export): nothing it names or
    links lies outside it, state.json's fields are sound, every file of its manifest is there at the recorded
    size and sha256 (read once), and its weights and safetensors headers are readable. Returns state.json.

    Args:
        resuming: for a resume, which needs FORMAT_VERSION (export reads every READABLE_FORMATS' weights).
    """
    if not path.is_dir():
        raise CheckpointError(f"resume_from={path}: no such checkpoint directory")
    inside(path, recursive=True)  # before state.json itself is read: it may be a link too
    state = read_state(path, resuming)
    inside(path, [*state["files"], *state.get("sha256", {})])
    for name, size in state["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"resume_from={path}: {name} is missing; the checkpoint is incomplete")
        if file.stat().st_size != size:
            raise CheckpointError(f"resume_from={path}: {name} has {file.stat().st_size} bytes, the manifest says {size}; the checkpoint is truncated or corrupt")
    for name, digest in state.get("sha256", {}).items():  # checkpoints written before hashes were recorded have none
        if file_sha256(path / name) != digest:
            raise CheckpointError(f"resume_from={path}: {name} does not match the sha256 of its manifest; the checkpoint is corrupt (use an earlier one)")
    check_readable(path, state)
    return state


def inside(path: Path, names=(), recursive: bool = False, setting: str = "resume_from") -> None:
    """Refuse a directory one of whose `names` (relative to it) or entries (every level with `recursive`) resolves outside it (sources.outside_problem)."""
    problem = sources.outside_problem(path, setting, names, recursive)
    if problem:
        raise CheckpointError(problem)


def check_readable(path: Path, state: dict) -> None:
    """The checkpoint's weights are what its readers read (safetensors only: a pickle-only model/ is refused, never
    loaded), its optimizer index names only its own safetensors files, and every safetensors file's header parses."""
    model = path / "model"
    adapter = (model / "adapter_config.json").is_file()
    problem = sources.pickle_only_problem(model, False, "resume_from", opt_in=None)
    if problem:
        raise CheckpointError(problem)
    with weight_errors(model):
        weights = [model / "adapter_model.safetensors"] if adapter else sorted(set(weight_files(model).values()))
    if state["format"] == FORMAT_VERSION:
        with tree_errors(full_optimizer_stem(path / "optimizer")):
            tensor_files(full_optimizer_stem(path / "optimizer"))
    for file in sorted({*weights, *(path / name for name in state["files"] if name.endswith(".safetensors"))}):
        try:
            with safe_open(file, "pt") as f:
                f.keys()
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"resume_from={path}: {file.relative_to(path)} is not a readable safetensors file ({_reason(err)}); the checkpoint is damaged") from None


def _reason(err: BaseException) -> str:
    """An exception in a few words for an error line: its type and the first line of its message."""
    text = str(err).splitlines()[0][:120] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _whole(value) -> bool:
    """A JSON whole number (not a bool, which JSON's true/false would give)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_state(state, path: Path, resuming: bool = False) -> dict:
    """state.json's fields, each checked for type and range: a damaged or edited manifest is one CheckpointError
    line, never a traceback or a run at a step it did not reach; `resuming`: an older format is refused first,
    with the way to start from its weights. Returns state."""
    where = f"resume_from={path}: state.json"

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{where} {what}; the checkpoint is damaged or was edited (use another one)")

    if not isinstance(state, dict):
        raise refuse(f"holds a {type(state).__name__}, not an object")
    if not _whole(state.get("format")) or state["format"] not in READABLE_FORMATS:
        raise CheckpointError(f"resume_from={path}: checkpoint format {_short(state.get('format'))}, this version reads {FORMAT_VERSION}")
    if resuming and state["format"] != FORMAT_VERSION:
        raise CheckpointError(f"resume_from={path}: checkpoint format {state['format']} keeps optimizer, scheduler and RNG states as pickle, which this version never loads; "
                              f"start a new run from its weights: model.name=<python -m finetune.export {path} OUT_DIR> (full) or lora.init_from={path / 'model'} (LoRA)")
    for field, least in (("step", 1), ("steps_per_epoch", 1), ("epoch", 0), ("samples_seen", 1)):
        if not _whole(state.get(field)) or state[field] < least:
            raise refuse(f"has {_field(state, field)}, not a whole number >= {least}")
    if "global_batch" in state and (not _whole(state["global_batch"]) or state["global_batch"] < 1):  # absent in checkpoints before resume on any layout
        raise refuse(f"has global_batch={_short(state['global_batch'])}, not a whole number >= 1")
    step, batch = state["step"], state.get("global_batch") or state["samples_seen"] // state["step"]
    if state["epoch"] != step // state["steps_per_epoch"] or state["samples_seen"] != step * batch:
        raise refuse(f"has step {step}, epoch {state['epoch']}, steps_per_epoch {state['steps_per_epoch']} and samples_seen {state['samples_seen']}, which do not agree")
    for field in ("identity", "config"):
        if not isinstance(state.get(field), dict):
            raise refuse(f"has {_field(state, field)}, not an object")
    _check_identity(state["identity"], refuse)
    total = _written_total_steps(state["config"], state["steps_per_epoch"])
    if total is None:
        raise refuse("has no train.max_steps or train.epochs in its config")
    if step > total:
        raise refuse(f"has step {step}, past the {total} steps of the run that wrote it")
    for field, valid in (("files", lambda v: _whole(v) and v >= 0), ("sha256", lambda v: isinstance(v, str) and len(v) == 64)):
        if field == "sha256" and field not in state:  # checkpoints written before hashes were recorded have none
            continue
        table = state.get(field)
        if not isinstance(table, dict) or not all(isinstance(k, str) and valid(v) for k, v in table.items()):
            raise refuse(f"has {_field(state, field)}, not an object of file names and {'sizes' if field == 'files' else 'sha256 digests'}")
    if "sha256" in state and set(state["sha256"]) != set(state["files"]):
        raise refuse("hashes other files than its manifest lists")
    return state


def _field(state: dict, field: str) -> str:
    """A state.json field for an error line: `step=-5`, or `no step`."""
    return f"{field}={_short(state[field])}" if field in state else f"no {field}"


def _check_identity(ident: dict, refuse) -> None:
    """The identity fields a resume compares and reads: every key (those added later may be absent), the plugin an object with a name, sizes whole and positive."""
    missing = [k for k in IDENTITY_KEYS if k not in ident and k not in ADDED_IDENTITY]
    if missing:
        raise refuse(f"has no identity {missing[0]}")
    plugin = ident["plugin"]
    if not isinstance(plugin, dict) or not isinstance(plugin.get("name"), str):
        raise refuse(f"has identity plugin={_short(plugin)}, not a plugin section with a name")
    for key in ("world_size", "train.batch_size", "train.grad_accum_steps"):
        if not _whole(ident[key]) or ident[key] < 1:
            raise refuse(f"has identity {key}={_short(ident[key])}, not a whole number >= 1")
    if not isinstance(ident["method"], str):
        raise refuse(f"has identity method={_short(ident['method'])}, not a method name")


def _written_total_steps(config: dict, steps_per_epoch: int) -> int | None:
    """The steps the run that wrote a checkpoint was to train (train.max_steps, else train.epochs of steps_per_epoch); None: its config does not say."""
    train = config.get("train")
    if not isinstance(train, dict):
        return None
    max_steps, epochs = train.get("max_steps"), train.get("epochs")
    if _whole(max_steps) and max_steps > 0:
        return max_steps
    return epochs * steps_per_epoch if _whole(epochs) and epochs > 0 else None


def check_owner(path: Path, state: dict, cfg: Config) -> None:
    """A checkpoint resumes only into the run that wrote it: another run's would see its final/ replaced and its checkpoints pruned.

    Raises:
        CheckpointError: the checkpoint is not under output_dir/checkpoints (says how to start a new run from it).
    """
    mine = (Path(cfg.output_dir) / CHECKPOINTS).resolve()
    if path.resolve().parent == mine:
        return
    start = f"lora.init_from={path / 'model'}" if method_named(state["identity"]["method"]).adapter else f"python -m finetune.export {path} OUT_DIR, then model.name=OUT_DIR"
    raise CheckpointError(f"resume_from={path}: the checkpoint belongs to another run ({path.resolve().parent.parent}), not to output_dir={cfg.output_dir}; "
                          f"resume it with output_dir set to that run, or start a new run from it with {start}")


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def sync_tree(path: Path, hash_files: bool = True) -> dict[str, str]:
    """fsync every file and directory under path (and path); returns each file's sha256 (hash_files), read while syncing."""
    hashes = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        if hash_files:
            hashes[str(file.relative_to(path))] = file_sha256(file)
        _fsync(file)
    for directory in [*sorted(p for p in path.rglob("*") if p.is_dir()), path]:
        _fsync(directory)
    return hashes


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


# Settings that may differ between the run that wrote a checkpoint and the one resuming it, because they
# change only how the same training is laid out: the parallel layout (plugin, world size), whose weights
# and optimizer states are stored full and by parameter name (each plugin splits them afresh), and the
# split of the global batch (its data position is a global sample index: resume_position).
LAYOUT_KEYS = ("world_size", "plugin")
BATCH_KEYS = ("train.batch_size", "train.grad_accum_steps")


def check_compatible(state: dict, cfg: Config, world_size: int, path: Path | str = "CHECKPOINT") -> list[str]:
    """Refuse a checkpoint written by a run this one cannot continue; return the settings that changed harmlessly."""
    mine = identity(cfg, world_size)
    for key in IDENTITY_KEYS:
        theirs = state["identity"].get(key, ADDED_IDENTITY.get(key))
        if theirs == mine[key] or key in BATCH_KEYS:
            continue
        name, theirs, ours = _first_difference(key, theirs, mine[key])
        written = f"resume_from: the checkpoint was written with {name}={_short(theirs)}, this run has {name}={_short(ours)}"
        if key not in LAYOUT_KEYS:
            raise CheckpointError(f"{written}; resume with the same {key}, or start a new run in another output_dir")
        bound = _layout_bound(state["identity"]["plugin"]["name"], cfg.plugin.name)
        if bound:
            raise CheckpointError(f"{written}; {bound}: {_same_layout_hint(state, key)}, "
                                  f"or export it (python -m finetune.export {path} OUT_DIR) and start a new run from model.name=OUT_DIR (fresh optimizer state and LR schedule)")
    saved = state.get("config", {})
    return sorted(k for k in set(saved) | set(to_dict(cfg)) if saved.get(k) != to_dict(cfg).get(k))


def _layout_bound(theirs: str, ours: str) -> str:
    """Why a checkpoint of plugin `theirs` cannot resume under another layout of plugin `ours` (empty: it can)."""
    from finetune.booster import PLUGINS

    for name in (theirs, ours):
        plugin = PLUGINS.get(name)
        if plugin is not None and plugin.resume_layout_refusal:
            return f"{name} checkpoints are not resharded onto another world size or parallel layout ({plugin.resume_layout_refusal})"
    return ""


def layout_label(ident: dict) -> str:
    """A checkpoint identity's (or this run's) parallel layout in a few characters, e.g. 'zero2 x2'."""
    from finetune.booster import PLUGINS

    options = {k: v for k, v in ident["plugin"].items() if k != "name"}
    plugin = PLUGINS.get(ident["plugin"]["name"])
    if plugin is None:  # a plugin registered by the run that wrote it, not by this one
        return f"{ident['plugin']['name']} x{ident['world_size']}"
    dp = plugin.plan({**plugin.options, **options}, ident["train.batch_size"], ident["world_size"]).dp
    return plugin.setting_label(options, ident["world_size"], dp)


def layout_change_line(state: dict, cfg: Config, world_size: int) -> str:
    """One line when the checkpoint was written under another plugin, plugin settings or world size (empty otherwise)."""
    theirs, ours = state["identity"], identity(cfg, world_size)
    if all(theirs[k] == ours[k] for k in LAYOUT_KEYS):
        return ""
    rng = "" if theirs["world_size"] == ours["world_size"] else "; random streams (dropout) are per rank and do not carry over to another world size"
    before, now = layout_label(theirs), layout_label(ours)
    now += " with other plugin settings" if before == now else ""
    return (f"resuming a {before} checkpoint under {now}: weights and optimizer states are stored full, "
            f"by parameter name, and split afresh for this layout{rng}")


def resume_position(state: dict, global_batch: int, steps_per_epoch: int) -> tuple[int, str]:
    """The step a resumed run continues after, and one line when the checkpoint's data position is not one
    of this run's step boundaries (empty: the batch sequence continues exactly).

    The position is a global sample index: an epoch, then samples into it (the sampler's order depends on
    train.seed, the epoch and the data only, not on the layout). Under another global batch the run goes
    on from the nearest of its own step boundaries; its step counter, max_steps and LR schedule count its
    own steps from there.
    """
    step, theirs_per_epoch = state["step"], state["steps_per_epoch"]
    theirs = state.get("global_batch") or state["samples_seen"] // step
    if (theirs, theirs_per_epoch) == (global_batch, steps_per_epoch):
        return step, ""
    epoch, into = divmod(step, theirs_per_epoch)
    samples = into * theirs
    boundary = min(steps_per_epoch, (2 * samples + global_batch) // (2 * global_batch))  # the nearest; halfway rounds up
    start = epoch * steps_per_epoch + boundary
    gap = boundary * global_batch - samples
    drift = "exactly there" if gap == 0 else f"{gap} samples of the epoch skipped" if gap > 0 else f"{-gap} samples of the epoch seen again"
    return start, (f"resuming at step {start}, not {step}: the checkpoint's global batch is {theirs} samples ({theirs_per_epoch} steps an epoch), this run's "
                   f"{global_batch} ({steps_per_epoch} steps an epoch); its data position, {samples} samples into epoch {epoch}, continues at this run's "
                   f"nearest step boundary ({drift}); step numbers, max_steps and the LR schedule count this run's steps from there")


def _first_difference(key: str, theirs, ours) -> tuple[str, object, object]:
    """The first setting that differs, down to a section's own key (its name first): plugin.tp_size, not plugin."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        sub = sorted((k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k)), key=lambda k: (k != "name", k))[0]
        return f"{key}.{sub}", theirs.get(sub), ours.get(sub)
    return key, theirs, ours


def _same_layout_hint(state: dict, key: str) -> str:
    if key == "world_size":
        return f"relaunch with {state['identity']['world_size']} processes as it was"
    return "relaunch with the checkpoint's plugin settings (the plugin section of its state.json)"


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


# --- plain data: tensors in a safetensors file, everything else in JSON (never pickle) -------------


def split_tensors(tree, prefix: str = "") -> tuple[object, dict[str, torch.Tensor]]:
    """A nested dict/list with tensors -> (JSON-able tree with {"tensor": key} in their place, tensors by key)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node, key: str):
        if isinstance(node, torch.Tensor):
            tensors[key] = node.detach().cpu().contiguous()
            return {"tensor": key}
        if isinstance(node, dict):
            if not all(isinstance(k, str) for k in node):
                raise TypeError(f"{key or 'tree'}: only string keys survive JSON, got {sorted(map(repr, node))[:3]}")
            return {"dict": {k: walk(v, f"{key}/{k}" if key else k) for k, v in node.items()}}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{key}/{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"{key}: {type(node).__name__} is not plain data")

    return walk(tree, prefix), tensors


def join_tensors(tree, tensors: dict[str, torch.Tensor]):
    """The inverse of split_tensors (tuples come back as lists)."""
    if isinstance(tree, list):
        return [join_tensors(v, tensors) for v in tree]
    if isinstance(tree, dict) and "tensor" in tree:
        return tensors[tree["tensor"]]
    if isinstance(tree, dict):
        return {k: join_tensors(v, tensors) for k, v in tree["dict"].items()}
    return tree


def write_tree(tree, stem: Path) -> None:
    """`stem`.safetensors (its tensors) and `stem`.json (the rest)."""
    plain, tensors = split_tensors(tree)
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_file(_unshared(tensors), stem.with_name(stem.name + ".safetensors"))
    stem.with_name(stem.name + ".json").write_text(json.dumps(plain) + "\n")


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: copy all but the first of each (FSDP's unflattened
    optimizer state shares one `step` counter among a unit's parameters)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        out[name] = tensor.clone() if key in seen else tensor.contiguous()
        seen.add(key)
    return out


def read_json(file: Path):
    """A checkpoint's JSON file; anything else (a pickle, say) is a CheckpointError, never unpickled."""
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"resume_from: {file} is not a JSON file of this checkpoint format ({type(err).__name__})") from None


TREE_ERRORS = (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError, KeyError, TypeError, AttributeError, ValueError)


def read_tree(stem: Path):
    """What write_tree (or save_split_optimizer) wrote; an unreadable or malformed file is a CheckpointError (nothing is unpickled)."""
    with tree_errors(stem):
        plain = json.loads(stem.with_name(stem.name + ".json").read_text())
        tensors: dict[str, torch.Tensor] = {}
        for file in sorted(set(tensor_files(stem).values())):
            tensors.update(load_file(file))
        return join_tensors(plain, tensors)


@contextlib.contextmanager
def tree_errors(stem: Path):
    """A file set of write_tree's format that cannot be read becomes one CheckpointError line."""
    try:
        yield
    except CheckpointError:  # said already (a FinetuneError is a ValueError too)
        raise
    except TREE_ERRORS as err:
        raise CheckpointError(f"resume_from: {stem}.json/.safetensors is not a checkpoint file of this format ({_reason(err)})") from None


def tensor_files(stem: Path) -> dict[str, Path]:
    """Where each tensor of a write_tree file set lives: `stem`.safetensors, or the files of its index
    (`stem`.safetensors.index.json, one file per pipeline stage), which may name only safetensors files beside it."""
    single, index = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".safetensors.index.json")
    if not single.is_file() and index.is_file():
        problem = sources.outside_problem(stem.parent, "resume_from") or sources.index_problem(index, "resume_from")
        if problem:
            raise CheckpointError(problem)
        return {key: stem.parent / name for key, name in json.loads(index.read_text())["weight_map"].items()}
    inside(stem.parent)
    with safe_open(single, "pt") as f:
        return {key: single for key in f.keys()}


def rng_state() -> dict:
    """Every RNG a training step can draw from (dropout, shuffling in user code), as plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss): JSON
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state returned (tuples may come back as lists from JSON)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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


def write_adapter(state: dict[str, torch.Tensor], path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, path / "adapter_model.safetensors")


def read_adapter(path: Path, allow_pickle: bool = False, setting: str = "resume_from") -> dict[str, torch.Tensor]:
    """The tensors of a peft adapter dir (a checkpoint's model/, or lora.init_from: `setting`); a pickle-only one only with allow_pickle."""
    problem = sources.weights_dir_problem(path, allow_pickle, setting)
    if problem:
        raise CheckpointError(problem)
    if allow_pickle and not (path / "adapter_model.safetensors").is_file():
        # lora.init_from of a pickle-only adapter, which the user opted into (model.allow_pickle=true)
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    try:
        return load_file(path / "adapter_model.safetensors")
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{setting}: {path / 'adapter_model.safetensors'} is not a readable safetensors file ({_reason(err)})") from None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# --- writing and reading, collectively (every rank calls these) -----------------------------------


def lora_key(name: str) -> str:
    """peft's adapter-file key for a LoRA parameter, from a PeftModel or an injected model alike."""
    prefix = "" if name.startswith("base_model.model.") else "base_model.model."
    return prefix + name.replace(".default.", ".")


# peft's default ("auto") asks the hub for the base's config.json whenever the base is not a local
# directory (a named config, a hub id), at every save, to see whether the vocabulary was resized. It
# never is here (LoRA's own embedding factors are saved either way): no lookup, offline means offline.
NO_EMBEDDINGS = False


def local_adapter_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's trained adapter weights, keyed as in adapter_model.safetensors.

    A PeftModel says itself what it saves (LoRA weights and modules_to_save, e.g. a classification
    head); for adapters injected for pipeline parallelism, the parameters that train with them.
    """
    from peft import PeftModel, get_peft_model_state_dict

    if isinstance(module, PeftModel):
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(module, save_embedding_layers=NO_EMBEDDINGS).items()}
    # Under tensor parallelism an adapter matrix may be split: gathering it is a collective.
    return {lora_key(n): full_tensor(p).detach().cpu().clone() for n, p in module.named_parameters() if trains_with_adapter(n)}


def gathered_adapter_state(module: torch.nn.Module, pipeline: bool) -> dict[str, torch.Tensor]:
    """The whole adapter on rank 0: each pipeline stage holds its own layers' share (tensor-parallel splits gathered); replicas hold it all."""
    local = local_adapter_state(module)
    if not pipeline:
        return local
    shares: list[dict] = [{}] * dist.get_world_size()
    dist.all_gather_object(shares, local)
    return {k: v for share in shares for k, v in share.items()}


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
        run.plugin.write_model(run, staging / "model")
        run.plugin.write_optimizer(run, staging / "optimizer")
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
        _fsync(staging / "state.json")
        _fsync(staging)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)  # the checkpoint exists only once it is complete
        _fsync(final.parent)  # the rename itself survives a power loss
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
        run.plugin.write_model(run, staging)
        if dist.get_rank() == 0:
            if run.lora_config is not None and mutates_base(run.cfg.lora.init):  # final/ goes onto the original base
                write_as_plain_lora(run.cfg, run.lora_config, staging, run.task.labels_or_none, run.method.frozen_dtype(run.cfg.train.precision))
            tokenizer.save_pretrained(staging)
            run.task.write_artifacts(staging)
    if dist.get_rank() == 0:
        sync_tree(staging, hash_files=False)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)  # only a complete save becomes final/
        _fsync(final.parent)
    barrier()
    return final


def write_adapter_dir(adapter: dict[str, torch.Tensor], lora_config, base_model: str, path: Path) -> None:
    """A peft adapter directory: the weights and adapter_config.json naming the base model."""
    write_adapter(adapter, path)
    lora_config.base_model_name_or_path = base_model
    lora_config.save_pretrained(path)


def load_checkpoint(run: Run, path: Path) -> tuple[int, str]:
    """Restore model (or adapter), optimizer, scheduler and this rank's RNG from a verified checkpoint.

    Returns the step to continue after and resume_position's line (empty when the batch sequence continues exactly).
    """
    state = read_state(path)
    with failing_together():
        run.plugin.read_model(run, path / "model")
    with failing_together():
        run.plugin.read_optimizer(run, path / "optimizer")
        run.scheduler.load_state_dict(read_json(path / "scheduler.json"))
        read_loss_scale(run.optimizer, path)
        with tree_errors(rng_stem(path, dist.get_rank())):  # an edited RNG state is one line too
            set_rng_state(read_tree(rng_stem(path, dist.get_rank())))
    start, line = resume_position(state, global_batch(run), run.steps_per_epoch)
    move_scheduler(run.scheduler, start)
    barrier()
    return start, line


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


def optimizer_params(run: Run) -> list[tuple[str, torch.Tensor]]:
    """The name and the model's (working) parameter of each optimizer parameter, in its state-dict order (its param groups, in order).

    Mixed-precision and ZeRO optimizers hold fp32 master copies: their map leads back to the model's
    (working) parameter, whose name the model knows.
    """
    module = run.model.unwrap(unwrap_peft=False)
    names = {id(p): n for n, p in module.named_parameters()}
    master_to_working = getattr(run.optimizer, "get_master_to_working_map", lambda: None)() or {}
    real = getattr(run.optimizer, "id_to_real_params", None)  # Gemini: its groups hold placeholders
    order = [real[i] for i in sorted(real)] if real else [p for group in run.optimizer.param_groups for p in group["params"]]
    working = [master_to_working.get(id(p), p) for p in order]
    return [(names[id(p)], p) for p in working]


def optimizer_param_names(run: Run) -> list[str]:
    """The name of each parameter in the optimizer's state-dict order."""
    return [name for name, _ in optimizer_params(run)]


def global_param_names(run: Run, names: list[str]) -> list[str]:
    """The names another layout's optimizer state uses for these parameters of this rank's model: adapters
    injected without a PeftModel (tensor/pipeline parallelism) get peft's prefix, and an output embedding
    held apart from the input embedding it is tied to (a pipeline's last stage) takes the input's name,
    the one a whole model's named_parameters() keeps."""
    from peft import PeftModel

    module = run.model.unwrap(unwrap_peft=False)
    prefix = "base_model.model." if run.method.adapter and not isinstance(module, PeftModel) else ""
    aliases = tied_output_embedding(module)
    return [prefix + aliases.get(name, name) for name in names]


def tied_output_embedding(module: torch.nn.Module) -> dict[str, str]:
    """{output embedding weight: the input embedding weight it is tied to}, empty for untied models."""
    if not getattr(getattr(module, "config", None), "tie_word_embeddings", False):
        return {}
    try:
        pair = (module.get_input_embeddings(), module.get_output_embeddings())
    except (AttributeError, NotImplementedError):
        return {}
    names = {id(m): n for n, m in module.named_modules()}
    if any(m is None or id(m) not in names for m in pair):
        return {}
    return {f"{names[id(pair[1])]}.weight": f"{names[id(pair[0])]}.weight"}


def named_optimizer_state(state: dict, names: list[str]) -> dict:
    """A torch optimizer state dict with parameter indices replaced by parameter names."""
    return {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def indexed_optimizer_state(named: dict, names: list[str]) -> dict:
    """The inverse of named_optimizer_state, for this optimizer's parameter order."""
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(named["state"]) - set(index))
    if unknown:
        raise CheckpointError(f"resume_from: the optimizer state names {unknown[0]}, which this model does not train")
    # torch pairs a group's saved params with its own by position: list them in this optimizer's order
    # (another plugin's writer may have listed them in its own).
    return {
        "state": {index[n]: s for n, s in named["state"].items()},
        "param_groups": [{**g, "params": sorted(index[n] for n in g["params"])} for g in named["param_groups"]],
    }


OPTIMIZER_STEM = "state"  # optimizer/state.safetensors + state.json


def save_optimizer(run: Run, path: Path) -> None:
    """The whole optimizer state by parameter name, written by rank 0 (under ZeRO every rank takes part in gathering it)."""
    state = named_optimizer_state(run.optimizer.state_dict(), optimizer_param_names(run))
    if dist.get_rank() == 0:
        write_tree(state, path / OPTIMIZER_STEM)


def load_optimizer(run: Run, path: Path, stem: str = "") -> None:
    """Every rank reads the whole state; the optimizer keeps its own share (ZeRO splits it)."""
    run.optimizer.load_state_dict(indexed_optimizer_state(read_tree(path / stem if stem else full_optimizer_stem(path)), optimizer_param_names(run)))


def load_zero_optimizer(run: Run, path: Path) -> None:
    """ZeRO: each rank reads only its own part of every state tensor, the part LowLevelZeroOptimizer's
    load_state_dict would cut from the full one (flattened, zero-padded to a multiple of the group's size,
    split evenly), so no rank holds the whole optimizer state at resume."""
    from colossalai.zero.low_level._utils import get_nd_rank, get_nd_world_size

    zero, stem = run.optimizer, full_optimizer_stem(path)
    masters = [p for group in zero.optim.param_groups for p in group["params"]]
    groups = {name: zero.param_to_pg[zero.master_to_working_param[id(p)]] for name, p in zip(optimizer_param_names(run), masters)}
    with tree_errors(stem):
        saved = join_tensors(json.loads(stem.with_name(stem.name + ".json").read_text()), _KeyStandIns())
        with OpenFiles(tensor_files(stem)) as files:
            for name, state in saved["state"].items():
                group = groups.get(name)  # None: a parameter this model does not train (indexed_optimizer_state says so)
                for k, v in state.items():
                    if isinstance(v, _TensorKey):
                        whole = k == "step" or group is None  # step counters stay whole, as ZeRO keeps them
                        state[k] = files[v].get_tensor(v) if whole else zero_part(files[v], v, get_nd_world_size(group), get_nd_rank(group))
    zero.optim.load_state_dict(indexed_optimizer_state(saved, list(groups)))


class OpenFiles:
    """The safetensors files of a {tensor key: file} map, each opened once on first use and closed together."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files, self.handles, self.stack = files, {}, contextlib.ExitStack()

    def __enter__(self) -> "OpenFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def __getitem__(self, key: str):
        """The open file that holds tensor `key`."""
        path = self.files[key]
        if path not in self.handles:
            self.handles[path] = self.stack.enter_context(safe_open(path, "pt"))
        return self.handles[path]


def zero_part(handle, key: str, size: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s part of a tensor flattened and zero-padded to a multiple of `size` (ZeRO's split),
    reading only the rows of the stored tensor that hold it."""
    stored = handle.get_slice(key)
    shape = stored.get_shape()
    numel, row = math.prod(shape), math.prod(shape[1:])
    chunk = -(-numel // size)
    start, stop = min(rank * chunk, numel), min((rank + 1) * chunk, numel)
    first, last = start // row, -(-stop // row)
    rows = stored[first:last] if shape else handle.get_tensor(key)  # a 0-d tensor is one number
    flat = rows.flatten()[start - first * row:stop - first * row]
    return torch.nn.functional.pad(flat, [0, chunk - flat.numel()]).clone()  # a copy, not a view of the mapped file


def full_optimizer_stem(path: Path) -> Path:
    """The whole optimizer state by parameter name, whichever plugin wrote it (FSDP's was `full_state` until resume on any layout unified the names)."""
    old = path / FSDP_OPTIMIZER_STEM
    return old if not (path / f"{OPTIMIZER_STEM}.json").is_file() and old.with_name(old.name + ".json").is_file() else path / OPTIMIZER_STEM


STAGE_OPTIMIZER_FILE = "state-stage-{:05d}.safetensors"  # tensor/pipeline parallelism: one file per pipeline stage


def save_split_optimizer(run: Run, path: Path, writes: bool, stage: int) -> None:
    """save_optimizer's format (full tensors by parameter name, as any layout reads them) for a model split by
    tensor and pipeline parallelism; every rank calls this.

    Every rank gathers its parameters' tensor-parallel splits of each state (a collective over its
    tensor-parallel group; a padded vocabulary is unpadded); one rank per pipeline stage (`writes`) writes
    its stage's states to their own file, so no rank holds another stage's; rank 0 writes state.json (the
    plain data of all stages) and the index naming each tensor's file.
    """
    params = optimizer_params(run)
    names = global_param_names(run, [name for name, _ in params])
    local = run.optimizer.state_dict()
    state = {}
    for i, values in sorted(local["state"].items()):  # the same order on every rank of a tensor-parallel group
        param = params[i][1]
        state[names[i]] = {k: full_like(param, v).detach().cpu() if torch.is_tensor(v) and v.dim() and v.shape == param.shape else v for k, v in sorted(values.items())}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in local["param_groups"]]
    # Every stage's plain data, its tensors as empty stand-ins: enough to merge and to know who writes what.
    outline = {"state": {n: {k: torch.empty(0) if torch.is_tensor(v) else v for k, v in s.items()} for n, s in state.items()}, "param_groups": groups}
    shares: list = [None] * dist.get_world_size()
    dist.all_gather_object(shares, (stage, outline) if writes else None)
    merged, owner = _merge_stages([share for share in shares if share is not None])
    files = {name: STAGE_OPTIMIZER_FILE.format(owner[name] + 1) for name in merged["state"]}
    path.mkdir(parents=True, exist_ok=True)
    if writes:
        mine = {n: s for n, s in state.items() if owner[n] == stage}  # a tied weight held by two stages is written once
        save_file(_unshared(split_tensors({"state": mine})[1]), path / STAGE_OPTIMIZER_FILE.format(stage + 1))
    if dist.get_rank() == 0:
        weight_map = {key: files[name] for name, values in merged["state"].items() for key in split_tensors(values, f"state/{name}")[1]}
        (path / f"{OPTIMIZER_STEM}.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1) + "\n")
        (path / f"{OPTIMIZER_STEM}.json").write_text(json.dumps(split_tensors(merged)[0]) + "\n")


def _merge_stages(shares: list[tuple[int, dict]]) -> tuple[dict, dict[str, int]]:
    """Every stage's named optimizer state in one (stage order; a name two stages hold is the first's), and the stage owning each name."""
    merged: dict = {"state": {}, "param_groups": []}
    owner: dict[str, int] = {}
    for stage, share in sorted(shares, key=lambda item: item[0]):
        for name, values in share["state"].items():
            if name not in owner:
                merged["state"][name], owner[name] = values, stage
        for i, group in enumerate(share["param_groups"]):
            if i == len(merged["param_groups"]):
                merged["param_groups"].append({**group, "params": []})
            known = merged["param_groups"][i]["params"]
            known += [n for n in group["params"] if n not in known]
    return merged, owner


class _TensorKey(str):
    """A tensor's key in a file set, standing in for the tensor until it is read."""


def load_split_optimizer(run: Run, path: Path) -> None:
    """Any layout's optimizer state into this rank's split model: every rank reads the plain data and only the
    tensors of the parameters it holds (from whichever file holds them), then keeps its split of each."""
    stem = full_optimizer_stem(path)
    params = optimizer_params(run)
    local_names = [name for name, _ in params]
    names = global_param_names(run, local_names)
    with tree_errors(stem):
        saved = join_tensors(json.loads(stem.with_name(stem.name + ".json").read_text()), _KeyStandIns())
        files = tensor_files(stem)
        state: dict[str, dict] = {}
        with OpenFiles(files) as opened:
            for (local_name, param), name in zip(params, names):
                if name not in saved["state"]:
                    continue
                values = {}
                for k, v in saved["state"][name].items():
                    if isinstance(v, _TensorKey):
                        reader = opened[v]
                        split = len(reader.get_slice(v).get_shape()) == param.dim()  # shaped like the parameter (not a step counter)
                        v = read_split(reader, v, param) if split else reader.get_tensor(v)
                    values[k] = v
                state[local_name] = values
        sizes = [len(group["params"]) for group in run.optimizer.param_groups]
        if len(saved["param_groups"]) != len(sizes):
            raise CheckpointError(f"resume_from: the optimizer state has {len(saved['param_groups'])} parameter groups, this optimizer {len(sizes)}")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        groups = [{**g, "params": local_names[start : start + size]} for g, start, size in zip(saved["param_groups"], starts, sizes)]
    run.optimizer.load_state_dict(indexed_optimizer_state({"state": state, "param_groups": groups}, local_names))


class _KeyStandIns(dict):
    """join_tensors' tensors: each key stands for its tensor (read later, only where needed)."""

    def __missing__(self, key: str) -> _TensorKey:
        return _TensorKey(key)


def check_weight_files(path: Path, key: str = "resume_from") -> None:
    """Before any reader (ours, ColossalAI's) reads a weights directory: no entry of it links outside it, and its
    indexes name only safetensors files inside it (ColossalAI's loader would torch.load any other file an edited
    index names, and read any path); `key` names the setting in errors."""
    inside(path, setting=key)
    for index in sorted(path.glob("*.index.json")):
        problem = sources.index_problem(index, key)
        if problem:
            raise CheckpointError(problem)


def weight_files(path: Path, setting: str = "resume_from") -> dict[str, Path]:
    """Where each tensor of a save_pretrained (or ColossalAI sharded) safetensors directory lives; `setting` names it in errors."""
    check_weight_files(path, setting)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {key: path / name for key, name in json.loads(index.read_text())["weight_map"].items()}
    with safe_open(path / "model.safetensors", "pt") as f:
        return {key: path / "model.safetensors" for key in f.keys()}


def weight_key(files: dict[str, Path], names: list[str], path: Path, setting: str = "resume_from") -> str:
    """The stored key of a parameter known by these names (tied weights are stored once, under one of them)."""
    key = next((n for n in names if n in files), None)
    if key is None:
        raise CheckpointError(f"{setting}: {path} has no weight for {names[0]}; its weights do not fit this model")
    return key


def load_split_model(run: Run, path: Path, setting: str = "resume_from", names: dict[str, list[str]] | None = None) -> None:
    """Full weights by name (any layout's checkpoint or a pretrained model directory: one file, or shards with an
    index) into this rank's tensor/pipeline-split model, then into the optimizer's master copies: a rank reads
    only the tensors of the parameters it holds (of one split along one dim only its rows or columns; fused
    q/k/v whole, then split) and keeps its split (a padded vocabulary padded again with zeros). Parameters
    of other pipeline stages are gone from this rank's module and are not read.

    Args:
        setting: the setting that named `path`, for errors (resume_from, model.name).
        names: every name of each parameter by its name in the model (finetune.deferred.Pending.names, taken
            before wrapping); tied weights are stored once, under one of them. An output embedding tied to
            the input one is always also read from the input's weight.
    """
    module = run.model.unwrap()
    aliases = tied_output_embedding(module)
    with weight_errors(path, setting):
        files = weight_files(path, setting)
        persistent = [(n, b) for n, b in module.named_buffers() if n in files]  # buffers HF does not save stay as built
        names = names or {}
        # every parameter's key found before any is read: a misfit is one line before heavy work
        keys = {n: weight_key(files, [*names.get(n, [n]), aliases.get(n, n)], path, setting) for n, _ in module.named_parameters()}
        with OpenFiles(files) as opened, torch.no_grad():
            for name, tensor in [*module.named_parameters(), *persistent]:
                key = keys.get(name, name)
                tensor.copy_(read_split(opened[key], key, tensor))
    update_master_params(run)


@contextlib.contextmanager
def weight_errors(path: Path, setting: str = "resume_from"):
    """A weights directory that cannot be read becomes one CheckpointError line, naming the setting that named it."""
    try:
        yield
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{setting}: {path} holds no readable safetensors weights ({_reason(err)})") from None


def read_safetensors_dir(path: Path, setting: str = "resume_from") -> dict[str, torch.Tensor]:
    """All tensors of a save_pretrained directory (one file, or shards listed in an index: weight_files' checks);
    `setting` names it in errors."""
    state: dict[str, torch.Tensor] = {}
    with weight_errors(path, setting):
        for file in sorted(set(weight_files(path, setting).values())):
            state.update(load_file(file))
    return state


def load_replicated_model(run: Run, path: Path) -> None:
    """Load full weights into every replica (tied weights were stored once), then into master copies."""
    module = run.model.unwrap()
    missing, unexpected = module.load_state_dict(read_safetensors_dir(path), strict=False)
    _check_fit(module, missing, unexpected)
    module.tie_weights()
    update_master_params(run)


def _check_fit(module: torch.nn.Module, missing: list[str], unexpected: list[str]) -> None:
    """Refuse weights that leave a parameter unset (tied ones are stored once) or name unknown ones."""
    tied = set(getattr(module, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"resume_from: the checkpoint's weights do not fit this model (missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")


def update_master_params(run: Run) -> None:
    """Optimizers that keep fp32 master copies must see weights loaded into the model."""
    if hasattr(run.model, "update_master_params"):  # LowLevelZero
        run.model.update_master_params()
    elif hasattr(run.optimizer, "update_master_params"):  # hybrid parallel's mixed-precision optimizers
        run.optimizer.update_master_params(run.model)


def init_adapter(run: Run, path: Path) -> None:
    """Start from the peft adapter in `path` (lora.init_from), under any plugin; every rank calls this."""
    run.plugin.load_adapter(run, read_adapter(path, run.cfg.model.allow_pickle, "lora.init_from"), f"lora.init_from: the adapter in {path}")


def load_adapter(run: Run, adapter: dict[str, torch.Tensor], source: str = "resume_from: the checkpoint's adapter") -> None:
    """Copy saved adapter weights into this rank's adapters, then into the optimizer's master copies.

    Args:
        source: what the adapter is, for errors.
    """
    from peft import PeftModel, set_peft_model_state_dict

    module = run.model.unwrap(unwrap_peft=False)
    if isinstance(module, PeftModel):
        missing = sorted(set(local_adapter_state(module)) - set(adapter))
        if missing:
            raise CheckpointError(f"{source} has no {missing[0]}; it was written for other LoRA targets")
        set_peft_model_state_dict(module, adapter)
        update_master_params(run)
        return
    with torch.no_grad():
        for name, param in module.named_parameters():
            if not trains_with_adapter(name):
                continue
            key = lora_key(name)
            if key not in adapter:
                raise CheckpointError(f"{source} has no {key}; it was written for other LoRA targets")
            param.copy_(local_shard(param, adapter[key]))  # split again under tensor parallelism
    update_master_params(run)


# --- PyTorch FSDP: full state dicts, gathered on rank 0 to save, read by every rank to load --------
#
# ColossalAI's FSDP checkpoint IO gathers with offload_to_cpu=True, which fails on a CPU-only machine
# in torch 2.5.1 (size-0 storages, then a hang), so the FSDP paths use torch's APIs directly. The
# model is saved as a plain HF directory (or peft adapter), like the replicated plugins' checkpoints,
# so finetune.export reads it unchanged.

FSDP_OPTIMIZER_STEM = "full_state"  # where checkpoints before any-layout resume kept it; now OPTIMIZER_STEM


def fsdp_inner_module(run: Run) -> torch.nn.Module:
    """The model FSDP wraps: the HF model, or the PeftModel under LoRA."""
    return run.model.module.module


@contextlib.contextmanager
def fsdp_full_state(fsdp_module, rank0_only: bool):
    """FSDP's full-state-dict mode for model and optimizer; rank0_only: only rank 0 receives gathered dicts."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    offload = torch.cuda.is_available()  # on CPU the tensors are there already, and offloading fails
    model_options = FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only)
    optimizer_options = FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only)
    with FSDP.state_dict_type(fsdp_module, StateDictType.FULL_STATE_DICT, model_options, optimizer_options):
        yield


def fsdp_full_state_dict(fsdp_module) -> dict:
    """Every rank takes part; rank 0 gets the whole model state dict, the others an empty one."""
    with fsdp_full_state(fsdp_module, rank0_only=True):
        return fsdp_module.state_dict()


def fsdp_adapter_state(run: Run, model_state: dict) -> dict[str, torch.Tensor]:
    """The adapter (peft's keys and selection) out of an FSDP-gathered full state dict."""
    from peft import get_peft_model_state_dict

    adapter = get_peft_model_state_dict(fsdp_inner_module(run), state_dict=model_state, save_embedding_layers=NO_EMBEDDINGS)
    return {k: v.detach().cpu().clone() for k, v in adapter.items()}


def save_fsdp_optimizer(run: Run, path: Path) -> None:
    """The full (unflattened) optimizer state, keyed by parameter names, gathered and written by rank 0."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = run.model.module
    with fsdp_full_state(root, rank0_only=True):
        state = FSDP.optim_state_dict(root, run.optimizer.optim)
    if dist.get_rank() == 0:
        write_tree(state, path / OPTIMIZER_STEM)  # keyed by parameter names already, as every plugin's


def load_fsdp_optimizer(run: Run, path: Path) -> None:
    """The full optimizer state, read by rank 0 only and scattered by FSDP into each rank's shards."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root, optimizer = run.model.module, run.optimizer.optim
    with failing_together():  # a bad file on rank 0 must stop the others, not leave them in FSDP's broadcast
        full_state = read_tree(full_optimizer_stem(path)) if dist.get_rank() == 0 else {}
    with fsdp_full_state(root, rank0_only=True):
        optimizer.load_state_dict(FSDP.optim_state_dict_to_load(root, optimizer, full_state))


def load_fsdp_model(run: Run, path: Path) -> None:
    """Full weights, read by every rank through the FSDP root, which keeps each rank's shard."""
    root = run.model.module
    with fsdp_full_state(root, rank0_only=False):
        missing, unexpected = root.load_state_dict(read_safetensors_dir(path), strict=False)
    _check_fit(fsdp_inner_module(run), missing, unexpected)


def load_fsdp_adapter(run: Run, adapter: dict[str, torch.Tensor], source: str = "resume_from: the checkpoint's adapter") -> None:
    """peft's own key mapping (adapter file -> model), loaded through the FSDP root, which scatters the shards."""
    import types

    from peft import set_peft_model_state_dict

    peft_model, root = fsdp_inner_module(run), run.model.module
    # set_peft_model_state_dict only renames keys and calls model.load_state_dict: give it the FSDP
    # root's, whose keys are the PeftModel's and which writes into every rank's flat shards.
    view = types.SimpleNamespace(peft_config=peft_model.peft_config, modules_to_save=peft_model.modules_to_save, load_state_dict=root.load_state_dict)
    missing = [k for k in set_peft_model_state_dict(view, adapter).missing_keys if "lora_" in k or "modules_to_save" in k]
    if missing:
        raise CheckpointError(f"{source} has no {missing[0]}; it was written for other LoRA targets")
