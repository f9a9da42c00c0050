"""Booster factory: config -> ColossalAI plugin + Booster, driven by a registry instead of an if-chain.

Each plugin is described once in PLUGINS: its ColossalAI class, the arguments users may set from
YAML (with their defaults, which also give their types), and what it can do. Config validation reads
this registry without importing ColossalAI, so bad input fails in a second, not after a 15 s import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class PluginSpec:
    """What one plugin is and can do."""

    class_name: str  # attribute of colossalai.booster.plugin
    options: dict[str, Any]  # user-settable constructor arguments and their defaults (which fix their types)
    summary: str
    supports_lora: bool = True
    supports_qlora: bool = True  # can hold a model whose frozen base weights are 4/8-bit integer tensors
    qlora_refusal: str = ""  # why not, when it cannot
    runs_on_cpu: bool = True
    takes_precision: bool = False  # the plugin's own `precision=` receives train.precision
    takes_max_norm: bool = False  # the plugin clips gradients itself, from train.max_grad_norm
    replicated: bool = True  # after a step every rank holds the whole model (DDP, ZeRO-1/2)
    cpu_options: dict[str, Any] = field(default_factory=dict)  # forced on CPU, each with a reason below
    translate: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # YAML values -> constructor values
    fsdp: bool = False  # PyTorch FSDP: LoRA through peft + FSDP's wrap policy, global-norm clipping, full-state saves


def _hybrid_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(options)
    for key in ("num_microbatches", "microbatch_size", "sequence_parallelism_mode"):
        kwargs[key] = kwargs[key] or None  # 0 / "" in YAML: let ColossalAI decide
    if kwargs["pp_size"] > 1 and kwargs["tp_size"] == 1:
        # ColossalAI 0.5.0 cannot save a pipeline checkpoint whose vocabulary was padded without
        # tensor parallelism ('_unpad_detach' missing); padding only matters for TP anyway.
        kwargs["make_vocab_size_divisible_by"] = 1
    return kwargs


def _fsdp_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torch.distributed.fsdp import BackwardPrefetch, CPUOffload, MixedPrecision, ShardingStrategy

    kwargs = dict(options)
    precision = kwargs.pop("precision")
    kwargs["sharding_strategy"] = ShardingStrategy[kwargs["sharding_strategy"]]
    kwargs["backward_prefetch"] = BackwardPrefetch[kwargs["backward_prefetch"]]
    kwargs["cpu_offload"] = CPUOffload(offload_params=kwargs["cpu_offload"])
    if precision == "bf16":  # bf16 compute and communication, fp32 sharded master weights
        kwargs["mixed_precision"] = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16)
    elif precision == "fp16":
        kwargs["mixed_precision"] = MixedPrecision(param_dtype=torch.float16, reduce_dtype=torch.float16, buffer_dtype=torch.float16)
    return kwargs



PLUGINS: dict[str, PluginSpec] = {
    "torch_ddp": PluginSpec(
        class_name="TorchDDPPlugin",
        summary="PyTorch DDP: a full replica per rank, gradients all-reduced. The simplest and most robust.",
        options={
            "broadcast_buffers": True,
            "bucket_cap_mb": 25,
            "find_unused_parameters": False,
            "gradient_as_bucket_view": False,
            "static_graph": False,
        },
    ),
    "low_level_zero": PluginSpec(
        class_name="LowLevelZeroPlugin",
        summary="ZeRO stage 1 (optimizer states sharded) or 2 (+ gradients sharded), optional CPU offload.",
        options={
            "stage": 1,
            "initial_scale": 2.0**16,  # fp16 loss scale start (2**32, ColossalAI's default, overflows for many steps)
            "reduce_bucket_size_in_m": 12,
            "overlap_communication": True,
            "cpu_offload": False,
            "master_weights": True,
        },
        takes_precision=True,
        takes_max_norm=True,
        # gloo cannot overlap communication on side streams (record_stream on a CPU tensor fails).
        cpu_options={"overlap_communication": False},
    ),
    "gemini": PluginSpec(
        class_name="GeminiPlugin",
        summary="Gemini: chunked ZeRO-3 with heterogeneous (GPU/CPU) placement and offload fractions. CUDA only.",
        options={
            "placement_policy": "static",
            "shard_param_frac": 1.0,
            "offload_optim_frac": 0.0,
            "offload_param_frac": 0.0,
            "warmup_non_model_data_ratio": 0.8,
            "steady_cuda_cap_ratio": 0.9,
            "initial_scale": 2.0**16,
            "pin_memory": False,
        },
        supports_lora=False,
        supports_qlora=False,
        qlora_refusal="Gemini manages parameters in floating-point chunks",
        runs_on_cpu=False,
        takes_precision=True,
        takes_max_norm=True,
        replicated=False,
    ),
    "torch_fsdp": PluginSpec(
        class_name="TorchFSDPPlugin",
        summary="PyTorch FSDP: parameters, gradients and optimizer states sharded (ZeRO-3 style), optional CPU offload.",
        options={
            "sharding_strategy": "FULL_SHARD",  # FULL_SHARD | SHARD_GRAD_OP | NO_SHARD | HYBRID_SHARD
            "backward_prefetch": "BACKWARD_PRE",  # BACKWARD_PRE | BACKWARD_POST
            "cpu_offload": False,
            "sync_module_states": False,
        },
        takes_precision=True,  # turned into FSDP MixedPrecision by _fsdp_kwargs
        replicated=False,
        supports_qlora=False,
        qlora_refusal="FSDP flattens each unit's parameters into one tensor of one floating dtype; 4/8-bit weights are integer tensors",
        fsdp=True,
        translate=_fsdp_kwargs,
    ),
    "hybrid_parallel": PluginSpec(
        class_name="HybridParallelPlugin",
        summary="Tensor (tp_size) x pipeline (pp_size) x data parallel, with optional ZeRO-1 (zero_stage).",
        options={
            "tp_size": 1,
            "pp_size": 1,
            "zero_stage": 0,
            "num_microbatches": 0,
            "microbatch_size": 0,
            "pp_style": "1f1b",
            "num_model_chunks": 1,
            "overlap_p2p": True,
            # Batches are padded to their longest sample, so tensor shapes change between steps; the
            # pipeline's p2p metadata cache assumes they do not (gloo then fails on a size mismatch).
            "enable_metadata_cache": True,
            "enable_flash_attention": False,
            "enable_fused_normalization": False,
            "enable_sequence_parallelism": False,
            "sequence_parallelism_mode": "",
            "make_vocab_size_divisible_by": 64,
            "initial_scale": 2.0**16,
            "overlap_communication": True,
        },
        takes_precision=True,
        takes_max_norm=True,
        replicated=False,
        # gloo: no side-stream overlap (as ZeRO), and overlapped p2p hangs the interleaved schedule.
        cpu_options={"overlap_communication": False, "overlap_p2p": False},
        translate=_hybrid_kwargs,
    ),
}


def plugin_kwargs(name: str, options: dict[str, Any], precision: str, max_grad_norm: float, on_cpu: bool) -> dict[str, Any]:
    """Constructor arguments for the named plugin: defaults, the user's options, then what we must set."""
    spec = PLUGINS[name]
    kwargs = {**spec.options, **options, **(spec.cpu_options if on_cpu else {})}
    if spec.takes_precision:
        kwargs["precision"] = precision
    if spec.takes_max_norm:
        kwargs["max_norm"] = max_grad_norm
    return spec.translate(kwargs) if spec.translate else kwargs


def build_booster(name: str, options: dict[str, Any], precision: str, max_grad_norm: float, custom_policy=None):
    """Build the ColossalAI Booster for a plugin setup (the process group must already exist).

    Args:
        custom_policy: hybrid_parallel only: the shardformer policy to shard the model with (None: ColossalAI's own).

    Returns:
        (booster, plugin)
    """
    # Imported here, not at module level: importing colossalai costs 10-20 s on a small CPU machine.
    import torch
    from colossalai.booster import Booster
    from colossalai.booster import plugin as plugins

    plugin_cls = getattr(plugins, PLUGINS[name].class_name)
    kwargs = plugin_kwargs(name, options, precision, max_grad_norm, on_cpu=not torch.cuda.is_available())
    if custom_policy is not None:
        kwargs["custom_policy"] = custom_policy
    plugin = plugin_cls(**kwargs)
    # fp16 for plugins that do not own precision goes through the Booster's torch AMP (CUDA only,
    # refused on CPU by config validation); bf16 there is autocast in the training step.
    mixed_precision = "fp16" if precision == "fp16" and not PLUGINS[name].takes_precision else None
    return Booster(plugin=plugin, mixed_precision=mixed_precision), plugin


@dataclass(frozen=True)
class Layout:
    """Where this rank sits in the parallel layout, for the parts of the loop that differ by plugin."""

    dp_rank: int
    dp_size: int
    pipeline: bool  # steps go through booster.execute_pipeline
    counts: bool  # this rank's loss and tokens enter the data-parallel sums (tp rank 0 on the last stage)
    replicated: bool  # every rank holds the whole model: eval and saves may use the unwrapped module


def parallel_layout(name: str, plugin) -> Layout:
    """The layout of this rank under a built plugin."""
    import torch.distributed as dist

    if hasattr(plugin, "pg_mesh"):  # HybridParallelPlugin
        last_stage = plugin.stage_manager is None or plugin.stage_manager.is_last_stage(ignore_chunk=True)
        return Layout(
            dp_rank=dist.get_rank(plugin.dp_group),
            dp_size=plugin.dp_size,
            pipeline=plugin.pp_size > 1,
            counts=last_stage and dist.get_rank(plugin.tp_group) == 0,
            replicated=False,
        )
    return Layout(dist.get_rank(), dist.get_world_size(), False, True, PLUGINS[name].replicated)
