"""The Run: what the training loop and the checkpointer need, and `build_run`, which builds it for train.py, bench/ and the tests."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from finetune import checkpoint, chunked_loss, fused
from finetune.activation_offload import ActivationOffload, block_stack
from finetune.checkpoint.model_state import TrainState
from finetune.booster import build_booster
from finetune.config import Config, parallel_plan
from finetune.core.layout import Layout, Plan
from finetune.core.loss_chunks import loss_chunk_tokens
from finetune.data import DataError, Padding, collate
from finetune.distributed import log
from finetune.faults import Faults
from finetune.methods import Method, method_named
from finetune.model import build_lora_config, count_parameters, trainable_line
from finetune.packing import collate_packed, pack
from finetune.parallel import PLUGINS
from finetune.parallel.base import Plugin
from finetune.preemption import Preemption
from finetune.preference import PairObjective, pair_objective
from finetune.tasks import Task


@dataclass(kw_only=True)
class Run:
    """One training run's objects: the config, the choices resolved from it, and the boosted state."""

    cfg: Config
    plugin: Plugin  # the parallel strategy: every plugin-dependent step asks it
    method: Method  # what trains (full weights or adapters) and whether the base is quantized
    task: Task  # data, model head, eval and generation prompts
    plan: Plan  # tp / pp / dp / micro-batches, derived once from the config
    layout: Layout  # this rank's place in the built plugin
    booster: Any  # colossalai.booster.Booster
    model: torch.nn.Module  # the boosted model
    optimizer: Any
    scheduler: Any
    device: torch.device
    padding: Padding  # how wide every batch is padded (pipelines: data.max_length; sequence parallelism: a multiple of its degree)
    lora_config: Any  # peft LoraConfig when adapters train, else None
    steps_per_epoch: int
    total_steps: int  # the scheduler's horizon: train.max_steps, or train.epochs full epochs
    parameter_counts: tuple[int, int]  # (trainable, total) of the model as built, before a plugin sharded it
    faults: Faults
    preemption: Preemption | None  # SIGTERM / SIGUSR1: stop after the current step with a checkpoint; None: no handler (no fit())
    objective: PairObjective | None = None  # preference pairs: the loss and its metrics; None: the model's own loss
    # Entered around each micro-batch's forward and backward: train.activation_offload's hooks, else nothing.
    saved_activations: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)

    @property
    def state(self) -> TrainState:
        """What the plugin's checkpoint IO writes and reads: the boosted model and optimizer, and how they were built."""
        return TrainState(model=self.model, optimizer=self.optimizer, booster=self.booster, layout=self.layout, lora_config=self.lora_config, base_model=self.cfg.model.name)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int):
    """Warmup, then constant, linear or cosine decay over total_steps."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.train.lr_scheduler == "constant" else cfg.train.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=total_steps)


def build_dataloader(cfg: Config, plugin, samples: list[dict], pad_token_id: int, padding: Padding, packed: str = ""):
    """The plugin's distributed dataloader: shuffled by train.seed, full batches only.

    Args:
        packed: with packing, how packed batches mark sample boundaries (finetune.packing.packed_attention);
            the batches are then packed rows.
    """
    if packed:
        samples = pack(samples, cfg.data.max_length)
        collate_fn = functools.partial(collate_packed, pad_token_id=pad_token_id, attention=packed, padding=padding)
    else:
        collate_fn = functools.partial(collate, pad_token_id=pad_token_id, padding=padding)
    return plugin.prepare_dataloader(
        samples,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        seed=cfg.train.seed,
        drop_last=True,
        collate_fn=collate_fn,
        # ColossalAI seeds only its workers; the sampler's shuffling must follow train.seed too.
        distributed_sampler_cls=functools.partial(DistributedSampler, seed=cfg.train.seed),
        # Each new epoch iterator draws a seed; from its own generator it leaves the global RNG (dropout)
        # alone, so a resumed run, which starts a new iterator mid-epoch, draws the same dropout masks.
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )


def build_run(
    cfg: Config, *, world_size: int, device: torch.device, task: Task, model: torch.nn.Module, pending, samples: list[dict], pad_token_id: int,
    packed: str = "", faults: Faults, preemption: Preemption | None,
) -> tuple[Run, Any]:
    """Booster, adapters, optimizer, dataloader and scheduler for a built model, boosted into a Run; returns it and its dataloader.

    Args:
        pending: the weights a model built without them still needs (finetune.deferred.pending), read into
            each rank's shards once boosted; None for a model built with its weights.
        samples: the tokenized training samples; packed: as in build_dataloader.

    Raises:
        DataError: the samples are too few for one optimizer step.
    """
    plugin_spec, method = PLUGINS[cfg.plugin.name], method_named(cfg.method)
    booster, plugin = build_booster(cfg.plugin.name, cfg.plugin.options, cfg.train.precision, cfg.train.max_grad_norm, plugin_spec.shard_policy(cfg, model))
    layout = plugin_spec.layout(plugin)
    chunk_tokens = loss_chunk_tokens(cfg)
    if chunk_tokens:
        chunked_loss.install(model, chunk_tokens)
        log(f"causal-LM loss in chunks of {chunk_tokens} label tokens (train.loss_chunks): no full logits")
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora_config = build_lora_config(model, cfg.lora) if method.adapter else None
    if lora_config:
        torch.manual_seed(cfg.train.seed)  # adapter init independent of whatever consumed random numbers before
        model = plugin_spec.apply_adapters(model, lora_config, booster, plugin)
    fused_ops = fused.install(model)
    if fused_ops:
        log(f"fused forward and backward where a layer allows (finetune.fused): {', '.join(fused_ops)}")
    plugin_spec.before_boost(cfg, model, plugin, pending)
    parameter_counts = count_parameters(model)
    log(trainable_line(*parameter_counts))

    optimizer = plugin_spec.build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    # Pipeline stages exchange activations whose shapes ColossalAI caches after the first step, so
    # under PP every batch is padded to data.max_length (non-pad tokens are still what is counted);
    # sequence parallelism splits every batch's sequence into equal parts.
    padding = Padding(width=cfg.data.max_length if layout.pipeline else 0, multiple=layout.sequence_multiple)
    dataloader = build_dataloader(cfg, plugin, samples, pad_token_id, padding, packed)
    steps_per_epoch = len(dataloader) // cfg.train.grad_accum_steps
    if steps_per_epoch == 0:
        rows = f"{len(dataloader.dataset)} packed rows of " if packed else ""
        raise DataError(f"{cfg.data.train_path}: {rows}{len(samples)} samples are too few for one step of {cfg.train.batch_size} x {cfg.train.grad_accum_steps} on {layout.dp_size} data-parallel rank(s)")
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    model, optimizer, _, dataloader, scheduler = booster.boost(model, optimizer, dataloader=dataloader, lr_scheduler=scheduler)
    optimizer = plugin_spec.after_boost(cfg, optimizer, scheduler, device)
    objective = pair_objective(cfg, task, model, model.unwrap(unwrap_peft=False) if lora_config else None) if task.pairs else None
    saved_activations = ActivationOffload(device, block_stack(model)) if cfg.train.activation_offload else contextlib.nullcontext()
    if cfg.train.activation_offload:
        log("activations saved for backward wait in host memory (train.activation_offload)")
    run = Run(
        cfg=cfg, plugin=plugin_spec, method=method, task=task, plan=parallel_plan(cfg, world_size), layout=layout, booster=booster, model=model,
        optimizer=optimizer, scheduler=scheduler, device=device, padding=padding, lora_config=lora_config, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, parameter_counts=parameter_counts, faults=faults, preemption=preemption, objective=objective,
        saved_activations=saved_activations,
    )
    if pending:
        with checkpoint.failing_together():  # a weight missing from one rank's stage stops every rank with its line
            plugin_spec.load_deferred(run, pending)
    return run, dataloader
