"""PyTorch FSDP at run time: its wrap policy, meta-device loading (param_init_fn), clipping, and checkpoint IO by
full state dicts, gathered on rank 0 to save, read by every rank to load.

ColossalAI's FSDP checkpoint IO gathers with offload_to_cpu=True, which fails on a CPU-only machine in torch
2.5.1 (size-0 storages, then a hang), so the FSDP paths use torch's APIs directly. The model is saved as a
plain HF directory (or peft adapter), like the replicated plugins' checkpoints, so finetune.export reads it
unchanged.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from finetune.checkpoint.files import WeightsDir, read_safetensors_dir, read_tree, write_tree
from finetune.checkpoint.model_state import NO_EMBEDDINGS, TrainState, check_fit, write_adapter_dir
from finetune.checkpoint.optimizer_state import OPTIMIZER_STEM, full_optimizer_stem, tied_output_embedding, without_frozen
from finetune.checkpoint.store import failing_together
from finetune.core.plugins.fsdp import TorchFSDPSpec
from finetune.errors import CheckpointError
from finetune.parallel.base import Plugin
from finetune.quantization import WeightBytes, quantized_modules, weight_bytes

if TYPE_CHECKING:
    from finetune.config import Config
    from finetune.run import Run


def fsdp_inner_module(state: TrainState) -> torch.nn.Module:
    """The model FSDP wraps: the HF model, or the PeftModel under LoRA."""
    return state.model.module.module


@contextlib.contextmanager
def fsdp_full_state(fsdp_module, rank0_only: bool):
    """FSDP's full-state-dict mode for model and optimizer; rank0_only: only rank 0 receives gathered dicts."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    offload = torch.cuda.is_available()  # on CPU the tensors are there already, and offloading fails
    model_options = FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only)
    optimizer_options = FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only)
    with FSDP.state_dict_type(fsdp_module, StateDictType.FULL_STATE_DICT, model_options, optimizer_options):
        yield


def fsdp_full_state_dict(fsdp_module) -> dict:
    """Every rank takes part; rank 0 gets the whole model state dict, the others an empty one."""
    with fsdp_full_state(fsdp_module, rank0_only=True):
        return fsdp_module.state_dict()


def fsdp_adapter_state(state: TrainState, model_state: dict) -> dict[str, torch.Tensor]:
    """The adapter (peft's keys and selection) out of an FSDP-gathered full state dict."""
    from peft import get_peft_model_state_dict

    adapter = get_peft_model_state_dict(fsdp_inner_module(state), state_dict=model_state, save_embedding_layers=NO_EMBEDDINGS)
    return {k: v.detach().cpu().clone() for k, v in adapter.items()}


def save_fsdp_optimizer(state: TrainState, path: Path) -> None:
    """The full (unflattened) optimizer state, keyed by parameter names, gathered and written by rank 0."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = state.model.module
    with fsdp_full_state(root, rank0_only=True):
        full = FSDP.optim_state_dict(root, state.optimizer.optim)
    if dist.get_rank() == 0:
        write_tree(full, path / OPTIMIZER_STEM)  # keyed by parameter names already, as every plugin's


def load_fsdp_optimizer(state: TrainState, path: Path) -> None:
    """The full optimizer state, read by rank 0 only and scattered by FSDP into each rank's shards."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root, optimizer = state.model.module, state.optimizer.optim
    with failing_together():  # a bad file on rank 0 must stop the others, not leave them in FSDP's broadcast
        full_state = without_frozen(read_tree(full_optimizer_stem(path))) if dist.get_rank() == 0 else {}
    with fsdp_full_state(root, rank0_only=True):
        optimizer.load_state_dict(FSDP.optim_state_dict_to_load(root, optimizer, full_state))


def load_fsdp_model(state: TrainState, path: Path) -> None:
    """Full weights, read by every rank through the FSDP root, which keeps each rank's shard."""
    root = state.model.module
    with fsdp_full_state(root, rank0_only=False):
        missing, unexpected = root.load_state_dict(read_safetensors_dir(path), strict=False)
    check_fit(fsdp_inner_module(state), missing, unexpected)


def load_fsdp_adapter(state: TrainState, adapter: dict[str, torch.Tensor], source: str = "resume_from: the checkpoint's adapter") -> None:
    """peft's own key mapping (adapter file -> model), loaded through the FSDP root, which scatters the shards."""
    import types

    from peft import set_peft_model_state_dict

    peft_model, root = fsdp_inner_module(state), state.model.module
    # set_peft_model_state_dict only renames keys and calls model.load_state_dict: give it the FSDP
    # root's, whose keys are the PeftModel's and which writes into every rank's flat shards.
    view = types.SimpleNamespace(peft_config=peft_model.peft_config, modules_to_save=peft_model.modules_to_save, load_state_dict=root.load_state_dict)
    missing = [k for k in set_peft_model_state_dict(view, adapter).missing_keys if "lora_" in k or "modules_to_save" in k]
    if missing:
        raise CheckpointError(f"{source} has no {missing[0]}; it was written for other LoRA targets")


def fsdp_param_init_fn(model: nn.Module, weights: WeightsDir, names: dict[str, list[str]]) -> Callable[[nn.Module], None]:
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
            tensor = weights.tensor(weights.key_for(aliases))
            module._parameters[attr] = nn.Parameter(tensor.to(param.dtype), requires_grad=param.requires_grad)
            if len(aliases) > 1:
                tied[id(param)] = [param, module._parameters[attr], len(aliases) - 1]

    return init


def _fsdp_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torch.distributed.fsdp import BackwardPrefetch, CPUOffload, MixedPrecision, ShardingStrategy

    kwargs = dict(options)
    precision = kwargs.pop("precision")
    kwargs.pop("auto_wrap")  # ours: applied as an auto_wrap_policy by TorchFSDP.before_boost
    kwargs["sharding_strategy"] = ShardingStrategy[kwargs["sharding_strategy"]]
    kwargs["backward_prefetch"] = BackwardPrefetch[kwargs["backward_prefetch"]]
    kwargs["cpu_offload"] = CPUOffload(offload_params=kwargs["cpu_offload"])
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if half is not None:  # half-precision compute and communication, fp32 sharded master weights
        # Every unit casts its inputs too: peft casts a LoRA layer's input to its (fp32, unsharded view)
        # weight dtype, which the unit's bf16 compute copy would not match.
        kwargs["mixed_precision"] = MixedPrecision(param_dtype=half, reduce_dtype=half, buffer_dtype=half, cast_forward_inputs=True)
    return kwargs


class TorchFSDP(TorchFSDPSpec, Plugin):
    """PyTorch FSDP at run time. ColossalAI's FSDP checkpoint IO gathers with offload_to_cpu=True, which fails on a
    CPU-only machine in torch 2.5.1 (size-0 storages, then a hang): weights and optimizer go through torch's
    full-state-dict APIs (this module's fsdp_* functions)."""

    def constructor_kwargs(self, options: dict[str, Any], precision: str, max_grad_norm: float, on_cpu: bool) -> dict[str, Any]:
        return _fsdp_kwargs(super().constructor_kwargs(options, precision, max_grad_norm, on_cpu))

    def apply_adapters(self, model, lora_config, booster, plugin):
        """ColossalAI's FSDP plugin refuses LoRA; peft + FSDP's wrap policy (a unit per adapted layer) work."""
        from peft import get_peft_model
        from peft.utils.other import fsdp_auto_wrap_policy

        model = get_peft_model(model, lora_config)
        plugin.fsdp_kwargs["auto_wrap_policy"] = fsdp_auto_wrap_policy(model)
        return model

    def before_boost(self, cfg: Config, model, plugin, pending=None) -> None:
        """Full fine-tuning with auto_wrap=block: a unit per transformer block (LoRA got peft's policy in apply_adapters).
        A model built on the meta device gets each unit's weights from the checkpoint as FSDP wraps it."""
        if pending is not None:
            plugin.fsdp_kwargs["param_init_fn"] = fsdp_param_init_fn(model, WeightsDir(pending.path), pending.names)
        if quantized_modules(model):
            # A 4-bit weight's quantization state (absmax, code book, shape) lives on its Params4bit object. Under
            # use_orig_params FSDP keeps those objects, their data views into this rank's shard (gathered around
            # each unit's compute); without it, the module would see plain views of the flat parameter instead.
            plugin.fsdp_kwargs["use_orig_params"] = True
        if plugin.fsdp_kwargs.get("auto_wrap_policy") is not None or cfg.plugin.options["auto_wrap"] != "block":
            return
        import functools

        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        names = set(getattr(model, "_no_split_modules", None) or [])
        blocks = {type(m) for m in model.modules() if type(m).__name__ in names}
        if blocks:
            plugin.fsdp_kwargs["auto_wrap_policy"] = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=blocks)

    def load_deferred(self, run: Run, pending) -> None:
        """Nothing left to read: FSDP filled each unit from the checkpoint while wrapping it (before_boost)."""
        run.booster.plugin.fsdp_kwargs.pop("param_init_fn", None)

    def after_boost(self, cfg: Config, optimizer, scheduler, device):
        """The scheduled lr put back, and fp16 loss scaling (FSDP's MixedPrecision casts, it does not scale)."""
        # ColossalAI's FSDP plugin re-creates the optimizer's param groups over the FSDP parameters,
        # dropping the lr the scheduler had set (0 during warmup): put the scheduled lr back.
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
            # It re-creates them over every FSDP parameter, frozen ones included (a LoRA base's flat parameters):
            # keep the trainable ones, so the optimizer state names what trains, as every other plugin's does.
            group["params"] = [p for p in group["params"] if p.requires_grad]
        if cfg.train.precision == "fp16":
            from finetune.loss_scaling import loss_scaled

            return loss_scaled(optimizer, device, sharded=True)
        return optimizer

    def build_optimizer(self, params: list, cfg: Config):
        """As every plugin's, but under fp16 AdamW steps one tensor at a time without the fused kernel: torch 2.5's
        ShardedGradScaler hands a fused optimizer a found_inf of shape [1], which its kernel cannot subtract from
        the 0-dim step counts (RuntimeError at the first step, on CUDA as on CPU)."""
        if cfg.train.precision == "fp16" and cfg.train.optimizer == "adamw":
            import torch

            return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, foreach=False)
        return super().build_optimizer(params, cfg)

    def clip_gradients(self, run: Run, max_norm: float) -> float | None:
        from finetune.loss_scaling import unscale

        unscale(run.optimizer)  # FSDP's clip must see the unscaled gradients
        return float(run.model.module.clip_grad_norm_(max_norm))  # FSDP's own: the norm over all shards

    def held_weight_bytes(self, state: TrainState) -> WeightBytes:
        """This rank's shards: the flat parameters, or under use_orig_params (a quantized base) each parameter's share
        of them, a 4-bit weight's quantization state (absmax, code book) whole on every rank."""
        return weight_bytes(state.model.module)

    def write_model(self, state: TrainState, path: Path) -> None:
        """Gather the full state dict on rank 0; write it with HF's writer, or its adapter in peft layout."""
        import torch.distributed as dist

        full = fsdp_full_state_dict(state.model.module)
        if dist.get_rank() != 0:
            return
        if state.adapter:
            write_adapter_dir(fsdp_adapter_state(state, full), state.lora_config, state.base_model, path)
            return
        module = fsdp_inner_module(state)
        # The gathered tensors share no storage, so HF's writer cannot see a tied output embedding: drop it, as
        # every other plugin's files do (stored once, under the input embedding's name).
        for output, tied_to in tied_output_embedding(module).items():
            if output in full and tied_to in full:
                del full[output]
        module.save_pretrained(path, state_dict=full, safe_serialization=True)

    def read_weights(self, state: TrainState, path: Path) -> None:
        """Full weights through the FSDP root, which keeps each rank's shard."""
        load_fsdp_model(state, path)

    def load_adapter(self, state: TrainState, adapter: dict, source: str) -> None:
        """peft's key mapping through the FSDP root, which scatters the adapter into each rank's shards."""
        with fsdp_full_state(state.model.module, rank0_only=False):
            load_fsdp_adapter(state, adapter, source)

    def write_optimizer(self, state: TrainState, path: Path) -> None:
        """The full optimizer state by parameter name, gathered and written by rank 0."""
        save_fsdp_optimizer(state, path)

    def read_optimizer(self, state: TrainState, path: Path) -> None:
        """The full optimizer state, read by rank 0 and scattered by FSDP into each rank's shards."""
        load_fsdp_optimizer(state, path)
