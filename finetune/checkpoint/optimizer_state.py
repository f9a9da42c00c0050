"""Optimizer state by parameter name: any plugin writes the whole state so, and any layout reads it back."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from finetune.checkpoint.files import read_tree, write_tree
from finetune.errors import CheckpointError

if TYPE_CHECKING:
    from finetune.checkpoint.model_state import TrainState


OPTIMIZER_STEM = "state"  # optimizer/state.safetensors + state.json


FSDP_OPTIMIZER_STEM = "full_state"  # where checkpoints before any-layout resume kept it; now OPTIMIZER_STEM


def full_optimizer_stem(path: Path) -> Path:
    """The whole optimizer state by parameter name, whichever plugin wrote it (FSDP's was `full_state` until resume on any layout unified the names)."""
    old = path / FSDP_OPTIMIZER_STEM
    return old if not (path / f"{OPTIMIZER_STEM}.json").is_file() and old.with_name(old.name + ".json").is_file() else path / OPTIMIZER_STEM


def optimizer_params(state: TrainState) -> list[tuple[str, torch.Tensor]]:
    """The name and the model's (working) parameter of each optimizer parameter, in its state-dict order (its param groups, in order).

    Mixed-precision and ZeRO optimizers hold fp32 master copies: their map leads back to the model's
    (working) parameter, whose name the model knows.
    """
    module = state.model.unwrap(unwrap_peft=False)
    names = {id(p): n for n, p in module.named_parameters()}
    master_to_working = getattr(state.optimizer, "get_master_to_working_map", lambda: None)() or {}
    real = getattr(state.optimizer, "id_to_real_params", None)  # Gemini: its groups hold placeholders
    order = [real[i] for i in sorted(real)] if real else [p for group in state.optimizer.param_groups for p in group["params"]]
    working = [master_to_working.get(id(p), p) for p in order]
    return [(names[id(p)], p) for p in working]


def optimizer_param_names(state: TrainState) -> list[str]:
    """The name of each parameter in the optimizer's state-dict order."""
    return [name for name, _ in optimizer_params(state)]


def global_param_names(state: TrainState, names: list[str]) -> list[str]:
    """The names another layout's optimizer state uses for these parameters of this rank's model: adapters
    injected without a PeftModel (tensor/pipeline parallelism) get peft's prefix, and an output embedding
    held apart from the input embedding it is tied to (a pipeline's last stage) takes the input's name,
    the one a whole model's named_parameters() keeps."""
    from peft import PeftModel

    module = state.model.unwrap(unwrap_peft=False)
    prefix = "base_model.model." if state.adapter and not isinstance(module, PeftModel) else ""
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
        # A name this optimizer lacks and the state does not hold is a frozen parameter (without_frozen): not listed.
        "param_groups": [{**g, "params": sorted(index[n] for n in g["params"] if n in index)} for g in named["param_groups"]],
    }


def without_frozen(named: dict) -> dict:
    """A named optimizer state whose groups list only parameters with a state: FSDP's optimizer listed the frozen
    ones too (a LoRA base's) until it kept only trainable ones, and checkpoints written before still do."""
    return {**named, "param_groups": [{**g, "params": [n for n in g["params"] if n in named["state"]]} for g in named["param_groups"]]}


def save_optimizer(state: TrainState, path: Path) -> None:
    """The whole optimizer state by parameter name, written by rank 0 (under ZeRO every rank takes part in gathering it)."""
    named = named_optimizer_state(state.optimizer.state_dict(), optimizer_param_names(state))
    if dist.get_rank() == 0:
        write_tree(named, path / OPTIMIZER_STEM)


def load_optimizer(state: TrainState, path: Path, stem: str = "") -> None:
    """Every rank reads the whole state; the optimizer keeps its own share (ZeRO splits it)."""
    state.optimizer.load_state_dict(indexed_optimizer_state(read_tree(path / stem if stem else full_optimizer_stem(path)), optimizer_param_names(state)))
