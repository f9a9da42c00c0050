"""The layout records: what a plugin derives from the config (Plan), where a built plugin puts this rank
(Layout), and where one rank's memory goes (Placement, for finetune.estimate). No torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.config import Config


@dataclass(frozen=True)
class Plan:
    """Layout numbers derived once from the config: tensor x pipeline x data (x sequence) parallel, micro-batches per step."""

    tp: int = 1
    pp: int = 1
    dp: int = 1  # distinct batches per step (sequence-parallel ranks share theirs)
    sp: int = 1  # sequence-parallel degree (finetune.core.plugins.hybrid.sequence_parallel)
    num_microbatches: int = 1  # pipeline only: micro-batches per step
    chunks: int = 1  # pipeline only: model chunks per stage (interleaved schedule)

    @property
    def pipeline(self) -> bool:
        return self.pp > 1


@dataclass(frozen=True)
class Layout:
    """Where this rank sits in the built plugin's layout."""

    dp_rank: int
    dp_size: int
    pipeline: bool  # steps go through booster.execute_pipeline
    counts: bool  # this rank's loss and tokens enter the data-parallel sums (tp rank 0 on the last stage)
    replicated: bool  # every rank holds the whole model: eval and saves may use the unwrapped module
    sequence_multiple: int = 1  # every batch's length is a multiple of this (sequence parallelism splits it evenly)


@dataclass(frozen=True)
class Placement:
    """One rank's layout under a plugin: parallel sizes, bytes per element, sharding divisors, offload."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    microbatches: int = 1
    chunks: int = 1  # model chunks per pipeline rank (interleaved schedule)
    interleaved: bool = False
    sp: int = 1  # sequence-parallel degree: each rank holds 1/sp of every sequence between the attention exchanges
    sp_over_tp: bool = False  # the sequence is split over the tensor-parallel ranks (split_gather, ring): sp == tp
    # shardformer's column-parallel linears (ColossalAI's linear_with_async_comm, matmul_with_async_comm) keep their
    # input for backward whether or not their weight trains (a frozen nn.Linear's autograd keeps none)
    column_inputs_saved: bool = False
    weight_bytes: float = 4  # stored bytes per weight element
    frozen_bytes: float = 0  # stored bytes per frozen weight element where it differs (a half-precision LoRA base); 0: weight_bytes
    compute_bytes: int = 4  # dtype of matmul inputs/outputs in activations
    residual_bytes: int = 4  # dtype of the residual stream and norm inputs
    eval_half: bool = False  # eval runs in half precision too (DDP's autocast covers training only)
    autocast_copies: bool = False  # DDP + bf16/fp16 autocast: half copies of matmul weights live through fwd/bwd
    grad_bytes: float = 4
    grad_copies: int = 1  # DDP: param.grad plus its all-reduce bucket
    master_bytes: float = 0  # fp32 master copy per trainable element
    state_bytes: float = 4  # optimizer state element
    step_grad_bytes: float = 0  # fp32 gradient copy made for the optimizer step, per trainable element
    param_shards: float = 1.0
    grad_shards: int = 1
    optim_shards: int = 1
    optim_offload: float = 0.0  # fraction of optimizer states, master and step gradients in host memory
    param_offload: float = 0.0  # fraction of the sharded weights in host memory
    gathered: str = ""  # FSDP working copy during compute: "model" (one unit) or "layers" (a unit per block)
    reduce_bucket: int = 0  # elements of ZeRO's flat gradient-reduce bucket


def half_precision(cfg: Config) -> bool:
    """Whether the run trains in bf16 or fp16."""
    return cfg.train.precision in ("bf16", "fp16")


def cast_placement(cfg: Config, **layout) -> Placement:
    """A plugin that casts the model to the run's dtype: weights, gradients and activations in it."""
    element = 2 if half_precision(cfg) else 4
    return Placement(weight_bytes=element, compute_bytes=element, residual_bytes=element, eval_half=half_precision(cfg), grad_bytes=element, **layout)
