"""The Run: what the training loop and the checkpointer need, built once in train.main()."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from finetune.core.layout import Layout, Plan
from finetune.parallel.base import Plugin
from finetune.config import Config
from finetune.faults import Faults
from finetune.methods import Method
from finetune.preemption import Preemption
from finetune.tasks import Task


@dataclass
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
    pad_to: int  # pipeline only: every batch is padded to this many tokens
    lora_config: Any  # peft LoraConfig when adapters train, else None
    steps_per_epoch: int
    faults: Faults
    preemption: Preemption  # SIGTERM / SIGUSR1: stop after the current step with a checkpoint
