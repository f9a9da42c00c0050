"""Fine-tuning methods (`method=`): one record each, read wherever a method matters; importable without torch.

Adding a method is one record in METHODS (`register`). The LoRA hyper-parameters (rank, alpha, targets, ...) are the
`lora` config section; a method says whether adapters train and whether the frozen base is quantized.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """What a method trains and what it holds frozen."""

    name: str
    adapter: bool  # LoRA adapters train (what checkpoints and final/ hold); the base stays frozen
    quantized_base: bool  # the frozen base is 4/8-bit (bitsandbytes; the `quantization` section)
    summary: str
    # The model may be built without its weights for a sharding plugin to load per shard (Plugin.model_init).
    # Not under LoRA: peft would create adapters beside lazy or meta weights (on the meta device under FSDP),
    # and PiSSA/OLoRA initialise from the base weights themselves. QLoRA: bitsandbytes quantizes while loading.
    # Both hold the frozen base in the compute dtype or 4/8 bits instead.
    deferred_weights: bool = False

    @property
    def full(self) -> bool:
        """Every weight trains (no adapter)."""
        return not self.adapter

    def frozen_dtype(self, precision: str) -> str:
        """The dtype the model's unquantized weights are loaded in: the compute dtype (bf16/fp16) for a frozen
        base under LoRA, as peft and the other tools hold it (the adapters keep float32 for the update);
        float32 when the weights train (each plugin keeps its own master copies) or are quantized."""
        return precision if self.adapter and not self.quantized_base else "fp32"

    def model_init(self, plugin_init: str) -> str:
        """How to build the model under a plugin that asks for `plugin_init` (Plugin.model_init): eager where this method cannot defer."""
        return plugin_init if self.deferred_weights else "eager"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("full", adapter=False, quantized_base=False, summary="every weight trains", deferred_weights=True),
        Method("lora", adapter=True, quantized_base=False, summary="LoRA adapters on a frozen base"),
        Method("qlora", adapter=True, quantized_base=True, summary="LoRA adapters on a frozen 4/8-bit base (bitsandbytes)"),
    )
}


def register(method: Method) -> Method:
    """Add a method record (the built-in ones are registered above; a test adds its own the same way)."""
    METHODS[method.name] = method
    return method


def method_named(name: str) -> Method:
    """The record of `method=name` (config validation has refused unknown names before this is asked)."""
    return METHODS[name]
