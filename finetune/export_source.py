"""What an export reads (finetune.export, finetune.gguf_export): a run's or a checkpoint's config and weights, checked
before anything reads them, and the fine-tuned model merged in full precision."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from finetune import checkpoint, sources
from finetune.config import Config, ModelConfig, build_config, from_dict, parse_args
from finetune.errors import FinetuneError, shown
from finetune.model import build_model
from finetune.tasks import build_task


class ExportError(FinetuneError):
    """The source cannot be exported as asked."""


def locate(source: Path, flags: set[str] = frozenset(), command: str = "export") -> tuple[Config, Path]:
    """(the run's config, the directory holding its weights) for a run dir, its final/ or a checkpoint dir, checked before
    anything reads the weights: a checkpoint verified, no file of the weights dir outside it, no pickle without the opt-in.

    Args:
        flags: this command's opt-ins (OPT_INS): the config's own model.trust_remote_code and
            model.allow_pickle are replaced by them (a run dir may come from someone else).
        command: the command that reads it, for its error lines and notes.
    """
    cfg, weights = _run_config_and_weights(source, command)
    cfg_model, notes = with_opt_ins(cfg.model, flags, command)
    for note in notes:
        print(note, file=sys.stderr)
    # before anything reads the weights: nothing outside the dir, no pickle without --allow-pickle
    problem = sources.weights_dir_problem(weights, cfg_model.allow_pickle, command, opt_in="pass --allow-pickle")
    if not problem and (weights / "adapter_config.json").is_file():
        problem = sources.adapter_config_problem(weights, command)
    if problem:
        raise ExportError(problem)
    return dataclasses.replace(cfg, model=cfg_model), weights


def is_run_source(source: Path) -> bool:
    """Whether `source` is what locate reads: a checkpoint dir, a run dir, or a run's final/."""
    return (source / "state.json").is_file() or (source / "config.yaml").is_file() or (source.name == "final" and (source.parent / "config.yaml").is_file())


def _run_config_and_weights(source: Path, command: str) -> tuple[Config, Path]:
    if source.name == "final" and (source.parent / "config.yaml").is_file():  # a run's final/: the run's config
        return build_config(parse_args(["--config", str(source.parent / "config.yaml")])), source
    if (source / "state.json").is_file():  # a checkpoint
        state = checkpoint.verify(source)
        return from_dict(state["config"], f"{source}/state.json"), source / "model"
    if (source / "config.yaml").is_file():  # a run dir: its final/, else its newest checkpoint
        cfg = build_config(parse_args(["--config", str(source / "config.yaml")]))
        if (source / "final").is_dir():
            return cfg, source / "final"
        found = checkpoint.complete_checkpoints(str(source))
        if found:
            checkpoint.verify(found[-1])  # as a checkpoint given directly is
            return cfg, found[-1] / "model"
        raise ExportError(f"{source}: the run has neither final/ nor a complete checkpoint to {command}")
    raise ExportError(f"{source}: not a run directory (config.yaml) nor a checkpoint (state.json)")


OPT_INS = {"--trust-remote-code": "trust_remote_code", "--allow-pickle": "allow_pickle"}  # flag: the model.* key it sets


def add_opt_in_arguments(parser: argparse.ArgumentParser) -> None:
    """The OPT_INS flags, as every command that reads a run takes them (never from the run's config)."""
    parser.add_argument("--trust-remote-code", action="store_true", help="run the base model's own code (never taken from the run's config)")
    parser.add_argument("--allow-pickle", action="store_true", help="read pickle-only weights (CVE-2025-32434; never taken from the run's config)")


def opt_in_flags(args: argparse.Namespace) -> set[str]:
    """The OPT_INS flags given on the command line."""
    return {flag for flag in OPT_INS if getattr(args, flag.lstrip("-").replace("-", "_"))}


def with_opt_ins(cfg_model: ModelConfig, flags: set[str], command: str = "export") -> tuple[ModelConfig, list[str]]:
    """The run's model config with its code/pickle opt-ins taken from this command's flags, and a note per ignored one."""
    notes = [
        f"note: the run's config sets model.{key}=true, ignored: {command} takes it only from its own {flag} flag"
        for flag, key in OPT_INS.items()
        if getattr(cfg_model, key) and flag not in flags
    ]
    return dataclasses.replace(cfg_model, **{key: flag in flags for flag, key in OPT_INS.items()}), notes


def head_labels(cfg: Config, weights: Path, error: type[FinetuneError] = ExportError) -> list[str] | None:
    """The labels of the run's model head (None: a causal LM): a reward model's one output; a classifier's as its
    training fixed them: beside its weights (labels.json beside an adapter, config.json's id2label beside full
    weights), else data.labels, else the training records' labels (a checkpoint of a run that derived them)."""
    task = build_task(cfg.task, cfg.data)
    if not task.classification:
        return task.labels_or_none
    labels = labels_beside(weights, error) or list(cfg.data.labels)
    if labels:
        return labels
    from finetune.data import load_splits

    try:
        return load_splits(cfg.data, cfg.train.seed, cfg.task).labels
    except FinetuneError as e:
        raise error(f"{weights}: the classifier's label set is unknown (no labels.json or config.json with id2label beside its weights, no data.labels in its config, and its training data cannot be read: {e})") from None


def labels_beside(weights: Path, error: type[FinetuneError]) -> list[str] | None:
    """The label set saved beside a classifier's weights (labels.json, else config.json's id2label); None if neither is there."""
    if (weights / "labels.json").is_file():
        labels, source = json.loads((weights / "labels.json").read_text()), weights / "labels.json"
    elif (weights / "config.json").is_file():
        id2label = json.loads((weights / "config.json").read_text()).get("id2label") or {}
        labels, source = [id2label.get(str(i)) for i in range(len(id2label))], weights / "config.json"
        if not labels:
            return None
    else:
        return None
    if isinstance(labels, list) and len(labels) >= 2 and all(isinstance(label, str) for label in labels):
        return labels
    raise error(f"{source}: expected a list of at least two label strings, got {shown(labels)}")


def merged_model(cfg: Config, weights: Path) -> tuple[torch.nn.Module, object]:
    """The fine-tuned model in full precision, with the run's head: base + merged adapter, or the full weights (locate has checked them)."""
    base, tokenizer = build_model(cfg.model, cfg.train.seed, labels=head_labels(cfg, weights))  # never quantized: merge into full precision
    if (weights / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(weights)).merge_and_unload(), tokenizer
    return with_full_weights(base, weights, cfg.model.name), tokenizer


def with_full_weights(base: torch.nn.Module, weights: Path, name: str, command: str = "export") -> torch.nn.Module:
    """`base` with a full fine-tune's weights (final/ or a checkpoint's model/, which locate has checked) loaded in."""
    state = checkpoint.read_safetensors_dir(weights, command)
    missing, unexpected = base.load_state_dict(state, strict=False)
    tied = set(getattr(base, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise ExportError(f"{weights}: the weights do not fit {name} (missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    base.tie_weights()
    return base
