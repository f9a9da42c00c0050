"""Pretrained weights loaded after the plugin has sharded the model, so that no rank holds the whole model.

A plugin that shards the model says how it wants the model built (`Plugin.model_init`):
  - "lazy": under ColossalAI's LazyInitContext (its Llama examples build models so for Gemini and
    HybridParallel): parameters are LazyTensors, and `booster.boost` materializes only this rank's shard;
    the plugin's load_deferred then reads the checkpoint into the shards (HybridParallel: the reader its
    resume uses, finetune.parallel.hybrid.load_split_model: of a split tensor only this rank's rows).
  - "meta": parameters on the meta device (buffers real); FSDP materializes each wrapped unit with
    `param_init_fn` straight from the checkpoint, shards it, and frees the rest before the next unit.
Only safetensors are read (never torch.load: a model directory is user-supplied).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from torch import nn


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

    def stored_names(self, name: str) -> list[str] | None:
        """Every name of the parameter called `name` now, peft's injected layers seen through (`q_proj.base_layer.weight`
        was built as `q_proj.weight`); None: a parameter made after the build (an adapter), which has its values."""
        return self.names.get(name) or self.names.get(name.replace(".base_layer.", "."))


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


