"""Pretrained weights loaded after the plugin has sharded the model, so that no rank holds the whole model.

A plugin that shards the model says how it wants the model built (`Plugin.model_init`):
  - "lazy": under ColossalAI's LazyInitContext (its Llama examples build models so for Gemini and
    HybridParallel): parameters are LazyTensors, and `booster.boost` materializes only this rank's shard;
    the plugin's load_deferred then reads the checkpoint into the shards (HybridParallel: the reader its
    resume uses, finetune.checkpoint.load_split_model: of a split tensor only this rank's rows).
  - "meta": parameters on the meta device (buffers real); FSDP materializes each wrapped unit with
    `param_init_fn` straight from the checkpoint, shards it, and frees the rest before the next unit.
Only safetensors are read (never torch.load: a model directory is user-supplied).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn


class Checkpoint:
    """The tensors of a pretrained save_pretrained directory (one safetensors file, or the shards its index lists), read by name."""

    def __init__(self, path: Path) -> None:
        from finetune.checkpoint import weight_files

        self.path = Path(path)
        self.files = weight_files(self.path, "model.name")  # an index may name safetensors files in this directory only

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor, copied out of its memory-mapped file; the file is unmapped again, so its pages leave
        this process's resident set (kept mapped, every page read would count in it until the end)."""
        from safetensors import safe_open

        with safe_open(self.files[key], framework="pt") as f:
            return f.get_tensor(key)

    def key_for(self, names: list[str]) -> str:
        """The stored key of a parameter known by these names (tied weights are stored once, under one of them)."""
        from finetune.checkpoint import weight_key

        return weight_key(self.files, names, self.path, "model.name")


def build_context(init: str):
    """The context to build a model in for `init` ("lazy" | "meta"; "eager": none)."""
    # transformers' no_init_weights: the random init would be overwritten by the checkpoint anyway (and,
    # lazily recorded, replayed at materialization), as ColossalAI's own lazy from_pretrained builds.
    from transformers.modeling_utils import no_init_weights

    if init == "lazy":
        from colossalai.lazy import LazyInitContext

        return _both(LazyInitContext(), no_init_weights())
    if init == "meta":
        from transformers.integrations.accelerate import init_empty_weights

        return _both(init_empty_weights(include_buffers=False), no_init_weights())  # buffers (rotary tables, masks) are real: small
    return contextlib.nullcontext()


@contextlib.contextmanager
def _both(first, second):
    """Two contexts as one."""
    with first, second:
        yield


@dataclass(frozen=True)
class Pending:
    """A model built without its weights: where they are, and every name of each parameter (tied weights
    have several, stored once), taken before wrapping hides the model."""

    path: Path
    names: dict[str, list[str]]


def pending(model: nn.Module) -> Pending | None:
    """The weights a model built by build_model(init="lazy"|"meta") still needs; None: it has them."""
    return getattr(model, PENDING_ATTR, None)


def defer(model: nn.Module, path: Path) -> nn.Module:
    """Record on the model that its weights are to be read from path once the plugin has sharded it."""
    by_object: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_object.setdefault(id(param), []).append(name)
    names = {name: by_object[id(param)] for name, param in model.named_parameters(remove_duplicate=False)}
    setattr(model, PENDING_ATTR, Pending(Path(path), names))
    return model


PENDING_ATTR = "finetune_pending_weights"


def fsdp_param_init_fn(model: nn.Module, checkpoint: Checkpoint, names: dict[str, list[str]]) -> Callable[[nn.Module], None]:
    """FSDP's param_init_fn for a model built on the meta device: each module's own parameters from the checkpoint.

    FSDP calls it on every module of a unit before sharding that unit; tied parameters (one object under
    several modules) are materialized once and shared again.
    """
    prefixes = {id(m): f"{name}." if name else "" for name, m in model.named_modules(remove_duplicate=False)}
    # Tied parameters only (kept for their other modules, all in one unit); the others' full tensors must
    # go once FSDP has sharded their unit.
    tied: dict[int, list] = {}  # id(meta param) -> [meta param, loaded param, modules still to get it]

    def init(module: nn.Module) -> None:
        for attr, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            name = prefixes[id(module)] + attr
            if id(param) in tied:
                entry = tied[id(param)]
                module._parameters[attr], entry[2] = entry[1], entry[2] - 1
                if entry[2] == 0:
                    del tied[id(param)]
                continue
            aliases = names.get(name, [name])
            tensor = checkpoint.tensor(checkpoint.key_for(aliases))
            module._parameters[attr] = nn.Parameter(tensor.to(param.dtype), requires_grad=param.requires_grad)
            if len(aliases) > 1:
                tied[id(param)] = [param, module._parameters[attr], len(aliases) - 1]

    return init
