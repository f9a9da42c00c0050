"""Booster factory: config -> ColossalAI plugin + Booster, driven by a registry instead of an if-chain.

Each plugin is described once in PLUGINS: its ColossalAI class, the arguments users may set from
YAML (with their defaults, which also give their types), and what it can do. Config validation reads
this registry without importing ColossalAI, so bad input fails in a second, not after a 15 s import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PluginSpec:
    """What one plugin setup is and can do."""

    class_name: str  # attribute of colossalai.booster.plugin
    options: dict[str, Any]  # user-settable constructor arguments and their defaults
    summary: str
    supports_lora: bool = True
    runs_on_cpu: bool = True
    takes_precision: bool = False  # plugin's own `precision=` argument receives train.precision
    takes_max_norm: bool = False  # plugin clips gradients itself from train.max_grad_norm
    fixed: dict[str, Any] = field(default_factory=dict)  # arguments we always pass


PLUGINS: dict[str, PluginSpec] = {
    "torch_ddp": PluginSpec(
        class_name="TorchDDPPlugin",
        summary="PyTorch DistributedDataParallel: full replica per rank; the simplest and most robust.",
        options={
            "broadcast_buffers": True,
            "bucket_cap_mb": 25,
            "find_unused_parameters": False,
            "gradient_as_bucket_view": False,
            "static_graph": False,
        },
    ),
}


def plugin_kwargs(name: str, options: dict[str, Any], precision: str, max_grad_norm: float) -> dict[str, Any]:
    """Constructor arguments for the named plugin: defaults, then the user's options, then ours."""
    spec = PLUGINS[name]
    kwargs = {**spec.options, **options, **spec.fixed}
    if spec.takes_precision:
        kwargs["precision"] = precision
    if spec.takes_max_norm:
        kwargs["max_norm"] = max_grad_norm
    return kwargs


def build_booster(name: str, options: dict[str, Any], precision: str, max_grad_norm: float):
    """Build the ColossalAI Booster for a plugin setup (the process group must already exist).

    Returns:
        (booster, plugin)
    """
    # Imported here, not at module level: importing colossalai costs 10-20 s on a small CPU machine.
    from colossalai.booster import Booster
    from colossalai.booster import plugin as plugins

    plugin_cls = getattr(plugins, PLUGINS[name].class_name)
    plugin = plugin_cls(**plugin_kwargs(name, options, precision, max_grad_norm))
    # fp16 for plugins that do not own precision goes through the Booster's torch AMP (CUDA only,
    # refused on CPU by config validation); bf16 there is autocast in the training step.
    mixed_precision = "fp16" if precision == "fp16" and not PLUGINS[name].takes_precision else None
    return Booster(plugin=plugin, mixed_precision=mixed_precision), plugin
