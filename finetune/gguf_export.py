"""GGUF out: a merged Llama-architecture run written as one GGUF file (weights + tokenizer) for llama.cpp.

    python -m finetune.export outputs/run1 --gguf run1.gguf [--gguf-type f16|q8_0]

Tensor names, the Q/K row order and the metadata keys follow llama.cpp's convert_hf_to_gguf.py (through
the `gguf` package's own constants); the tokenizer is written in the layout of the quickstart's SmolLM2
GGUF (a byte-level BPE, `tokenizer.ggml.model=gpt2`). The file is read back with transformers' `gguf_file=`
loader and finetune.assets' tokenizer reader before it is renamed into place: its logits must match the
merged model's within the type's tolerance and its tokenizer must encode a probe text to the same ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from finetune import architectures
from finetune.config import Config
from finetune.export_source import ExportError, locate, merged_model
from finetune.outputs import staged_output
from finetune.tasks import TASKS

GGUF_TYPES = ("f16", "q8_0")
# Largest |logit difference| between the reloaded file and the merged float32 model, as a fraction of the
# largest |logit|, per type. Measured on the probe below: f16 1.1e-3 on SmolLM2-135M (logits up to 34) and
# 1.3e-3 on a random tiny Llama (init std 0.1); q8_0 3.2e-2 and 2.9e-2. HF's Q/K row order left
# unpermuted gives 0.86 and 0.82, so a wrong tensor layout cannot pass.
LOGIT_TOLERANCE = {"f16": 1e-2, "q8_0": 0.1}
PROBE_TEXT = "Hello world! The 3 quick brown foxes jumped 1234 times.\n<|im_start|>user café</s>"


def refusal(cfg: Config) -> str | None:
    """Why this run cannot become a GGUF file, from its config alone (no model is built); None if it may."""
    if TASKS[cfg.task].auto_model != "AutoModelForCausalLM":
        return f"task={cfg.task}: a classification head has no GGUF form (llama.cpp runs causal LMs); export an HF dir instead (python -m finetune.export RUN OUT_DIR)"
    kind = architectures.model_type(cfg.model.name)
    if kind is not None and kind != "llama":
        return f"model.name={cfg.model.name} is a {kind} model: --gguf writes Llama-architecture models only; export an HF dir instead (python -m finetune.export RUN OUT_DIR)"
    return None


def _model_refusal(model: torch.nn.Module) -> str | None:
    """Why the built model does not fit llama.cpp's 'llama' layout as we write it; None if it does."""
    config = model.config
    if config.model_type != "llama":
        return f"the model is a {config.model_type} model: --gguf writes Llama-architecture models only"
    if getattr(config, "rope_scaling", None):
        return f"rope_scaling={config.rope_scaling} is not written to GGUF by this exporter (transformers' GGUF reader ignores it too)"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "attention or MLP biases are not part of llama.cpp's Llama layout"
    return None


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order: HF's rotary halves [x0..x(d/2), y0..] interleaved per head (convert_hf_to_gguf's permute)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization ('gpt-2' or 'smollm'), or ExportError."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [step["type"] for step in steps]
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # splits every digit on its own, like finetune.assets.tokenizer_from_gguf reads it back
    raise ExportError(f"the tokenizer's pre-tokenizer ({' + '.join(kinds) or 'none'}) has no llama.cpp name this exporter knows; only GPT-2 / SmolLM2-style byte-level BPE is written")


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Write a byte-level BPE tokenizer as `tokenizer.ggml.*` metadata, padded to the model's vocabulary."""
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model["type"] != "BPE" or (state.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(f"the tokenizer is a {model['type']} tokenizer without byte-level decoding; only byte-level BPE (GPT-2 / SmolLM2 style) is written to GGUF")
    tokens: dict[int, str] = {index: token for token, index in model["vocab"].items()}
    types = {index: gguf.TokenType.NORMAL for index in tokens}
    for added in state.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    if max(tokens) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(tokens)} but the model's vocabulary holds {vocab_size}")
    # As llama.cpp does: embedding rows no token maps to get placeholder names.
    names = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(state.get("pre_tokenizer")))
    writer.add_token_list(names)
    writer.add_token_types([types.get(i, gguf.TokenType.UNUSED) for i in range(vocab_size)])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    for key, index in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id), ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if index is not None:
            getattr(writer, f"add_{key}_token_id")(index)
    ids = tokenizer("x").input_ids
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])
    writer.add_add_space_prefix(False)  # byte-level BPE encodes the space itself
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def _add_tensor(writer, name: str, data: np.ndarray, gguf_type: str) -> None:
    """One tensor: norms stay float32; matrices become f16, or q8_0 where rows split into 32-value blocks."""
    import gguf

    if data.ndim == 1:
        writer.add_tensor(name, data.astype(np.float32))
    elif gguf_type == "q8_0" and data.shape[-1] % 32 == 0:
        writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:  # as llama.cpp falls back when a row does not split into q8_0 blocks
        writer.add_tensor(name, data.astype(np.float16))


def write_gguf(model: torch.nn.Module, tokenizer, path: Path, gguf_type: str, name: str) -> None:
    """Write a Llama model and its tokenizer as one GGUF file at `path` (llama.cpp's names and Q/K order)."""
    import gguf

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # no output.weight: readers tie it to token_embd, as transformers' GGUF loader does
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"{hf_name}: no GGUF tensor name for this Llama weight")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = _permute(data, config.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = _permute(data, config.num_key_value_heads)
        _add_tensor(writer, gguf_name, data, gguf_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def round_trip_difference(model: torch.nn.Module, tokenizer, path: Path) -> tuple[float, float]:
    """Read `path` back (transformers' gguf_file= loader, our tokenizer reader): max |logit difference|, max |logit|.

    Raises:
        ExportError: the file's tokenizer encodes the probe text to other ids.
    """
    from transformers import AutoModelForCausalLM

    from finetune.assets import tokenizer_from_gguf

    expected = tokenizer(PROBE_TEXT).input_ids
    got = tokenizer_from_gguf(path)(PROBE_TEXT).input_ids
    if got != expected:
        raise ExportError(f"the written tokenizer encodes a probe text differently ({len(got)} vs {len(expected)} ids, first at {next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))})")
    reloaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32, trust_remote_code=False).eval()
    probe = torch.tensor([expected[:32]])
    with torch.no_grad():
        expected_logits = model(input_ids=probe).logits
        difference = (expected_logits - reloaded(input_ids=probe).logits).abs().max().item()
    return difference, expected_logits.abs().max().item()


def export_gguf(source: Path, out: Path, gguf_type: str = "f16", flags: set[str] = frozenset()) -> dict:
    """Write the merged run `source` as the GGUF file `out` (atomically) and check it reads back to the same logits.

    Raises:
        ExportError: the run is not a Llama causal LM, or the round trip differs.
        OutputRefused: the output (or its .partial) exists.
    """
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"--gguf-type {gguf_type}: choose one of {', '.join(GGUF_TYPES)}")
    if out.suffix != ".gguf":
        raise ExportError(f"--gguf {out}: the file name must end in .gguf")
    with staged_output(out, directory=False) as staging:  # refused now if out exists, before the model is built
        cfg, weights = locate(source, flags)  # flags: this command's opt-ins (finetune.export_source.OPT_INS)
        reason = refusal(cfg)
        if reason:
            raise ExportError(reason)
        model, tokenizer = merged_model(cfg, weights)
        reason = _model_refusal(model)
        if reason:
            raise ExportError(reason)
        model.eval()
        write_gguf(model, tokenizer, staging, gguf_type, name=Path(cfg.model.name).name)
        difference, scale = round_trip_difference(model, tokenizer, staging)
        if difference > LOGIT_TOLERANCE[gguf_type] * scale:
            raise ExportError(
                f"the GGUF file's logits differ from the merged model's by {difference:.2e}, more than {LOGIT_TOLERANCE[gguf_type]} x the largest logit ({scale:.2f}) allowed for {gguf_type}; nothing was written"
            )
    return {"source": str(weights), "out": str(out), "gguf_type": gguf_type, "merged_adapter": (weights / "adapter_config.json").is_file(), "max_logit_difference": difference, "max_logit": scale}
