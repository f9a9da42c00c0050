"""TorchFSDP's declaration: parameters, gradients and optimizer states sharded (ZeRO-3 style)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.core.layout import Placement, half_precision
from finetune.core.plugins.base import PluginSpec
from finetune.methods import method_named

if TYPE_CHECKING:
    from finetune.config import Config


class TorchFSDPSpec(PluginSpec):
    name = "torch_fsdp"
    short_name = "fsdp"
    class_name = "TorchFSDPPlugin"
    summary = "PyTorch FSDP: parameters, gradients and optimizer states sharded (ZeRO-3 style), optional CPU offload."
    options = {
        "sharding_strategy": "FULL_SHARD",
        "backward_prefetch": "BACKWARD_PRE",
        "cpu_offload": False,
        "sync_module_states": False,
        # Full fine-tuning: "block" makes every transformer block (the model's _no_split_modules) its
        # own FSDP unit, so one block is gathered at a time; "none" gathers the whole model for compute.
        # (LoRA always wraps per adapted layer and block, peft's policy.)
        "auto_wrap": "block",
    }
    choices = {
        "sharding_strategy": ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"),
        "backward_prefetch": ("BACKWARD_PRE", "BACKWARD_POST"),
        "auto_wrap": ("block", "none"),
    }
    # On CPU the parameters are in host memory already, and torch 2.5's FSDP offload pins host buffers, which needs an
    # accelerator (RuntimeError "CPU device type not an accelerator" at the first forward): off there, a no-op.
    cpu_options = {"cpu_offload": False}
    takes_precision = True  # turned into FSDP MixedPrecision by constructor_kwargs
    replicated = False
    model_init = "meta"  # FSDP materializes each unit (param_init_fn): from the checkpoint, see before_boost
    state_offload = ("plugin.cpu_offload=true",)  # parameters, gradients and optimizer states

    def problems(self, cfg: Config, world_size: int, has_cuda: bool) -> list[str]:
        """8-bit QLoRA: bitsandbytes has no float storage for int8 weights, which FSDP's float units cannot hold."""
        if method_named(cfg.method).quantized_base and cfg.quantization.bits == 8:
            return [
                "method=qlora with quantization.bits=8 under torch_fsdp: bitsandbytes holds 8-bit weights only as int8 tensors "
                "(4-bit ones can be stored as floats), and FSDP flattens each unit into one float tensor; use quantization.bits=4, or plugin.name=torch_ddp"
            ]
        return []

    def quantized_storage(self, cfg: Config) -> str | None:
        """The run's precision: FSDP flattens each unit into one tensor of one float dtype and casts it to the compute
        dtype under mixed precision, so every frozen weight, the packed 4-bit bytes included, is held in that dtype:
        flattened and sharded as it is, never cast (a cast would change the packed bytes)."""
        return cfg.train.precision

    def placement(self, cfg: Config, world_size: int) -> Placement:
        """fp32 flat shards (the master), gathered in the compute dtype one unit at a time.

        Full fine-tuning is wrapped per transformer block (plugin.auto_wrap=block, the default) or as one
        unit (none: the whole model gathered for compute); LoRA with peft's policy (a unit per layer).
        """
        options = cfg.plugin.options
        one_unit = method_named(cfg.method).full and options.get("auto_wrap", "block") == "none"  # read with a default: older configs lack the key
        sharded = world_size if options["sharding_strategy"] != "NO_SHARD" else 1
        element = 2 if half_precision(cfg) else 4
        return Placement(
            dp=world_size,
            compute_bytes=element,
            residual_bytes=element,
            eval_half=half_precision(cfg),
            param_shards=sharded,
            grad_shards=sharded,
            optim_shards=sharded,
            optim_offload=1.0 if options["cpu_offload"] else 0.0,
            param_offload=1.0 if options["cpu_offload"] else 0.0,
            gathered="model" if one_unit else "layers",
        )

    def fit_alternatives(self, world_size: int) -> list[tuple[tuple[str, ...], float]]:
        """FSDP: everything sharded over the same ranks."""
        return [((f"plugin.name={self.name}",), 2)]
