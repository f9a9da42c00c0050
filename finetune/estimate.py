"""Will it fit? Per-rank memory of a fine-tuning run, predicted before any hardware is rented.

    python -m finetune.estimate model=llama2-7b method=lora plugin=zero2 world_size=8 batch_size=4 seq_len=1024 precision=bf16
    python -m finetune.estimate --config booster_configs/fsdp.yaml --config my_run.yaml world_size=16 --json

The estimate is asked for with exactly the run config a user would launch (`--config` files and
`key=value` overrides of finetune.config), plus what only the launch knows:

    world_size=N      processes (default 1)
    seq_len=N         tokens per sample (default data.max_length, the longest a batch can be)
    device=cuda|cpu   where the run lives (default cuda)
    quantization.bits=4|8, quantization.quant_type=nf4|fp4, quantization.double_quant=true|false,
    quantization.compute_dtype=bf16|fp16|fp32   QLoRA's base-weight layout (method=qlora)

and short forms of common keys: model=, plugin= (a booster_configs/ setup such as zero2, or a plugin
name), batch_size=, precision=, optimizer=. With `--fit GiB`, it prints instead whether the run fits
in that many GiB per rank and, when it does not, the cheapest changes that do, ranked (see
`fitting_alternatives`). Parameters are counted on a meta-device model (nothing is
allocated); LoRA adapters are injected into it with the run's own targets.

Per rank, in bytes (P = parameters and Pt = trainable ones, of this rank's tensor/pipeline share):
  weights       P x bytes of the stored dtype (fp32 4; plugins that cast to bf16/fp16 2; LoRA with
                bf16/fp16: the frozen base 2 under every plugin but Gemini, adapters as the plugin keeps
                them; QLoRA 4-bit 0.5 + block absmax on the quantized Linear layers, the rest in the
                compute dtype), divided by the plugin's parameter sharding (FSDP, Gemini), plus the
                unsharded working copy FSDP gathers for compute (the whole model as one unit with
                plugin.auto_wrap=none; with `block`, the default, the root unit and two blocks)
  gradients     Pt x gradient bytes, divided by gradient sharding (ZeRO-2, FSDP, Gemini); DDP holds
                each gradient twice (param.grad and its all-reduce bucket) unless gradient_as_bucket_view
  optimizer     AdamW m + v (2 states), SGD momentum (1 state; train.py builds SGD with momentum 0.9),
                plus the fp32 master copy of half-precision plugins, divided by optimizer sharding
                (ZeRO-1/2, FSDP, Gemini); CPU offload moves them to host memory (reported apart)
  activations   the peak of a training step (see `layer_activation_bytes`), with and without per-layer
                gradient checkpointing, and the peak of an eval batch's forward (its logits)
  step temporaries  what the optimizer step allocates and frees: fp32 gradient copies of half-precision
                plugins and AdamW's per-tensor temporaries (fused kernel on CUDA, per-tensor loop on
                CPU): twice the largest optimizer tensor
  framework overhead  the process itself (CPU: a measured constant; CUDA: the context, assumed) and
                ZeRO's flat gradient-reduce buffers

Peak = weights + gradients + optimizer + overhead + max(training activations, eval activations, step
temporaries): evaluation and the optimizer step run when backward has freed the activations.
Mixed-precision full fine-tuning with AdamW is the familiar 16 bytes/param: 2 (bf16 weights) + 2
(grads) + 4 (fp32 master) + 4 (m) + 4 (v).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.architectures import NAMED_CONFIGS, QUICKSTART_MODEL, architecture
from finetune.core.layout import Placement, half_precision
from finetune.core.plugins import SPECS
from finetune.config import Config, ConfigError, LoraConfig, Plain, _flatten, remote_code_problem, build_config, parse_args, to_dict, validate
from finetune.errors import FinetuneError, shown
from finetune.methods import method_named

GIB = 1024**3
MIB = 1024**2
BOOSTER_CONFIGS = Path(__file__).resolve().parents[1] / "booster_configs"

# RSS of one finetune/train.py rank apart from the model's own tensors, in two parts.
# At the `start` stage: the Python, torch, transformers, peft, ColossalAI and datasets imports. Most of
# it is file-backed pages of the mapped libraries, and how many of those are resident depends on the
# machine's page cache (530 to 700 MiB measured on the same machine), so a finished run's own
# prediction takes its measured `start` stage instead of this typical figure.
CPU_START_BYTES = 700 * MIB
# After `start`: the gloo process group, the tokenizer, the tokenized data, and what the first training
# step leaves behind (autograd threads, oneDNN kernels, malloc arenas). Measured on the pinned stack
# (Linux x86-64, glibc): the train-step peak of a 1-rank tiny-gpt2 run minus its start stage and its
# predicted tensors (235 and 261 MiB in two runs). `python bench/run.py` measures it again.
CPU_AFTER_START_BYTES = 250 * MIB
CPU_PROCESS_BYTES = CPU_START_BYTES + CPU_AFTER_START_BYTES
# CUDA context and cuBLAS workspace of a torch 2.5 process: a typical figure, NOT measured here (this
# project has no GPU). torch.cuda.memory_allocated, which the run's profiler reports, does not see it.
CUDA_CONTEXT_BYTES = 512 * MIB

ESTIMATOR_KEYS = {"world_size": int, "seq_len": int, "device": str}
SHORT_KEYS = {"model": "model.name", "batch_size": "train.batch_size", "precision": "train.precision", "optimizer": "train.optimizer"}
DEVICES = ("cuda", "cpu")


class EstimateError(FinetuneError):
    """The estimate cannot be made as asked, stated in one line."""


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
        return 0.5 + absmax


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# ---------------------------------------------------------------------------------------------------
# The model, counted on the meta device


@dataclass(frozen=True)
class ModelShape:
    """What the formulas need from a model: dimensions from its config, counts from its meta instance."""

    model_type: str
    model_class: str
    causal_lm: bool
    hidden: int
    ffn: int
    heads: int
    layers: int
    vocab: int  # logits per token: the vocabulary, or a classifier's labels
    rms_norm: bool
    upcast_softmax: bool  # eager attention computes softmax in fp32 (Llama family)
    mlp_saved: int  # ffn-sized tensors one MLP's activation function keeps for backward
    saved_inputs: frozenset  # projection roles (qkv, o, up, down) whose input autograd keeps: trainable or adapted
    norms_trainable: bool  # an RMSNorm keeps its normalized input only for its own weight's gradient
    attn_dropout: float
    hidden_dropout: float
    total_params: int
    trainable_params: int
    layer_params: int  # one layer, adapters included
    layer_trainable: int
    layer_matmul: int  # one layer's projection weights (what TP splits and QLoRA quantizes)
    layer_rows: int  # their output rows
    embedding_params: int  # outside the layers, before them
    embedding_trainable: int
    head_params: int  # outside the layers, after them: untied head, final norm, classifier
    head_trainable: int
    head_quantizable: int  # classifier projections QLoRA quantizes (all but the last)
    token_embedding: int
    output_projection: int  # the head's weight (the token embedding itself where tied)
    tied: bool
    largest_trainable: int
    lora_inputs: int = 0  # input features of one layer's LoRA-adapted projections
    lora_ranks: int = 0  # their ranks, summed
    lora_dropout: float = 0.0


def load_model_config(name: str, trust_remote_code: bool = False):
    """The Hugging Face config of model.name: a named config, the quickstart model, a model dir or a config.json.

    trust_remote_code: the run's model.trust_remote_code; passed on, so that a directory with its own code
    is refused (or run, when trusted) instead of transformers asking on the terminal.
    """
    path = Path(name)
    if name not in NAMED_CONFIGS and name != QUICKSTART_MODEL and not (path / "config.json").is_file() and not (path.is_file() and path.suffix == ".json"):
        known = ", ".join([*NAMED_CONFIGS, QUICKSTART_MODEL])
        raise EstimateError(f"model.name: '{name}' is not a named model ({known}), a model directory with config.json, or a config.json file")
    from transformers import AutoConfig  # after the name check: a typo fails in a second

    if name in NAMED_CONFIGS:
        model_type, overrides = NAMED_CONFIGS[name]
        return AutoConfig.for_model(model_type, **overrides)
    if name == QUICKSTART_MODEL:
        from finetune.assets import quickstart_model_dir

        path = quickstart_model_dir()
        if not (path / "config.json").is_file():
            raise EstimateError(f"model.name={name}: its config comes with the converted model; run `make assets` first")
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False)  # converted from a GGUF here: no code
    config_file = path / "config.json" if path.is_dir() else path
    problem = remote_code_problem(config_file, name, trust_remote_code)
    if problem:
        raise EstimateError(problem)
    try:
        return AutoConfig.from_pretrained(str(path if path.is_dir() else config_file), trust_remote_code=trust_remote_code)  # the dir: its code lies beside
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as err:
        raise EstimateError(f"model.name={name}: not a Hugging Face config.json ({str(err).splitlines()[0][:160]})") from None


def is_classifier(config) -> bool:
    """Encoder-only models are fine-tuned as sequence classifiers (encoder + classification head)."""
    return architecture(config.model_type).encoder


def build_meta_model(config, trust_remote_code: bool = False):
    """The model class a run trains, on the meta device: shapes and counts, no storage (a model dir's own
    class only with the run's model.trust_remote_code)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    factory = AutoModelForSequenceClassification if is_classifier(config) else AutoModelForCausalLM
    with torch.device("meta"):
        return factory.from_config(config, trust_remote_code=trust_remote_code)


def _unique(params) -> list:
    seen: dict[int, Any] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def _layer_list(model):
    """The transformer layers: the longest ModuleList in the model."""
    from torch import nn

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise EstimateError(f"{type(model).__name__}: no list of transformer layers found")
    return max(lists, key=len)


def _projections(module) -> list:
    """Linear / GPT-2 Conv1D layers in registration order, LoRA's own adapters left out."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return [m for name, m in module.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and "lora_" not in name]


def _mlp_saved_tensors(config, layer) -> int:
    """ffn-sized tensors an MLP's activation keeps for backward, as transformers implements it."""
    if any(name.endswith("gate_proj") for name, _ in layer.named_modules()):
        return 3  # act(gate)'s input, and the product's factors act(gate) and up
    act = getattr(config, "activation_function", None) or getattr(config, "hidden_act", "gelu")
    # gelu_new (GPT-2) is its tanh formula in Python: four intermediates; torch's own GELU keeps its input.
    return 4 if act in ("gelu_new", "gelu_fast") else 1


# Which input a projection reads, by its name in the layer (GPT-2 / Llama family / BERT family); the
# attention output ("o") is matched before the MLP output ("down") because RoBERTa names both *.output.dense.
PROJECTION_ROLES = (
    ("qkv", ("c_attn", "q_proj", "k_proj", "v_proj", "query", "key", "value")),
    ("o", ("attn.c_proj", "o_proj", "attention.output.dense")),
    ("up", ("c_fc", "gate_proj", "up_proj", "intermediate.dense")),
    ("down", ("mlp.c_proj", "down_proj", "output.dense")),
)


def _saved_inputs(layer, lora_dropout: float) -> frozenset:
    """Roles whose input tensor autograd keeps: a trainable projection needs it for its weight's
    gradient, and so does LoRA's A matrix when it reads the input undropped."""
    saved, known = set(), False
    for name, module in layer.named_modules():
        role = next((r for r, suffixes in PROJECTION_ROLES if name.endswith(suffixes)), None)
        if role is None:
            continue
        known = True
        base = getattr(module, "base_layer", module)
        if base.weight.requires_grad or (hasattr(module, "lora_A") and lora_dropout == 0):
            saved.add(role)
    # An architecture whose projections are named otherwise: count every input (an upper bound).
    return frozenset(saved) if known else frozenset(role for role, _ in PROJECTION_ROLES)


def _config_float(config, *names: str) -> float:
    return next((float(getattr(config, n)) for n in names if getattr(config, n, None) is not None), 0.0)


def model_shape(config, method: str, cfg_lora=None, trust_remote_code: bool = False) -> ModelShape:
    """Count a meta-device model by part; for LoRA/QLoRA inject the run's adapters first."""
    model = build_meta_model(config, trust_remote_code)
    layers = _layer_list(model)
    projections = _projections(model)  # before adapters: the base model's own
    if method_named(method).adapter:
        _add_lora(model, cfg_lora)
    params = _unique(model.parameters())
    layer0 = _unique(layers[0].parameters())
    in_layers = {id(p) for p in layers.parameters()}
    inputs = model.get_input_embeddings()
    outputs = None if is_classifier(config) else model.get_output_embeddings()
    tied = outputs is not None and outputs.weight is inputs.weight
    # After the layers: the untied head, the final norm and a classifier; everything else before them.
    after = {id(p) for p in outputs.parameters()} if outputs is not None and not tied else set()
    for name, module in model.named_modules():
        if name.split(".")[-1] in ("ln_f", "norm", "final_layer_norm") or name.split(".")[0] in ("classifier", "score"):
            after |= {id(p) for p in module.parameters()}
    outside = [p for p in params if id(p) not in in_layers]
    head = [p for p in outside if id(p) in after]
    embedding = [p for p in outside if id(p) not in after]
    layer_projections = _projections(layers[0])
    adapted = [m for m in layers[0].modules() if hasattr(m, "lora_A")]  # peft's LoRA layers
    head_projections = [m for m in projections if m not in set(_projections(layers)) and m is not outputs]
    return ModelShape(
        model_type=config.model_type,
        model_class=type(model).__name__,
        causal_lm=not is_classifier(config),
        hidden=config.hidden_size,
        ffn=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size,
        heads=config.num_attention_heads,
        layers=len(layers),
        vocab=config.vocab_size if not is_classifier(config) else config.num_labels,
        rms_norm=any("RMSNorm" in type(m).__name__ for m in layers[0].modules()),
        upcast_softmax=architecture(config.model_type).upcast_softmax,
        mlp_saved=_mlp_saved_tensors(config, layers[0]),
        saved_inputs=_saved_inputs(layers[0], cfg_lora.dropout if adapted else 0.0),
        norms_trainable=all(p.requires_grad for m in layers[0].modules() if "Norm" in type(m).__name__ for p in m.parameters()),
        attn_dropout=_config_float(config, "attn_pdrop", "attention_probs_dropout_prob", "attention_dropout"),
        hidden_dropout=_config_float(config, "resid_pdrop", "hidden_dropout_prob"),
        total_params=_numel(params),
        trainable_params=_numel(p for p in params if p.requires_grad),
        layer_params=_numel(layer0),
        layer_trainable=_numel(p for p in layer0 if p.requires_grad),
        layer_matmul=sum(m.weight.numel() for m in layer_projections),
        layer_rows=sum(m.weight.shape[0] for m in layer_projections),
        embedding_params=_numel(embedding),
        embedding_trainable=_numel(p for p in embedding if p.requires_grad),
        head_params=_numel(head),
        head_trainable=_numel(p for p in head if p.requires_grad),
        head_quantizable=sum(m.weight.numel() for m in head_projections[:-1]),
        token_embedding=inputs.weight.numel(),
        output_projection=(outputs.weight.numel() if outputs is not None else 0),
        tied=tied,
        largest_trainable=max((p.numel() for p in params if p.requires_grad), default=0),
        lora_inputs=sum(m.in_features for m in adapted),
        lora_ranks=sum(m.r["default"] for m in adapted),
        lora_dropout=cfg_lora.dropout if adapted else 0.0,
    )


def _add_lora(model, cfg_lora) -> None:
    """Inject the run's LoRA adapters (its targets, or the architecture's default) and freeze the rest."""
    from peft import inject_adapter_in_model

    from finetune.model import ModelError, build_lora_config, trains_with_adapter

    try:
        lora_config = build_lora_config(model, cfg_lora)
    except ModelError as err:
        raise EstimateError(str(err)) from None
    # The shapes are what matter (DoRA's magnitude vector per adapted layer included): PiSSA/OLoRA's
    # decompositions of the weights would need real values, and give the same shapes as the default init.
    lora_config.init_lora_weights = True
    inject_adapter_in_model(lora_config, model)
    for name, param in model.named_parameters():
        param.requires_grad = trains_with_adapter(name)


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
    tensor with saved-tensor hooks in tests/test_estimate.py), in the spirit of Korthikanti et al.
    (2022), whose GPT layer saves s*b*h*(34 + 5*a*s/h) bytes in half precision with dropout. With
    h hidden, f ffn, a heads, s sequence, t tensor-parallel size, c/r the compute/residual dtype bytes:
      norms       LayerNorm: input r*h + mean/rstd; Llama RMSNorm: fp32 input 4h + rsqrt, and the
                  normalized r*h where its weight trains
      inputs      each projection's input where its weight trains or LoRA reads it undropped: q/k/v c*h,
                  output projection c*h/t, MLP in c*h, MLP out c*f/t
      attention   q/k/v 3c*h/t and the core:
                  sdpa (memory-efficient/flash) c*h/t output + 4a/t logsumexp, or the s x s scores
                  a*s/t x (softmax + a half copy for the matmul where softmax ran in fp32 + dropout mask
                  and output) for eager attention, and for sdpa with dropout on CPU (its math fallback)
      MLP         k*f/t ffn-sized tensors of the activation (k: 4 for GPT-2's gelu_new, 3 for Llama's
                  gated SiLU, 1 for GELU)
      dropout     two residual masks of h (bool on CUDA; on CPU the mask has the input's dtype)
      LoRA        per adapted projection, lora_B's input c*r, and with lora.dropout its dropped input
                  c*h_in and the mask (without dropout lora_A reads the input the projection saved)
    """
    h, f, a, t = shape.hidden, shape.ffn, shape.heads, place.tp
    c, r = place.compute_bytes, place.residual_bytes
    norm = norm_bytes(shape, r)
    mask = 1 if device == "cuda" else c
    sizes = {"qkv": h, "o": h / t, "up": h, "down": f / t}
    inputs = c * sum(sizes[role] for role in shape.saved_inputs)
    core = c * 3 * h / t  # q, k, v
    if attention == "eager" or (device == "cpu" and shape.attn_dropout > 0):
        softmax = 4 if (r == 4 or shape.upcast_softmax) else c
        per_score = softmax + (c if softmax != c else 0) + ((mask + softmax) if shape.attn_dropout > 0 else 0)
        core += a * seq / t * per_score
    else:
        core += c * h / t + 4 * a / t
    mlp = shape.mlp_saved * c * f / t
    dropout = 2 * h * mask if shape.hidden_dropout > 0 else 0
    lora = c * shape.lora_ranks + (shape.lora_inputs * (mask + c) if shape.lora_dropout > 0 else 0)
    return 2 * norm + inputs + core + mlp + dropout + lora


def norm_bytes(shape: ModelShape, residual: int) -> float:
    """Per token, what one norm keeps: LayerNorm its input and mean/rstd; HF's RMSNorm its fp32 input,
    the rsqrt, and the normalized input where its weight trains."""
    h = shape.hidden
    if shape.rms_norm:
        return 4 * h + 4 + (residual * h if shape.norms_trainable else 0)
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


def loss_peak_bytes(shape: ModelShape, place: Placement) -> float:
    """Per token, the peak around the loss in backward: fp32 log-softmax output, its gradient and the
    gradient of the logits, alive together (3 x 4 bytes x vocab; measured exactly on CPU)."""
    return 12 * shape.vocab / place.tp


def eval_peak_bytes(shape: ModelShape, place: Placement) -> float:
    """Per token, an eval forward's peak: the logits and their fp32 log-softmax (plus an fp32 copy of half logits)."""
    return (10 if place.eval_half else 8) * shape.vocab / place.tp + 2 * place.compute_bytes * shape.ffn / place.tp


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


def estimate(cfg: Config, world_size: int = 1, seq_len: int = 0, device: str = "cuda", quantization: Quantization | None = None) -> Estimate:
    """Predict the peak memory per rank of the run cfg describes (the rank that needs the most)."""
    shape = _cached_shape(cfg.model.name, cfg.model.trust_remote_code, cfg.method, json.dumps(dataclasses.asdict(cfg.lora), sort_keys=True))
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
        "pp": place.pp,
        "precision": cfg.train.precision,
        "optimizer": cfg.train.optimizer,
        "batch_size": cfg.train.batch_size,
        "eval_batch_size": cfg.eval.batch_size,
        "seq_len": seq,
        "device": device,
        "quantization": dataclasses.asdict(quant) if quant else None,
    }
    ranks = [_rank_estimate(shape, place, cfg, setup, rank, layers, quant) for rank, layers in enumerate(per_rank_layers)]
    return max(ranks, key=lambda e: e.total())


@functools.lru_cache(maxsize=8)
def _cached_shape(name: str, trust_remote_code: bool, method: str, lora: str) -> ModelShape:
    """model_shape by value: a fit check estimates a dozen variants of one model (a 7B meta model takes a second)."""
    return model_shape(load_model_config(name, trust_remote_code), method, LoraConfig(**json.loads(lora)), trust_remote_code)


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
    split = layers * shape.layer_matmul + first * shape.token_embedding + (last and not (first and shape.tied)) * shape.output_projection
    saving = split * (1 - 1 / place.tp)
    matmul = (layers * shape.layer_matmul + last * shape.output_projection) / place.tp
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
    stored = _weight_bytes(shape, place, share, quant) / place.param_shards
    weights = stored * (1 - place.param_offload) + _gathered_elements(shape, place, share) * place.compute_bytes
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


def activation_peaks(shape: ModelShape, place: Placement, share: Share, cfg: Config, seq: int, device: str, rank: int) -> tuple[float, float, float]:
    """(training step, training step with checkpointing, eval batch) activation peaks of one rank.

    The training peak is at the loss in backward, with the activations of every micro-batch in flight
    on this rank still saved; checkpointing keeps only each layer's input and recomputes one layer.
    """
    tokens = cfg.train.batch_size // place.microbatches * seq
    eager_under_shardformer = SPECS[cfg.plugin.name].shardformer and not architecture(shape.model_type).sdpa_under_shardformer  # see model.attention_for
    attention = "eager" if cfg.model.attn_implementation == "eager" or eager_under_shardformer else "sdpa"
    layer = layer_activation_bytes(shape, place, seq, device, attention)
    outside = outside_activation_bytes(shape, place, device, share.first, share.last)
    layers_held = in_flight(place, rank) * share.layers / (place.chunks if place.interleaved else 1)
    loss = loss_peak_bytes(shape, place) if share.last else 0.0
    autocast = 2 * share.matmul if place.autocast_copies else 0
    train = tokens * (layers_held * layer + outside + loss) + autocast
    checkpointed = tokens * (layers_held * place.residual_bytes * shape.hidden + outside + max(loss, layer)) + autocast
    eval_tokens = (cfg.train.batch_size if place.pp > 1 else cfg.eval.batch_size) * seq  # pipelines evaluate at the train batch
    evaluation = eval_tokens * (eval_peak_bytes(shape, place) if share.last else outside)
    return train, checkpointed, evaluation


def _rank_estimate(shape: ModelShape, place: Placement, cfg: Config, setup: dict, rank: int, layers: int, quant: Quantization | None) -> Estimate:
    """The estimate for pipeline rank `rank` (0 without a pipeline), which holds `layers` layers."""
    device = setup["device"]
    if quant:  # QLoRA: fp32 adapters train on a frozen, quantized base that computes in the compute dtype
        compute = DTYPE_BYTES[quant.compute_dtype]
        place = dataclasses.replace(
            place, weight_bytes=compute, compute_bytes=compute, residual_bytes=compute, eval_half=compute == 2, autocast_copies=False,
            grad_bytes=4, master_bytes=0, state_bytes=4, step_grad_bytes=0,
        )
    share = rank_share(shape, place, method_named(cfg.method).full, rank, layers)
    state = state_bytes(shape, place, share, cfg.train.optimizer, quant)
    train, checkpointed, evaluation = activation_peaks(shape, place, share, cfg, setup["seq_len"], device, rank)
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
    )


def _weight_bytes(shape: ModelShape, place: Placement, share: Share, quant: Quantization | None) -> float:
    """Stored bytes of this rank's weights (before parameter sharding)."""
    if not quant:
        return (share.params - share.trainable) * (place.frozen_bytes or place.weight_bytes) + share.trainable * place.weight_bytes
    quantized = (share.layers * shape.layer_matmul + share.last * shape.head_quantizable) / place.tp
    scales = 4 * share.layers * shape.layer_rows / place.tp if quant.bits == 8 else 0  # LLM.int8: an fp32 scale per output row
    frozen_rest = share.params - quantized - share.trainable
    return quantized * quant.bytes_per_weight() + scales + frozen_rest * place.compute_bytes + share.trainable * 4


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


# ---------------------------------------------------------------------------------------------------
# Will it fit? The cheapest changes that make it


@dataclass(frozen=True)
class Alternative:
    """A change to the run (config overrides a user can paste) and its predicted peak per rank."""

    overrides: tuple[str, ...]
    cost: float  # how much the change costs the run: lower first (see fitting_alternatives)
    peak_bytes: int

    def describe(self) -> str:
        """'train.gradient_checkpointing=true (14.60 GiB)'."""
        return f"{' '.join(self.overrides)} ({_gib(self.peak_bytes)} GiB)"


def with_overrides(cfg: Config, overrides: tuple[str, ...]) -> Config:
    """cfg with `key=value` / `--config file` overrides applied; a new plugin drops the old one's options."""
    settings = parse_args(list(overrides))
    tree = to_dict(cfg)
    if any(key == "plugin.name" for _, key, _ in settings):
        del tree["plugin"]
    return build_config([("fit check", key, value) for key, value in _flatten(tree).items()] + settings)


def _candidate_changes(cfg: Config, world_size: int) -> list[tuple[tuple[str, ...], float]]:
    """(overrides, cost) of each change worth trying. Costs rank what a user gives up: recomputing the
    forward (checkpointing, 1), a halved micro-batch (1 per halving, same global batch), sharding over
    the same ranks (each plugin's fit_alternatives: zero2 2, fsdp 2, tp 3: more communication), and the method (qlora 4: another model)."""
    train = cfg.train
    singles: list[tuple[tuple[str, ...], float]] = []
    micro, halvings = train.batch_size // 2, 1
    while micro >= 1:
        if train.batch_size % micro == 0:
            singles.append(((f"train.batch_size={micro}", f"train.grad_accum_steps={train.grad_accum_steps * train.batch_size // micro}"), halvings))
        micro, halvings = micro // 2, halvings + 1
    if world_size > 1:
        singles += [change for spec in SPECS.values() for change in spec.fit_alternatives(world_size)]
    method = method_named(cfg.method)
    if method.adapter and not method.quantized_base:
        singles.append((("method=qlora",), 4))
    if train.gradient_checkpointing:
        return singles
    checkpointing = ("train.gradient_checkpointing=true",)
    return [(checkpointing, 1)] + singles + [(checkpointing + overrides, 1 + cost) for overrides, cost in singles]


def fitting_alternatives(cfg: Config, world_size: int, available_bytes: float, device: str = "cuda", seq_len: int = 0) -> list[Alternative]:
    """The changes to cfg whose predicted per-rank peak fits in available_bytes, cheapest first (then
    lowest peak). Of the micro-batch halvings only the largest micro-batch that fits is kept, and a
    combination is left out when a part of it fits alone."""
    fitting: list[Alternative] = []
    for overrides, cost in _candidate_changes(cfg, world_size):
        try:
            changed = with_overrides(cfg, overrides)
        except ConfigError:
            continue
        problems = [p for p in validate(changed, world_size, has_cuda=device == "cuda") if not p.startswith(ignored_problems())]
        if problems or to_dict(changed) == to_dict(cfg):
            continue  # a change the run cannot take, or what it already has
        peak = estimate(changed, world_size, seq_len, device, quantization_of(changed)).total()
        if peak <= available_bytes:
            fitting.append(Alternative(overrides, cost, peak))
    fitting.sort(key=lambda a: (a.cost, a.peak_bytes))
    kept: list[Alternative] = []
    for alt in fitting:
        kind = [o.split("=")[0] for o in alt.overrides]
        if all([o.split("=")[0] for o in k.overrides] != kind and not set(k.overrides) <= set(alt.overrides) for k in kept):
            kept.append(alt)
    return kept


def fit_check_line(cfg: Config, world_size: int, available_bytes: float, device: str = "cuda", seq_len: int = 0) -> str | None:
    """None when the run's predicted per-rank peak fits in available_bytes; else the one line that says
    by how much it does not and the three cheapest changes that fit, each with its predicted peak."""
    peak = estimate(cfg, world_size, seq_len, device, quantization_of(cfg)).total()
    if peak <= available_bytes:
        return None
    alternatives = fitting_alternatives(cfg, world_size, available_bytes, device, seq_len)[:3]
    changes = "; ".join(a.describe() for a in alternatives) if alternatives else "none of checkpointing, a smaller micro-batch, qlora or sharding over these ranks fits"
    return (
        f"predicted peak {_gib(peak)} GiB per rank does not fit the {_gib(available_bytes)} GiB available on {device}; "
        f"changes that fit: {changes} (train.fit_check=warn or off to launch anyway)"
    )


def format_fit(cfg: Config, world_size: int, available_bytes: float, device: str, seq_len: int) -> str:
    """--fit: the verdict for the run as configured, then every change that fits, ranked."""
    peak = estimate(cfg, world_size, seq_len, device, quantization_of(cfg)).total()
    verdict = "fits" if peak <= available_bytes else "does not fit"
    lines = [f"as configured: {_gib(peak)} GiB per rank, {verdict} in {_gib(available_bytes)} GiB"]
    if peak > available_bytes:
        alternatives = fitting_alternatives(cfg, world_size, available_bytes, device, seq_len)
        lines.append("changes that fit, cheapest first (predicted peak per rank):" if alternatives else "no change tried fits (checkpointing, micro-batch, qlora, zero2/fsdp/tp)")
        lines += [f"  {i}. {' '.join(a.overrides):<72} {_gib(a.peak_bytes):>8} GiB" for i, a in enumerate(alternatives, 1)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Command line

# Problems of finetune.config.validate that do not concern an estimate, each with why:
IGNORED_PROBLEMS = (
    "model.name:",  # the estimator resolves the model itself, and also reads a bare config.json
    "data.train_path: file not found",  # no data is read: the estimate may be made far from the data
    "data.eval_path: file not found",
)


def ignored_problems() -> tuple[str, ...]:
    """The starts of validation lines the estimator ignores: IGNORED_PROBLEMS and every plugin's machine_problems."""
    return IGNORED_PROBLEMS + tuple(line for spec in SPECS.values() for line in spec.machine_problems)


def _expand_short_forms(argv: list[str]) -> list[str]:
    """model=, batch_size=, precision=, optimizer= name config keys; plugin= names a booster_configs/ file or a plugin."""
    expanded: list[str] = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key == "plugin":
            setup = BOOSTER_CONFIGS / f"{value}.yaml"
            if setup.is_file():
                expanded += ["--config", str(setup)]
            elif value in SPECS:
                expanded.append(f"plugin.name={value}")
            else:
                setups = sorted(p.stem for p in BOOSTER_CONFIGS.glob("*.yaml"))
                raise ConfigError(f"plugin={value}: not a setup in booster_configs/ ({', '.join(setups)}) nor a plugin ({', '.join(SPECS)})")
        elif sep and key in SHORT_KEYS:
            expanded.append(f"{SHORT_KEYS[key]}={value}")
        else:
            expanded.append(arg)
    return expanded


def _check_value(key: str, value: Any, kind: type) -> Any:
    if isinstance(value, Plain):  # as written on the command line: YAML's reading of it
        value = value.resolved()
    if kind is bool and isinstance(value, bool) or kind is str and isinstance(value, str):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{key}: expected {'true or false' if kind is bool else 'a whole number' if kind is int else 'a string'}, got {shown(value)}")


def parse_request(argv: list[str]) -> tuple[Config, dict[str, Any]]:
    """argv -> (the run config, the estimator's own settings), every key and value checked."""
    own = ESTIMATOR_KEYS
    settings, extra = [], {}
    for source, key, value in parse_args(_expand_short_forms(argv)):
        if key in own:
            extra[key] = _check_value(key, value, own[key])
        else:
            settings.append((source, key, value))
    cfg = build_config(settings)
    world_size, device = extra.get("world_size", 1), extra.get("device", "cuda")
    problems = [p for p in validate(cfg, world_size, has_cuda=device == "cuda") if not p.startswith(ignored_problems())]
    if device not in DEVICES:
        problems.insert(0, f"device: unknown value '{device}'; choose from {', '.join(DEVICES)}")
    if extra.get("seq_len", 0) < 0:
        problems.append(f"seq_len: must be at least 1 (0: data.max_length), got {extra['seq_len']}")
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)
    return cfg, extra


def quantization_of(cfg: Config) -> Quantization:
    """QLoRA's layout from the run config's quantization section (compute dtype `auto`: train.precision)."""
    quant = cfg.quantization
    compute = cfg.train.precision if quant.compute_dtype == "auto" else quant.compute_dtype
    return Quantization(bits=quant.bits, quant_type=quant.quant_type, double_quant=quant.double_quant, compute_dtype=compute)


def estimate_request(argv: list[str]) -> Estimate:
    """The estimate for a command line (config files, overrides and estimator keys)."""
    cfg, extra = parse_request(argv)
    return estimate(cfg, extra.get("world_size", 1), extra.get("seq_len", 0), extra.get("device", "cuda"), quantization_of(cfg))


def compare_with_run(cfg: Config, world_size: int, seq_len: int, memory: dict[str, Any]) -> dict[str, Any]:
    """summary.json's memory.estimate: the prediction for a finished run next to its measured train_step_peak.

    Args:
        memory: the run's measured memory (MemoryProfiler.summary(): device and stages).
    """
    try:
        est = estimate(cfg, world_size, seq_len, memory["device"], quantization_of(cfg))
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


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f}"


def format_table(est: Estimate) -> str:
    """The estimate as a person reads it: setup, then bytes per rank with and without checkpointing."""
    s = est.setup
    parallel = f"dp {s['dp']}" + (f" x tp {s['tp']}" if s["tp"] > 1 else "") + (f" x pp {s['pp']}" if s["pp"] > 1 else "")
    quant = s["quantization"]
    method = f"qlora {quant['bits']}-bit {quant['quant_type'] if quant['bits'] == 4 else 'int8'}" if quant else s["method"]
    precision = f"compute {quant['compute_dtype']}" if quant else s["precision"]
    pct = 100 * est.trainable_params / est.params
    width = 44
    both = lambda name, value: f"  {name:<{width - 2}} {_gib(value):>16} {_gib(value):>14}"
    lines = [
        f"{method} fine-tune of {s['model']} ({s['model_class']}) with {s['plugin']} on {s['world_size']} {s['device']} rank(s) ({parallel}), {precision}, {s['optimizer']}",
        f"batch {s['batch_size']} x {s['seq_len']} tokens per rank (eval batch {s['eval_batch_size']}); parameters {est.params:,d}, trainable {est.trainable_params:,d} ({pct:.2f}%)",
        "",
        f"{'per rank, GiB':<{width}} {'no checkpointing':>16} {'checkpointing':>14}",
        both("weights", est.weights),
        both("gradients", est.gradients),
        both("optimizer states (incl. fp32 master)", est.optimizer_states),
        both("framework overhead", est.framework_overhead),
        "  + the largest of (they do not coexist):",
        f"    {'activations of a training step':<{width - 4}} {_gib(est.activations):>16} {_gib(est.activations_checkpointed):>14}",
        both("  activations of an eval batch", est.eval_activations),
        both("  optimizer-step temporaries", est.step_temporaries),
        f"  {'peak':<{width - 2}} {_gib(est.total(False)):>16} {_gib(est.total(True)):>14}",
    ]
    if est.host_offload:
        lines.append(f"  {'host memory (CPU offload)':<{width - 2}} {_gib(est.host_offload):>16} {_gib(est.host_offload):>14}")
    ckpt = "true" if est.gradient_checkpointing else "false"
    lines += ["", f"as configured (train.gradient_checkpointing={ckpt}): {_gib(est.total())} GiB per rank"]
    if s["device"] == "cuda":
        lines.append(f"framework overhead includes an assumed {CUDA_CONTEXT_BYTES / GIB:.1f} GiB CUDA context (not seen by torch.cuda.memory_allocated)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """CLI: print the estimate as a table (or JSON with --json); a bad request is one line on stderr, exit 2."""
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    as_json = "--json" in argv
    try:
        argv, fit_gib = _fit_flag([a for a in argv if a != "--json"])
        if fit_gib is not None:
            cfg, extra = parse_request(argv)
            print(format_fit(cfg, extra.get("world_size", 1), fit_gib * GIB, extra.get("device", "cuda"), extra.get("seq_len", 0)))
            return 0
        est = estimate_request(argv)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(est.to_dict(), indent=2) if as_json else format_table(est))
    return 0


def _fit_flag(argv: list[str]) -> tuple[list[str], float | None]:
    """Take `--fit GiB` (or `--fit=GiB`) out of argv."""
    rest, value = [], None
    args = iter(argv)
    for arg in args:
        if arg == "--fit" or arg.startswith("--fit="):
            raw = arg.partition("=")[2] if "=" in arg else next(args, "")
            try:
                value = float(raw)
            except ValueError:
                value = -1.0
            if not value > 0:
                raise EstimateError(f"--fit: expected the memory per rank in GiB (a positive number), got {raw!r}")
        else:
            rest.append(arg)
    return rest, value


if __name__ == "__main__":
    import logging

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # config warnings would bury the table
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # peft imports it; its CPU-kernel notice is noise here
    sys.exit(main(sys.argv[1:]))
