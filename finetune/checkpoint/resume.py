"""Resume: which checkpoint, whether it is sound and this run's (identity, compatibility), and where its data continues (position)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from finetune import sources
from finetune.checkpoint.files import error_reason, file_sha256, inside, read_json, read_tree, set_rng_state, tensor_files, tree_errors, weight_errors, weight_files
from finetune.checkpoint.optimizer_state import full_optimizer_stem
from finetune.checkpoint.store import (
    ADDED_IDENTITY,
    CHECKPOINTS,
    FORMAT_VERSION,
    IDENTITY_KEYS,
    READABLE_FORMATS,
    barrier,
    complete_checkpoints,
    failing_together,
    global_batch,
    identity,
    move_scheduler,
    read_loss_scale,
    rng_stem,
)
from finetune.config import Config, to_dict
from finetune.core.plugins import SPECS
from finetune.errors import CheckpointError
from finetune.methods import method_named

if TYPE_CHECKING:
    from finetune.run import Run


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
            raise CheckpointError(f"resume_from={path}: {file.relative_to(path)} is not a readable safetensors file ({error_reason(err)}); the checkpoint is damaged") from None


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
    for name in (theirs, ours):
        plugin = SPECS.get(name)
        if plugin is not None and plugin.resume_layout_refusal:
            return f"{name} checkpoints are not resharded onto another world size or parallel layout ({plugin.resume_layout_refusal})"
    return ""


def layout_label(ident: dict) -> str:
    """A checkpoint identity's (or this run's) parallel layout in a few characters, e.g. 'zero2 x2'."""
    options = {k: v for k, v in ident["plugin"].items() if k != "name"}
    plugin = SPECS.get(ident["plugin"]["name"])
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


def load_checkpoint(run: Run, path: Path) -> tuple[int, str]:
    """Restore model (or adapter), optimizer, scheduler and this rank's RNG from a verified checkpoint.

    Returns the step to continue after and resume_position's line (empty when the batch sequence continues exactly).
    """
    state = read_state(path)
    with failing_together():
        run.plugin.read_model(run.state, path / "model")
    with failing_together():
        run.plugin.read_optimizer(run.state, path / "optimizer")
        run.scheduler.load_state_dict(read_json(path / "scheduler.json"))
        read_loss_scale(run.optimizer, path)
        with tree_errors(rng_stem(path, dist.get_rank())):  # an edited RNG state is one line too
            set_rng_state(read_tree(rng_stem(path, dist.get_rank())))
    start, line = resume_position(state, global_batch(run), run.steps_per_epoch)
    move_scheduler(run.scheduler, start)
    barrier()
    return start, line
