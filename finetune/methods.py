"""Fine-tuning methods (`method=`): one record each, read wherever a method matters; importable without torch.

Adding a method is one record in METHODS (`register`). The LoRA hyper-parameters (rank, alpha, targets, ...) are the
`lora` config section; a method says whether adapters train and whether the frozen base is quantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.config import Config
    from finetune.core.plugins.base import PluginSpec


RANDOM_ADAPTER_INITS = ("default", "gaussian")  # lora.init values that make adapters without reading the base weights


@dataclass(frozen=True)
class Method:
    """What a method trains and what it holds frozen."""

    name: str
    adapter: bool  # LoRA adapters train (what checkpoints and final/ hold); the base stays frozen
    quantized_base: bool  # the frozen base is 4/8-bit (bitsandbytes; the `quantization` section)
    summary: str

    @property
    def full(self) -> bool:
        """Every weight trains (no adapter)."""
        return not self.adapter

    def frozen_dtype(self, precision: str) -> str:
        """The dtype the model's unquantized weights are loaded in: the compute dtype (bf16/fp16) for a frozen
        base under LoRA, as peft and the other tools hold it (the adapters keep float32 for the update);
        float32 when the weights train (each plugin keeps its own master copies) or are quantized."""
        return precision if self.adapter and not self.quantized_base else "fp32"

    def model_init(self, plugin: PluginSpec, cfg: Config) -> str:
        """How to build a pretrained model for this method under `plugin` (finetune.deferred): the plugin's way where the
        weights can wait until it has sharded the model, "eager" where they cannot. The one place this is decided."""
        if not self.adapter:
            return plugin.model_init
        if self.quantized_base and not plugin.quantizes_shards(cfg):
            return "eager"  # bitsandbytes quantizes the whole model while loading it
        if cfg.lora.init not in RANDOM_ADAPTER_INITS or cfg.lora.use_dora:
            return "eager"  # PiSSA/OLoRA decompose the base weights and DoRA takes their norms when the adapter is made
        # peft makes real adapters beside lazy weights (adapter_model_init); meta ones (FSDP) it would leave on the meta device
        return plugin.adapter_model_init


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("full", adapter=False, quantized_base=False, summary="every weight trains"),
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
