"""Model weights and adapters in and out of a replicated model: peft adapter state, full weights, master copies."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from finetune.checkpoint.files import read_adapter, read_safetensors_dir, write_adapter
from finetune.core.layout import Layout
from finetune.errors import CheckpointError
from finetune.lora_tp import full_tensor, local_shard
from finetune.model import trains_with_adapter

if TYPE_CHECKING:
    from finetune.run import Run


@dataclass(frozen=True, kw_only=True)
class TrainState:
    """What a plugin's checkpoint IO writes and reads: the boosted model and optimizer, and what decides how.

    A Run gives its own (Run.state); a test builds one from a boosted model and optimizer to round-trip them in-process.
    """

    model: Any  # the boosted model (a ColossalAI ModelWrapper)
    optimizer: Any  # the boosted optimizer
    booster: Any  # the Booster that boosted them: its plugin's process groups, its sharded save and load
    layout: Layout  # this rank's place: under a pipeline each stage holds a part of the model
    lora_config: Any = None  # the peft LoraConfig when adapters train (checkpoints hold the adapter), else None
    base_model: str = ""  # model.name: the base an adapter's config names

    @property
    def adapter(self) -> bool:
        """Whether adapters train (and a checkpoint holds only them)."""
        return self.lora_config is not None


def lora_key(name: str) -> str:
    """peft's adapter-file key for a LoRA parameter, from a PeftModel or an injected model alike."""
    prefix = "" if name.startswith("base_model.model.") else "base_model.model."
    return prefix + name.replace(".default.", ".")


# peft's default ("auto") asks the hub for the base's config.json whenever the base is not a local
# directory (a named config, a hub id), at every save, to see whether the vocabulary was resized. It
# never is here (LoRA's own embedding factors are saved either way): no lookup, offline means offline.
NO_EMBEDDINGS = False


def local_adapter_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's trained adapter weights, keyed as in adapter_model.safetensors.

    A PeftModel says itself what it saves (LoRA weights and modules_to_save, e.g. a classification
    head); for adapters injected for pipeline parallelism, the parameters that train with them.
    """
    from peft import PeftModel, get_peft_model_state_dict

    if isinstance(module, PeftModel):
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(module, save_embedding_layers=NO_EMBEDDINGS).items()}
    # Under tensor parallelism an adapter matrix may be split: gathering it is a collective.
    return {lora_key(n): full_tensor(p).detach().cpu().clone() for n, p in module.named_parameters() if trains_with_adapter(n)}


def gathered_adapter_state(module: torch.nn.Module, pipeline: bool) -> dict[str, torch.Tensor]:
    """The whole adapter on rank 0: each pipeline stage holds its own layers' share (tensor-parallel splits gathered); replicas hold it all."""
    local = local_adapter_state(module)
    if not pipeline:
        return local
    shares: list[dict] = [{}] * dist.get_world_size()
    dist.all_gather_object(shares, local)
    return {k: v for share in shares for k, v in share.items()}


def write_adapter_dir(adapter: dict[str, torch.Tensor], lora_config, base_model: str, path: Path) -> None:
    """A peft adapter directory: the weights and adapter_config.json naming the base model."""
    write_adapter(adapter, path)
    lora_config.base_model_name_or_path = base_model
    lora_config.save_pretrained(path)


def load_replicated_model(state: TrainState, path: Path) -> None:
    """Load full weights into every replica (tied weights were stored once), then into master copies."""
    module = state.model.unwrap()
    missing, unexpected = module.load_state_dict(read_safetensors_dir(path), strict=False)
    check_fit(module, missing, unexpected)
    module.tie_weights()
    update_master_params(state)


def check_fit(module: torch.nn.Module, missing: list[str], unexpected: list[str]) -> None:
    """Refuse weights that leave a parameter unset (tied ones are stored once) or name unknown ones."""
    tied = set(getattr(module, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"resume_from: the checkpoint's weights do not fit this model (missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")


def update_master_params(state: TrainState) -> None:
    """Optimizers that keep fp32 master copies must see weights loaded into the model."""
    if hasattr(state.model, "update_master_params"):  # LowLevelZero
        state.model.update_master_params()
    elif hasattr(state.optimizer, "update_master_params"):  # hybrid parallel's mixed-precision optimizers
        state.optimizer.update_master_params(state.model)


def init_adapter(run: Run, path: Path) -> None:
    """Start from the peft adapter in `path` (lora.init_from), under any plugin; every rank calls this."""
    run.plugin.load_adapter(run.state, read_adapter(path, run.cfg.model.allow_pickle, "lora.init_from"), f"lora.init_from: the adapter in {path}")


def load_adapter(state: TrainState, adapter: dict[str, torch.Tensor], source: str = "resume_from: the checkpoint's adapter") -> None:
    """Copy saved adapter weights into this rank's adapters, then into the optimizer's master copies.

    Args:
        source: what the adapter is, for errors.
    """
    from peft import PeftModel, set_peft_model_state_dict

    module = state.model.unwrap(unwrap_peft=False)
    if isinstance(module, PeftModel):
        missing = sorted(set(local_adapter_state(module)) - set(adapter))
        if missing:
            raise CheckpointError(f"{source} has no {missing[0]}; it was written for other LoRA targets")
        set_peft_model_state_dict(module, adapter)
        update_master_params(state)
        return
    with torch.no_grad():
        for name, param in module.named_parameters():
            if not trains_with_adapter(name):
                continue
            key = lora_key(name)
            if key not in adapter:
                raise CheckpointError(f"{source} has no {key}; it was written for other LoRA targets")
            param.copy_(local_shard(param, adapter[key]))  # split again under tensor parallelism
    update_master_params(state)
