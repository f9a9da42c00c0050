"""LowLevelZero's declaration: ZeRO stage 1 or 2 over the data-parallel ranks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from finetune.core.layout import Placement, cast_placement, half_precision
from finetune.core.plugins.base import PluginSpec, choice_problem

if TYPE_CHECKING:
    from finetune.config import Config


def zero_placement(cfg: Config, world: int, dp: int | None = None, stage: int | None = None, offload: bool | None = None, master: bool | None = None) -> Placement:
    """LowLevelZero: model cast to the run's dtype; fp32 master and optimizer states sharded (stage 2: gradients too)."""
    options = cfg.plugin.options
    dp = world if dp is None else dp
    stage = options["stage"] if stage is None else stage
    offload = options["cpu_offload"] if offload is None else offload
    master = options["master_weights"] if master is None else master
    return cast_placement(
        cfg,
        dp=dp,
        master_bytes=4 if master else 0,  # ColossalAI clones the master even in fp32
        state_bytes=4 if master else (2 if half_precision(cfg) else 4),
        step_grad_bytes=4 if master and half_precision(cfg) else 0,
        grad_shards=dp if stage == 2 else 1,
        optim_shards=dp,
        optim_offload=1.0 if offload else 0.0,
        reduce_bucket=int(options.get("reduce_bucket_size_in_m", 12) * 1024 * 1024),
    )


class LowLevelZeroSpec(PluginSpec):
    name = "low_level_zero"
    class_name = "LowLevelZeroPlugin"
    summary = "ZeRO stage 1 (optimizer states sharded) or 2 (+ gradients sharded), optional CPU offload."
    options = {
        "stage": 1,
        "initial_scale": 2.0**16,  # fp16 loss scale start (2**32, ColossalAI's default, overflows for many steps)
        "reduce_bucket_size_in_m": 12,
        "overlap_communication": True,
        "cpu_offload": False,
        "master_weights": True,
    }
    # gloo cannot overlap communication on side streams (record_stream on a CPU tensor fails).
    cpu_options = {"overlap_communication": False}
    takes_precision = True
    takes_max_norm = True
    state_offload = ("plugin.cpu_offload=true",)  # optimizer states and the fp32 master, stepped on the CPU

    def problems(self, cfg: Config, world_size: int, has_cuda: bool) -> list[str]:
        return choice_problem("stage", cfg.plugin.options["stage"], (1, 2))

    def setting_label(self, options: dict[str, Any], world_size: int, dp_size: int) -> str:
        return f"zero{options.get('stage', 1)} x{world_size}"

    def placement(self, cfg: Config, world_size: int) -> Placement:
        return zero_placement(cfg, world_size)

    def fit_alternatives(self, world_size: int) -> list[tuple[tuple[str, ...], float]]:
        """ZeRO-2: gradients and states sharded over the same ranks."""
        return [((f"plugin.name={self.name}", "plugin.stage=2"), 2)]
