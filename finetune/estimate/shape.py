"""The model a run trains, counted on the meta device: dimensions from its config, parameters by part
(layers, embeddings, head, LoRA adapters injected with the run's own targets); nothing is allocated."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.architectures import NAMED_CONFIGS, QUICKSTART_CONFIG, QUICKSTART_MODEL, architecture
from finetune.config import LoraConfig, remote_code_problem
from finetune.errors import FinetuneError
from finetune.methods import method_named


class EstimateError(FinetuneError):
    """The estimate cannot be made as asked, stated in one line."""



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
    upcast_norm: bool  # RMSNorm keeps its normalized input in fp32 (Gemma)
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
    layer_experts: int = 0  # of layer_matmul, the MoE experts' weights: whole on every tensor-parallel rank (ColossalAI's Mixtral policy)
    attn_width: int = 0  # query features per token (heads x head_dim; Gemma-2's exceed the hidden size)
    kv_width: int = 0  # key or value features per token (fewer than the query's with grouped-query attention)
    kv_heads: int = 0
    layer_norms: int = 2  # hidden-size norms per layer (Gemma-2/3: 4, before and after attention and MLP)
    head_norms: bool = False  # per-head q/k norms (Qwen3, Gemma-3)
    experts_per_token: int = 1  # MoE: experts each token runs through (Mixtral: 2 of 8); 1 for a dense MLP
    experts: int = 0  # MoE: experts per layer (the router's logits); 0 for a dense MLP
    logit_softcap: bool = False  # the final logits are soft-capped (Gemma-2): tanh keeps its output for backward
    attention_softcap: bool = False  # eager attention's scores are soft-capped (Gemma-2): tanh keeps its output
    lora_inputs: float = 0  # input features of one layer's LoRA-adapted projections, per token (an expert's: k/E of them)
    lora_ranks: float = 0  # their ranks, summed alike
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
    if name == QUICKSTART_MODEL:  # its shape is known: the estimate needs no converted weights (make assets)
        return AutoConfig.for_model("llama", **QUICKSTART_CONFIG)
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


def build_meta_model(config, trust_remote_code: bool = False, head_outputs: int = 0):
    """The model class a run trains, on the meta device: shapes and counts, no storage (a model dir's own
    class only with the run's model.trust_remote_code).

    Args:
        head_outputs: a sequence-classification head of this many outputs, as a task that scores or classifies
            sequences builds it (task=reward: 1); 0: the model's own kind (a causal LM, an encoder's classifier).
    """
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if head_outputs:
        config = copy.deepcopy(config)
        config.num_labels = head_outputs
    factory = AutoModelForSequenceClassification if head_outputs or is_classifier(config) else AutoModelForCausalLM
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
    """The transformer layers: the longest ModuleList in the model that no other list holds (an MoE layer's experts are a list inside one)."""
    from torch import nn

    named = {name: m for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0}
    lists = [m for name, m in named.items() if not any(name.startswith(f"{outer}.") for outer in named)]
    if not lists:
        raise EstimateError(f"{type(model).__name__}: no list of transformer layers found")
    return max(lists, key=len)


def _projections(module) -> list:
    """Linear / GPT-2 Conv1D layers in registration order, LoRA's own adapters left out."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return [m for name, m in module.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and "lora_" not in name]


def _mlp_saved_tensors(config, layer) -> int:
    """ffn-sized tensors an MLP's activation keeps for backward, as transformers implements it (per expert a token runs through)."""
    if any(name.endswith(GATED_MLP) for name, _ in layer.named_modules()):
        return 3  # act(gate)'s input, and the product's factors act(gate) and up
    act = getattr(config, "activation_function", None) or getattr(config, "hidden_act", "gelu")
    # gelu_new (GPT-2) is its tanh formula in Python: four intermediates; torch's own GELU keeps its input.
    return 4 if act in ("gelu_new", "gelu_fast") else 1


# Gated MLPs, act(gate(x)) * up(x): Llama's gate_proj, Phi-3's fused gate_up_proj, a Mixtral expert's w1.
GATED_MLP = ("gate_proj", "gate_up_proj", "w1")
# Which input a projection reads, by its name in the layer (GPT-2 / Llama family / Phi-3's fused ones /
# Mixtral's experts / BERT family); the attention output ("o") is matched before the MLP output ("down")
# because RoBERTa names both *.output.dense.
PROJECTION_ROLES = (
    ("qkv", ("c_attn", "q_proj", "k_proj", "v_proj", "qkv_proj", "query", "key", "value")),
    ("o", ("attn.c_proj", "o_proj", "attention.output.dense")),
    ("up", ("c_fc", "gate_proj", "up_proj", "gate_up_proj", "w1", "w3", "intermediate.dense")),
    ("down", ("mlp.c_proj", "down_proj", "w2", "output.dense")),
    ("router", ("block_sparse_moe.gate",)),  # an MoE router reads the MLP's input
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


def model_shape(config, method: str, cfg_lora=None, trust_remote_code: bool = False, head_outputs: int = 0) -> ModelShape:
    """Count a meta-device model by part (with a sequence-classification head of `head_outputs`, as
    build_meta_model); for LoRA/QLoRA inject the run's adapters first."""
    model = build_meta_model(config, trust_remote_code, head_outputs)
    classifier = bool(head_outputs) or is_classifier(config)
    layers = _layer_list(model)
    projections = _projections(model)  # before adapters: the base model's own
    if method_named(method).adapter:
        _add_lora(model, cfg_lora)
    params = _unique(model.parameters())
    layer0 = _unique(layers[0].parameters())
    in_layers = {id(p) for p in layers.parameters()}
    inputs = model.get_input_embeddings()
    outputs = None if classifier else model.get_output_embeddings()
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
    # peft's LoRA layers, each with the share of tokens it sees: an MoE expert's k of every E tokens.
    experts, per_token = getattr(config, "num_local_experts", None) or 0, getattr(config, "num_experts_per_tok", None) or 1
    adapted = [(m, per_token / experts if ".experts." in f".{name}" else 1) for name, m in layers[0].named_modules() if hasattr(m, "lora_A")]
    head_projections = [m for m in projections if m not in set(_projections(layers)) and m is not outputs]
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    norms = [name for name, m in layers[0].named_modules() if "Norm" in type(m).__name__]
    head_norms = [name for name in norms if name.endswith(("q_norm", "k_norm"))]
    return ModelShape(
        attn_width=heads * head_dim,
        kv_width=kv_heads * head_dim,
        kv_heads=kv_heads,
        layer_norms=len(norms) - len(head_norms),
        head_norms=bool(head_norms),
        experts_per_token=per_token,
        experts=experts,
        logit_softcap=bool(getattr(config, "final_logit_softcapping", None)) and not classifier,
        attention_softcap=bool(getattr(config, "attn_logit_softcapping", None)),
        model_type=config.model_type,
        model_class=type(model).__name__,
        causal_lm=not classifier,
        hidden=config.hidden_size,
        ffn=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size,
        heads=config.num_attention_heads,
        layers=len(layers),
        vocab=model.config.num_labels if classifier else config.vocab_size,
        rms_norm=any("RMSNorm" in type(m).__name__ for m in layers[0].modules()),
        upcast_softmax=architecture(config.model_type).upcast_softmax,
        upcast_norm=architecture(config.model_type).upcast_norm,
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
        layer_experts=sum(m.weight.numel() for name, m in layers[0].named_modules() if ".experts." in f".{name}" and m in layer_projections),
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
        lora_inputs=sum(m.in_features * share for m, share in adapted),
        lora_ranks=sum(m.r["default"] * share for m, share in adapted),
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



@functools.lru_cache(maxsize=8)
def cached_model_shape(name: str, trust_remote_code: bool, method: str, lora: str, head_outputs: int = 0) -> ModelShape:
    """model_shape by value: a fit check estimates a dozen variants of one model (a 7B meta model takes a second)."""
    return model_shape(load_model_config(name, trust_remote_code), method, LoraConfig(**json.loads(lora)), trust_remote_code, head_outputs)
