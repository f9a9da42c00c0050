"""The memory model: per-rank bytes of weights, gradients, optimizer states and activations, from the model's
shape and the plugin's Placement record (the formulas are summed up in finetune/estimate/cli.py's help)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from finetune.architectures import architecture
from finetune.config import Config
from finetune.core.layout import Placement, half_precision
from finetune.core.loss_chunks import LOG_SOFTMAX_ROWS, loss_chunk_tokens
from finetune.core.plugins import SPECS
from finetune.estimate.shape import ModelShape, cached_model_shape
from finetune.methods import method_named
from finetune.tasks import TASKS

GIB = 1024**3
MIB = 1024**2

# RSS of one finetune/train.py rank apart from the model's own tensors, in two parts.
# At the `start` stage: the Python, torch, transformers, peft, ColossalAI and datasets imports. Most of
# it is file-backed pages of the mapped libraries, and how many of those are resident depends on the
# machine's page cache (530 to 700 MiB measured on the same machine), so a finished run's own
# prediction takes its measured `start` stage instead of this typical figure.
CPU_START_BYTES = 700 * MIB
# After `start` (which follows the process group): the tokenizer, the tokenized data, and what the first training
# step leaves behind (autograd threads, oneDNN kernels, malloc arenas). Measured on the pinned stack (Linux x86-64,
# glibc, train.cpu_allocator=exact) as a run's train-step peak minus its start stage and its predicted tensors:
# 35 and 46 MiB for 1-rank tiny-gpt2 LoRA (a fresh interpreter, the tests' zygote), 52 MiB for GPT-2 124M LoRA
# (its 12 MiB of causal-mask buffers, which the estimator does not count, left out). 250 MiB was measured before
# train.cpu_allocator (3878dac) mapped the build's memory on its own and trimmed the heap at stage boundaries; that
# figure over-predicted every CPU run by ~200 MiB since. `python bench/run.py` measures it again.
CPU_AFTER_START_BYTES = 50 * MIB
CPU_PROCESS_BYTES = CPU_START_BYTES + CPU_AFTER_START_BYTES
# CUDA context and cuBLAS workspace of a torch 2.5 process: a typical figure, NOT measured here (this
# project has no GPU). torch.cuda.memory_allocated, which the run's profiler reports, does not see it.
CUDA_CONTEXT_BYTES = 512 * MIB


@dataclass(frozen=True)
class Quantization:
    """QLoRA's frozen-base layout (bitsandbytes): 4-bit NF4/FP4 blocks or 8-bit rows."""

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bf16"

    def bytes_per_weight(self) -> float:
        """Bytes per quantized weight element, block constants included (8-bit row scales are extra)."""
        if self.bits == 8:
            return 1.0
        # Two weights per byte and one absmax per block of 64: fp32, or with double quantization an
        # 8-bit code plus one fp32 absmax per 256 blocks. NF4 and FP4 share the layout.
        absmax = 1 / 64 + 4 / (64 * 256) if self.double_quant else 4 / 64
        return self.packed_bytes() + absmax

    def packed_bytes(self) -> float:
        """Bytes per quantized weight element of the packed data alone (what FSDP shards; the block constants are whole on every rank)."""
        return 1.0 if self.bits == 8 else 0.5


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def quantization_of(cfg: Config) -> Quantization:
    """QLoRA's layout from the run config's quantization section (compute dtype `auto`: train.precision)."""
    quant = cfg.quantization
    compute = cfg.train.precision if quant.compute_dtype == "auto" else quant.compute_dtype
    return Quantization(bits=quant.bits, quant_type=quant.quant_type, double_quant=quant.double_quant, compute_dtype=compute)



# ---------------------------------------------------------------------------------------------------
# What a plugin does with the model state


def placement(cfg: Config, world_size: int) -> Placement:
    """The per-rank layout of cfg's plugin on world_size processes (the plugin object says)."""
    place = SPECS[cfg.plugin.name].placement(cfg, world_size)
    if method_named(cfg.method).adapter and half_precision(cfg):
        # The frozen base is held in the compute dtype: the residual stream and eval run in it too, and
        # autocast has no weight copies to cache. (Gemini, which has its own rules, holds no adapters.)
        place = dataclasses.replace(place, frozen_bytes=2, residual_bytes=2, eval_half=True, autocast_copies=False)
    return place


# ---------------------------------------------------------------------------------------------------
# Activations


def layer_activation_bytes(shape: ModelShape, place: Placement, seq: int, device: str, attention: str) -> float:
    """Bytes one transformer layer keeps for backward, per token.

    Counted from what transformers' GPT-2 / Llama / RoBERTa layers save for backward (checked tensor by
    tensor with saved-tensor hooks in tests/unit/test_estimate.py), in the spirit of Korthikanti et al.
    (2022), whose GPT layer saves s*b*h*(34 + 5*a*s/h) bytes in half precision with dropout. With
    h hidden, f ffn, a heads, s sequence, t tensor-parallel size, c/r the compute/residual dtype bytes:
      norms       LayerNorm: input r*h + mean/rstd; Llama RMSNorm: fp32 input 4h + rsqrt, and the
                  normalized r*h where its weight trains (Gemma: 4h); times the layer's norms (2; Gemma: 4)
      inputs      each projection's input where its weight trains or LoRA reads it undropped: q/k/v c*h,
                  output projection c*q/t, MLP in c*h, MLP out c*f/t, an MoE router c*h; under tensor
                  parallelism the column-parallel ones (q/k/v, MLP in) always (Placement.column_inputs_saved)
      attention   q/k/v 3c*q/t (q = heads x head_dim, h for most) and the core:
                  sdpa (memory-efficient/flash) c*q/t output + 4a/t logsumexp, or the s x s scores
                  a*s/t x (softmax + a half copy for the matmul where softmax ran in fp32 + dropout mask
                  and output, + the soft-capped scores' tanh for Gemma-2) for eager attention, and for sdpa
                  with dropout on CPU (its math fallback)
      MLP         k*f/t ffn-sized tensors of the activation (k: 4 for GPT-2's gelu_new, 3 for Llama's
                  gated SiLU, 1 for GELU); MoE (Mixtral): each token's e experts (e of E) save that, their
                  inputs and outputs (e x (2c*h + c*h in + c*f out), experts are not split by TP), the
                  router its fp32 softmax 4E
      GQA         k and v are repeated to every query head before attention (transformers' eager and
                  sdpa paths), so they count at the query's width q = heads x head_dim (Gemma-2: > h)
      q/k norms   Qwen3, Gemma-3: fp32 input 4(q + kv), a rsqrt per head, the normalized where trained
      dropout     two residual masks of h (bool on CUDA; on CPU the mask has the input's dtype)
      LoRA        per adapted projection, lora_B's input c*r, and with lora.dropout its dropped input
                  c*h_in and the mask (without dropout lora_A reads the input the projection saved)
    """
    h, f, a, t = shape.hidden, shape.ffn, shape.heads, place.tp
    q, kv, k = shape.attn_width or h, shape.kv_width or h, shape.experts_per_token
    c, r = place.compute_bytes, place.residual_bytes
    norm = norm_bytes(shape, r)
    mask = 1 if device == "cuda" else c
    # An MoE layer gathers each expert's tokens: its experts read k copies of the input and k ffn-sized
    # tensors, whole on every tensor-parallel rank (ColossalAI's Mixtral policy splits attention and router only).
    tf = 1 if shape.experts else t
    sizes = {"qkv": h, "o": q / t, "up": k * h, "down": k * f / tf, "router": h}
    saved = shape.saved_inputs | (COLUMN_PARALLEL_ROLES - ({"up"} if shape.experts else set()) if place.column_inputs_saved else frozenset())
    inputs = c * sum(sizes[role] for role in saved)
    core = c * 3 * q / t  # q, and k and v repeated to every query head (transformers' eager and sdpa paths)
    if shape.head_norms:  # q/k norms per head: fp32 input, rsqrt per head, the normalized input where trained
        core += (4 * (q + kv) + 4 * (a + shape.kv_heads) + ((4 if shape.upcast_norm else r) * (q + kv) if shape.norms_trainable else 0)) / t
    if attention == "eager" or (device == "cpu" and shape.attn_dropout > 0):
        softmax = 4 if (r == 4 or shape.upcast_softmax) else c
        per_score = softmax + (c if softmax != c else 0) + ((mask + softmax) if shape.attn_dropout > 0 else 0) + (c if shape.attention_softcap else 0)
        core += a * seq / t * per_score
    else:
        core += c * q / t + 4 * a / t
    mlp = k * shape.mlp_saved * c * f / tf
    if shape.experts:  # per routed token, the expert's output (kept for the routing-weight product) and a gathered copy; the router's fp32 softmax and int64 picks
        mlp += k * 2 * c * h + 4 * shape.experts + 16 * k
    dropout = 2 * h * mask if shape.hidden_dropout > 0 else 0
    lora = c * shape.lora_ranks + (shape.lora_inputs * (mask + c) if shape.lora_dropout > 0 else 0)
    return shape.layer_norms * norm + inputs + core + mlp + dropout + lora


# Projection roles whose tensor-parallel layer is column-parallel (shardformer's Linear1D_Col and GPT-2's fused Conv1D).
COLUMN_PARALLEL_ROLES = frozenset({"qkv", "up"})


def norm_bytes(shape: ModelShape, residual: int) -> float:
    """Per token, what one norm keeps: LayerNorm its input and mean/rstd; HF's RMSNorm its fp32 input,
    the rsqrt, and the normalized input where its weight trains (in fp32 for Gemma's)."""
    h = shape.hidden
    if shape.rms_norm:
        return 4 * h + 4 + ((4 if shape.upcast_norm else residual) * h if shape.norms_trainable else 0)
    return residual * h + 2 * residual


def outside_activation_bytes(shape: ModelShape, place: Placement, device: str, first: bool, last: bool) -> float:
    """Bytes per token saved outside the layers: ids, embedding dropout, final norm, the head's input (if it trains)."""
    h, c, r = shape.hidden, place.compute_bytes, place.residual_bytes
    saved = 24.0  # input ids, labels, attention mask (int64)
    if first and shape.hidden_dropout > 0:
        saved += h * (1 if device == "cuda" else r)
    if last and shape.causal_lm:
        saved += norm_bytes(shape, r) + (c * h if shape.head_trainable or shape.tied and shape.embedding_trainable else 0)
    return saved


# Per label token under the chunked loss (train.loss_chunks), beside the hidden states it gathers: its fp32
# log-probability and its row, position and target (int64).
CHUNKED_LOSS_TOKEN_BYTES = 4 + 3 * 8


def _in_place_chunks(shape: ModelShape, place: Placement) -> bool:
    """Whether the chunked loss takes each chunk's log-softmax in one fp32 buffer (finetune.chunked_loss's
    _log_softmax_in_place): without a soft-cap and a vocabulary split over tensor-parallel ranks."""
    return not shape.logit_softcap and place.tp == 1


def _in_place_chunk_bytes(chunk: int, vocab: int, half: bool) -> float:
    """One chunk's logits in place: the fp32 buffer, the half logits beside it, and log_softmax's output for
    LOG_SOFTMAX_ROWS of its rows (finetune.chunked_loss._log_softmax_in_place)."""
    return chunk * (4 + (2 if half else 0)) * vocab + min(chunk, LOG_SOFTMAX_ROWS) * 4 * vocab


def loss_peak_bytes(shape: ModelShape, place: Placement, tokens: int, chunk_tokens: int = 0, label_tokens: int = 0) -> float:
    """The peak around the loss in backward for `tokens` tokens: fp32 log-softmax output, its gradient and the gradient
    of the logits, alive together (3 x 4 bytes x vocab per token; measured exactly on CPU), over every token at once.
    Under the chunked loss (chunk_tokens > 0) only the label tokens (label_tokens; 0: all) reach the head, one chunk at
    a time, beside the hidden states gathered at them and their gradient; a frozen head's chunk (LoRA, QLoRA) is taken
    in one fp32 buffer of the vocabulary per token (where _in_place_chunks), one that trains is recomputed by autograd."""
    per_token = (12 + (place.compute_bytes if shape.logit_softcap else 0)) * shape.vocab / place.tp  # + Gemma-2's tanh of the capped logits
    if not chunk_tokens:
        return tokens * per_token
    head = label_tokens or tokens
    chunk = min(head, chunk_tokens)
    head_trains = shape.head_trainable or shape.tied and shape.embedding_trainable
    logits = _in_place_chunk_bytes(chunk, shape.vocab, place.compute_bytes < 4) if _in_place_chunks(shape, place) and not head_trains else chunk * per_token
    return logits + head * (2 * place.residual_bytes * shape.hidden + CHUNKED_LOSS_TOKEN_BYTES)


def eval_peak_bytes(shape: ModelShape, place: Placement, tokens: int, chunk_tokens: int = 0, label_tokens: int = 0) -> float:
    """An eval forward's peak over `tokens` tokens: a layer's MLP intermediate, and the logits with their fp32 log-softmax
    (plus an fp32 copy of half logits) of every token; under the chunked loss of one chunk of the label tokens (as above),
    in one fp32 buffer where _in_place_chunks."""
    logits = (10 if place.eval_half else 8) * shape.vocab / place.tp
    mlp = tokens * 2 * place.compute_bytes * shape.ffn / place.tp
    if not chunk_tokens:
        return tokens * logits + mlp
    head = label_tokens or tokens
    chunk = min(head, chunk_tokens)
    chunk_bytes = _in_place_chunk_bytes(chunk, shape.vocab, place.eval_half) if _in_place_chunks(shape, place) else chunk * logits
    return chunk_bytes + mlp + head * (place.residual_bytes * shape.hidden + CHUNKED_LOSS_TOKEN_BYTES)


def vocab_parallel_loss_bytes(shape: ModelShape, place: Placement, tokens: int) -> float:
    """The peak around shardformer's own head and loss over the full logits under tensor parallelism (ColossalAI's
    dist_cross_entropy) for `tokens` tokens, at the end of its forward: the logits, their shifted contiguous copy, the
    max-subtracted copy it exponentiates in place, and the normalized probabilities it saves, computed in fp32 (and cast
    back to the compute dtype where that is half): 3c + 4 (+ c) bytes x vocab / tp per token; its backward needs less
    (the saved probabilities turned into the gradient in place and the slice's gradient, 2c). Plus the head's input,
    which its column-parallel linear keeps even when frozen (c x hidden per token)."""
    c = place.compute_bytes
    return tokens * ((3 * c + 4 + (c if c != 4 else 0)) * shape.vocab / place.tp + c * shape.hidden)


def sequence_exchange_bytes(shape: ModelShape, place: Placement, tokens: int) -> float:
    """The transient buffers of one layer's sequence-parallel exchange (0 without sequence parallelism), for `tokens`
    tokens of whole sequences: all_to_all sends q, k and v as sp contiguous parts of the rank's 1/sp of the
    sequence and receives as many (2 x (q + 2 kv) / tp per local token); split_gather and ring gather the whole
    sequence at a column-parallel layer's input and reduce-scatter a whole-sequence output (2 x h per token)."""
    if place.sp == 1:
        return 0.0
    c = place.compute_bytes
    if place.sp_over_tp:
        return 2 * tokens * shape.hidden * c
    q, kv = shape.attn_width or shape.hidden, shape.kv_width or shape.hidden
    return 2 * tokens / place.sp * (q + 2 * kv) / place.tp * c


def in_flight(place: Placement, rank: int) -> int:
    """Micro-batches (interleaved: model-chunk micro-batches) whose activations a pipeline rank holds at once."""
    if place.pp == 1:
        return 1
    if place.interleaved:  # ColossalAI's interleaved warm-up: (pp - rank - 1) * 2 + (chunks - 1) * pp steps
        return min(place.microbatches * place.chunks, (place.pp - rank - 1) * 2 + (place.chunks - 1) * place.pp + 1)
    return min(place.microbatches, place.pp - rank)


def pipeline_layers(layers: int, pp: int, chunks: int) -> list[int]:
    """Layers per pipeline rank as ColossalAI distributes them (remainders go to the middle chunks)."""
    count = pp * chunks
    per_chunk = [layers // count] * count
    start = count // 2 - (layers % count) // 2
    for i in range(start, start + layers % count):
        per_chunk[i] += 1
    return [sum(per_chunk[rank::pp]) for rank in range(pp)]


# ---------------------------------------------------------------------------------------------------
# The estimate


@dataclass(frozen=True)
class Estimate:
    """Per-rank bytes of one setup, split by what holds them."""

    setup: dict[str, Any]
    params: int
    trainable_params: int
    weights: int
    gradients: int
    optimizer_states: int  # m, v (or momentum) and the fp32 master copy
    master_weights: int  # the fp32 master copy, part of optimizer_states
    activations: int  # peak of a training step without gradient checkpointing
    activations_checkpointed: int  # the same with per-layer gradient checkpointing
    eval_activations: int  # peak of an eval batch's forward
    step_temporaries: int
    framework_overhead: int
    host_offload: int  # in host memory because of CPU offload (a CUDA run's CPU side), per rank
    gradient_checkpointing: bool  # what the run itself uses
    # train.activation_offload on CUDA: the saved activations in host memory at the training step's peak (without and
    # with checkpointing); the activation fields above are then what stays on the device
    host_activations: int = 0
    host_activations_checkpointed: int = 0

    def total(self, checkpointing: bool | None = None) -> int:
        """Peak bytes per rank on the device; checkpointing None: as the run is configured."""
        ckpt = self.gradient_checkpointing if checkpointing is None else checkpointing
        activations = self.activations_checkpointed if ckpt else self.activations
        # Training step, eval batch and optimizer step come one after another: only the largest counts.
        return self.weights + self.gradients + self.optimizer_states + self.framework_overhead + max(activations, self.eval_activations, self.step_temporaries)

    def train_step_peak(self) -> int:
        """What the run's profiler measures as its train_step_peak stage: the peak of the training steps
        as configured (no eval), all of it on CPU (RSS), without the CUDA context on CUDA (allocations)."""
        ckpt = self.activations_checkpointed if self.gradient_checkpointing else self.activations
        persistent = self.weights + self.gradients + self.optimizer_states + self.framework_overhead
        context = CUDA_CONTEXT_BYTES if self.setup["device"] == "cuda" else 0
        return persistent + max(ckpt, self.step_temporaries) - context

    def to_dict(self) -> dict[str, Any]:
        """JSON form: bytes per rank, totals with and without checkpointing, and the setup."""
        return {
            **dataclasses.asdict(self),
            "total": self.total(),
            "total_without_checkpointing": self.total(False),
            "total_with_checkpointing": self.total(True),
        }


CLASSIFIER_OUTPUTS = 2  # transformers' default num_labels: the data names a classifier's labels, whose logits are negligible


def head_outputs(cfg: Config) -> int:
    """The sequence-classification head the task builds on the model: task=reward's one score, a classifier's labels;
    0 for a task that trains the model's own head (a causal LM's vocabulary)."""
    task = TASKS[cfg.task]
    return 1 if task.scalar_head else CLASSIFIER_OUTPUTS if task.classification else 0


def estimate(cfg: Config, world_size: int = 1, seq_len: int = 0, device: str = "cuda", quantization: Quantization | None = None, label_len: int = 0) -> Estimate:
    """Predict the peak memory per rank of the run cfg describes (the rank that needs the most)."""
    shape = cached_model_shape(cfg.model.name, cfg.model.trust_remote_code, cfg.method, json.dumps(dataclasses.asdict(cfg.lora), sort_keys=True), head_outputs(cfg))
    place = placement(cfg, world_size)
    if device == "cpu":  # host memory is the device: offloading moves nothing
        place = dataclasses.replace(place, optim_offload=0.0, param_offload=0.0)
    quant = (quantization or Quantization()) if method_named(cfg.method).quantized_base else None
    per_rank_layers = pipeline_layers(shape.layers, place.pp, place.chunks if place.interleaved else 1)
    seq = seq_len or cfg.data.max_length
    setup = {
        "model": cfg.model.name,
        "model_class": shape.model_class,
        "method": cfg.method,
        "plugin": cfg.plugin.name,
        "plugin_options": cfg.plugin.options,
        "world_size": world_size,
        "dp": place.dp,
        "tp": place.tp,
        "sp": place.sp,
        "pp": place.pp,
        "precision": cfg.train.precision,
        "optimizer": cfg.train.optimizer,
        "batch_size": cfg.train.batch_size,
        "eval_batch_size": cfg.eval.batch_size,
        "seq_len": seq,
        "loss_chunks": loss_chunk_tokens(cfg),  # tokens per chunk of the causal-LM loss; 0: over the full logits
        "activation_offload": cfg.train.activation_offload,
        "label_len": min(label_len, seq),  # label tokens per sequence, which alone reach the head under the chunked loss; 0: every token
        "device": device,
        "quantization": dataclasses.asdict(quant) if quant else None,
    }
    ranks = [_rank_estimate(shape, place, cfg, setup, rank, layers, quant) for rank, layers in enumerate(per_rank_layers)]
    return max(ranks, key=lambda e: e.total())



@dataclass(frozen=True)
class Share:
    """What one rank holds of the model, in elements, after the pipeline and tensor-parallel split."""

    params: float
    trainable: float
    matmul: float  # projection weights (autocast keeps half copies of these)
    layers: int
    first: bool  # the first pipeline stage: embeddings
    last: bool  # the last pipeline stage: head and loss


def rank_share(shape: ModelShape, place: Placement, full: bool, rank: int, layers: int) -> Share:
    """Pipeline rank `rank` holds its layers, the embeddings if first, the head if last (a tied embedding
    matrix sits on both); tensor parallelism splits the layers' projections and the vocabulary."""
    first, last = rank == 0, rank == place.pp - 1
    shared_copy = last and not first and shape.tied
    params = layers * shape.layer_params + first * shape.embedding_params + last * shape.head_params + shared_copy * shape.token_embedding
    trainable = layers * shape.layer_trainable + first * shape.embedding_trainable + last * shape.head_trainable
    trainable += shape.token_embedding if shared_copy and shape.embedding_trainable else 0
    split = layers * (shape.layer_matmul - shape.layer_experts) + first * shape.token_embedding + (last and not (first and shape.tied)) * shape.output_projection
    saving = split * (1 - 1 / place.tp)
    matmul = (layers * (shape.layer_matmul - shape.layer_experts) + last * shape.output_projection) / place.tp + layers * shape.layer_experts
    return Share(params - saving, trainable - (saving if full else 0), matmul, layers, first, last)


@dataclass(frozen=True)
class StateBytes:
    """Model state of one rank: on the device, and in host memory under CPU offload."""

    weights: float
    gradients: float
    optimizer: float  # m, v / momentum and master
    master: float
    step_temporaries: float
    reduce_buffers: float
    host: float


def state_bytes(shape: ModelShape, place: Placement, share: Share, optimizer: str, quant: Quantization | None) -> StateBytes:
    """Weights, gradients, optimizer states and the optimizer step's temporaries of one rank."""
    quantized = _quantized_elements(shape, place, share) if quant else 0.0
    constants = quantized * (quant.bytes_per_weight() - quant.packed_bytes()) if quant else 0.0  # a 4-bit weight's absmax and code book: not sharded
    stored = (_weight_bytes(shape, place, share, quant) - constants) / place.param_shards + constants
    gathered = _gathered_elements(shape, place, share) * place.compute_bytes
    if quant and gathered:  # FSDP gathers a unit's 4-bit weights as they are stored (packed), not as compute-dtype copies
        gathered -= _gathered_quantized(shape, place, share, quantized) * (place.compute_bytes - quant.packed_bytes())
    weights = stored * (1 - place.param_offload) + gathered
    grads = share.trainable * place.grad_bytes * place.grad_copies / place.grad_shards
    unsharded_grads = _gathered_trainable(shape, place, share) * place.compute_bytes  # FSDP, before reduce-scatter
    shard = share.trainable / place.optim_shards
    master = shard * place.master_bytes
    states = shard * (2 if optimizer == "adamw" else 1) * place.state_bytes + master
    step = shard * place.step_grad_bytes
    if optimizer == "adamw":
        # AdamW works tensor by tensor: the fused kernel on CUDA (train.py builds it with fused=True),
        # the per-tensor loop on CPU, each with two temporaries of its largest tensor at most (ZeRO
        # splits every tensor over the ranks; FSDP's one unit is one flat tensor).
        largest = shard if place.gathered == "model" else min(shape.largest_trainable / place.optim_shards / place.tp, shard)
        step += 2 * largest * place.state_bytes
    # ZeRO flattens gradients into a reduce bucket (a tensor larger than the bucket goes alone) and
    # receives the reduced copy: two buffers of the larger of the two.
    buffers = 2 * max(place.reduce_bucket, shape.largest_trainable) * place.grad_bytes if place.reduce_bucket else 0
    kept, offloaded = 1 - place.optim_offload, place.optim_offload
    return StateBytes(
        weights=weights,
        gradients=grads * (1 - place.param_offload) + unsharded_grads,
        optimizer=states * kept,
        master=master * kept,
        step_temporaries=step * kept,
        reduce_buffers=buffers,
        host=(states + step) * offloaded + (stored + grads) * place.param_offload,
    )


def activation_peaks(shape: ModelShape, place: Placement, share: Share, cfg: Config, seq: int, device: str, rank: int, label_len: int = 0) -> tuple[float, float, float, OffloadedActivations | None]:
    """(training step, training step with checkpointing, eval batch) activation peaks of one rank, and under
    train.activation_offload on CUDA where they are (the training peaks are then offloaded_activations' device side).

    The training peak is at the loss in backward, with the activations of every micro-batch in flight
    on this rank still saved; checkpointing keeps only each layer's input and recomputes one layer.
    Under the chunked loss only the label tokens (label_len per sequence; 0: all seq) reach the head.
    """
    task = TASKS[cfg.task]
    rows = cfg.train.batch_size * task.sequences_per_sample  # preference pairs: a chosen and a rejected row per sample
    tokens = rows // place.microbatches * seq
    built = architecture(shape.model_type).attention(cfg.model.attn_implementation, SPECS[cfg.plugin.name].shardformer)  # as model.attention_for builds it
    attention = "eager" if built == "eager" else "sdpa"
    # Sequence parallelism: a rank keeps the activations of its 1/sp of each sequence. all_to_all's attention runs
    # on whole sequences with 1/sp of the heads, the same bytes per local token; split_gather/ring split what tensor
    # parallelism leaves whole, so a layer keeps its unsplit (tp=1) bytes for 1/tp of the tokens (Korthikanti et al., 2022).
    layer = layer_activation_bytes(shape, dataclasses.replace(place, tp=1) if place.sp_over_tp else place, seq, device, attention)
    local = tokens / place.sp
    outside = outside_activation_bytes(shape, place, device, share.first, share.last)
    layers_held = in_flight(place, rank) * share.layers / (place.chunks if place.interleaved else 1)
    chunk_tokens = loss_chunk_tokens(cfg)
    # all_to_all takes the loss on each rank's part of the sequence; split_gather/ring gather it before the head.
    head = tokens if place.sp_over_tp else local
    if not share.last:
        loss = 0.0
    elif place.tp > 1 and not chunk_tokens:  # the full logits under tensor parallelism: shardformer's own loss over the vocabulary split
        loss = vocab_parallel_loss_bytes(shape, place, head)
    else:
        loss = loss_peak_bytes(shape, place, head, chunk_tokens, head // seq * label_len)
    autocast = 2 * share.matmul if place.autocast_copies else 0
    exchange = sequence_exchange_bytes(shape, place, tokens)
    train = local * (layers_held * layer + outside) + loss + autocast + exchange
    checkpointed = local * (layers_held * place.residual_bytes * shape.hidden + outside) + max(loss, local * layer) + autocast + exchange
    eval_tokens = (cfg.train.batch_size if place.pp > 1 else cfg.eval.batch_size) * task.sequences_per_sample * seq  # pipelines evaluate at the train batch
    if task.pairs and task.objective(cfg.preference).reference:  # the reference pass: the step's batch forward without gradients, before the policy's
        eval_tokens = max(eval_tokens, rows * seq)
    eval_head = eval_tokens if place.sp_over_tp else eval_tokens / place.sp
    evaluation = eval_peak_bytes(shape, place, eval_head, chunk_tokens, eval_head // seq * label_len) if share.last else eval_tokens / place.sp * outside
    if not (cfg.train.activation_offload and device == "cuda"):  # on CPU the host is the device: the copies replace the originals
        return train, checkpointed, evaluation, None
    # (a rank's own tokens under sequence parallelism; its exchange buffers stay on the device)
    offloaded = offloaded_activations(local, layers_held, layer, place.residual_bytes * shape.hidden, outside, loss, autocast + exchange)
    return offloaded.device, offloaded.device_checkpointed, evaluation, offloaded


@dataclass(frozen=True)
class OffloadedActivations:
    """A training step's activation peak under train.activation_offload: on the device and in host memory, without and
    with checkpointing."""

    device: float
    device_checkpointed: float
    host: float
    host_checkpointed: float


def offloaded_activations(tokens: int, layers_held: float, layer: float, layer_input: float, outside: float, loss: float, resident: float) -> OffloadedActivations:
    """Per rank, with `tokens` tokens a micro-batch: what every layer saves (layer per token; under checkpointing its input,
    layer_input per token) waits in host memory from forward until its backward. What is saved outside the layers
    (outside per token), the loss and `resident` (autocast's weight copies) stay on the device (finetune.activation_offload
    offloads only up to the last block), and in backward one layer's tensors are back at a time (under checkpointing
    its input, and the layer recomputed from it), after the loss is done with."""
    return OffloadedActivations(
        device=tokens * outside + max(loss, tokens * layer) + resident,
        device_checkpointed=tokens * outside + max(loss, tokens * (layer_input + layer)) + resident,
        host=tokens * layers_held * layer,
        host_checkpointed=tokens * layers_held * layer_input,
    )


def _rank_estimate(shape: ModelShape, place: Placement, cfg: Config, setup: dict, rank: int, layers: int, quant: Quantization | None) -> Estimate:
    """The estimate for pipeline rank `rank` (0 without a pipeline), which holds `layers` layers."""
    device = setup["device"]
    if quant:  # QLoRA: fp32 adapters train on a frozen, quantized base that computes in the compute dtype
        compute = DTYPE_BYTES[quant.compute_dtype]
        place = dataclasses.replace(
            place, weight_bytes=compute, compute_bytes=compute, residual_bytes=compute, eval_half=compute == 2, autocast_copies=False,
            grad_bytes=4, master_bytes=0, state_bytes=4, step_grad_bytes=0,
            column_inputs_saved=False,  # finetune.qlora_tp's 4-bit shards compute with bitsandbytes' matmul, which keeps no input of a frozen weight
        )
    share = rank_share(shape, place, method_named(cfg.method).full, rank, layers)
    state = state_bytes(shape, place, share, cfg.train.optimizer, quant)
    train, checkpointed, evaluation, offloaded = activation_peaks(shape, place, share, cfg, setup["seq_len"], device, rank, setup["label_len"])
    process = CPU_PROCESS_BYTES if device == "cpu" else CUDA_CONTEXT_BYTES
    return Estimate(
        setup=setup,
        params=shape.total_params,
        trainable_params=shape.trainable_params,
        weights=round(state.weights),
        gradients=round(state.gradients),
        optimizer_states=round(state.optimizer),
        master_weights=round(state.master),
        activations=round(train),
        activations_checkpointed=round(checkpointed),
        eval_activations=round(evaluation),
        step_temporaries=round(state.step_temporaries),
        framework_overhead=round(process + state.reduce_buffers),
        host_offload=round(state.host),
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        host_activations=round(offloaded.host) if offloaded else 0,
        host_activations_checkpointed=round(offloaded.host_checkpointed) if offloaded else 0,
    )


def _weight_bytes(shape: ModelShape, place: Placement, share: Share, quant: Quantization | None) -> float:
    """Stored bytes of this rank's weights (before parameter sharding)."""
    if not quant:
        return (share.params - share.trainable) * (place.frozen_bytes or place.weight_bytes) + share.trainable * place.weight_bytes
    quantized = _quantized_elements(shape, place, share)
    scales = 4 * share.layers * shape.layer_rows / place.tp if quant.bits == 8 else 0  # LLM.int8: an fp32 scale per output row
    frozen_rest = share.params - quantized - share.trainable
    return quantized * quant.bytes_per_weight() + scales + frozen_rest * place.compute_bytes + share.trainable * 4


def _quantized_elements(shape: ModelShape, place: Placement, share: Share) -> float:
    """Weight elements of this rank that QLoRA quantizes: every layer's projections and a classifier's inner ones."""
    return (share.layers * shape.layer_matmul + share.last * shape.head_quantizable) / place.tp


def _gathered_quantized(shape: ModelShape, place: Placement, share: Share, quantized: float) -> float:
    """Of _gathered_elements, the quantized ones: all of them in one unit, else the current and the prefetched layer's."""
    if place.gathered == "model":
        return quantized
    return (min(2, share.layers) * shape.layer_matmul + share.last * shape.head_quantizable) / place.tp


def _gathered_elements(shape: ModelShape, place: Placement, share: Share) -> float:
    """Elements of the unsharded working copy an FSDP/Gemini rank holds while computing."""
    if place.param_shards == 1 and place.compute_bytes == place.weight_bytes:
        return 0.0  # nothing to gather and no low-precision copy to make
    if place.gathered == "model":
        return share.params
    if place.gathered == "layers":  # the root unit (embeddings, head) plus the current and the prefetched layer
        return share.params - (share.layers - min(2, share.layers)) * shape.layer_params
    return 0.0


def _gathered_trainable(shape: ModelShape, place: Placement, share: Share) -> float:
    """Trainable elements whose unsharded gradients exist before FSDP's reduce-scatter."""
    if place.param_shards == 1 or place.grad_bytes == 0:
        return 0.0
    if place.gathered == "model":
        return share.trainable
    if place.gathered == "layers":
        return share.trainable - (share.layers - min(2, share.layers)) * shape.layer_trainable
    return 0.0



def compare_with_run(cfg: Config, world_size: int, seq_len: int, memory: dict[str, Any], label_len: int = 0) -> dict[str, Any]:
    """summary.json's memory.estimate: the prediction for a finished run next to its measured train_step_peak.

    Args:
        memory: the run's measured memory (MemoryProfiler.summary(): device and stages).
        label_len: the most label tokens of one sequence in the run's data (estimate's label_len).
    """
    try:
        est = estimate(cfg, world_size, seq_len, memory["device"], quantization_of(cfg), label_len)
    except Exception as err:  # a finished run must still write its summary; the failure is recorded instead
        return {"error": f"{type(err).__name__}: {err}"}
    stages = {s["name"]: s for s in memory["stages"]}
    if memory["device"] == "cpu" and "start" in stages:  # this process's own import baseline, not the typical one
        est = dataclasses.replace(est, framework_overhead=est.framework_overhead - CPU_START_BYTES + stages["start"]["current_bytes"])
    measured = stages["train_step_peak"]["peak_bytes"] if "train_step_peak" in stages else None
    predicted = est.train_step_peak()
    return {
        "predicted_train_step_peak_bytes": predicted,
        "measured_train_step_peak_bytes": measured,
        "ratio_measured_to_predicted": measured / predicted if measured else None,
        "per_rank": est.to_dict(),
    }



def gib(n: float) -> str:
    """n bytes in GiB as the tables and the fit lines show them: '1,234.56'."""
    return f"{n / GIB:,.2f}"
