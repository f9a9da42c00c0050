"""TorchDDP's declaration: a full replica per rank."""

from __future__ import annotations

from typing import Any

from finetune.core.plugins.base import PluginSpec


class TorchDDPSpec(PluginSpec):
    name = "torch_ddp"
    short_name = "ddp"
    class_name = "TorchDDPPlugin"
    summary = "PyTorch DDP: a full replica per rank, gradients all-reduced. The simplest and most robust."
    options = {
        "broadcast_buffers": True,
        "bucket_cap_mb": 25,
        "find_unused_parameters": False,
        "gradient_as_bucket_view": False,
        "static_graph": False,
    }

    def setting_label(self, options: dict[str, Any], world_size: int, dp_size: int) -> str:
        return "single" if world_size == 1 else super().setting_label(options, world_size, dp_size)
