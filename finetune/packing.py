"""Sequence packing for causal-LM tasks (data.packing=true): several samples per row, attention kept inside each.

Rows are filled best-fit-decreasing up to data.max_length tokens (samples are never split). In a
packed row every sample's position ids restart at 0 and the first label of each sample is -100 (a
causal LM would otherwise learn to predict it from the previous sample); the loss stays the mean over
label tokens, as for padded batches, so packed and padded batches of the same samples score the same.

How a model is told where samples end (packed_attention):
  - flash_attention_2 on Llama-family models: position ids only, no mask: transformers 4.51 finds the
    boundaries from the position-id resets (padding-free: varlen kernels, no pad tokens computed);
  - sdpa / eager on Llama-family models: an additive block-diagonal causal mask [batch, 1, S, S],
    which they take as given;
  - GPT-2: transformers 4.51 flattens any attention mask to [batch, S] and passes no position ids to
    its attention, so neither way reaches it; a small attention function (registered with
    transformers' AttentionInterface) restores the block mask from the flattened one.
"""

from __future__ import annotations

import torch

from finetune.data import IGNORE_INDEX, NON_PAD_TOKENS, Padding
from finetune.architectures import ARCHITECTURES, architecture

GPT2_PACKED = "gpt2_packed"


def pack(samples: list[dict], max_length: int) -> list[dict]:
    """Best-fit-decreasing packing of {input_ids, labels} samples into rows of at most max_length tokens.

    Returns rows {input_ids, labels, lengths}; the samples' order inside a row is their packing order.
    """
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]["input_ids"]))  # stable: ties keep data order
    rows: list[list[int]] = []
    by_space: list[list[int]] = [[] for _ in range(max_length + 1)]  # row indices by free space
    for i in order:
        size = len(samples[i]["input_ids"])
        space = next((s for s in range(size, max_length + 1) if by_space[s]), None)
        if space is None:
            rows.append([])
            row, space = len(rows) - 1, max_length
        else:
            row = by_space[space].pop()
        rows[row].append(i)
        by_space[space - size].append(row)
    return [_join([samples[i] for i in row]) for row in rows]


def _join(samples: list[dict]) -> dict:
    input_ids, labels = [], []
    for s in samples:
        input_ids += s["input_ids"]
        labels += [IGNORE_INDEX] + s["labels"][1:]
    return {"input_ids": input_ids, "labels": labels, "lengths": [len(s["input_ids"]) for s in samples]}


def collate_packed(rows: list[dict], pad_token_id: int, attention: str, padding: Padding = Padding()) -> dict[str, torch.Tensor]:
    """A batch of packed rows, right-padded to the longest (as `padding` widens it); `attention` is what packed_attention() returned.

    The padding at a row's end is one more segment (positions from 0, labels -100), so no real token
    attends to it and every query attends to at least itself.
    """
    width = padding(max(len(r["input_ids"]) for r in rows))
    input_ids, labels, positions, segments = [], [], [], []
    for r in rows:
        pad = width - len(r["input_ids"])
        lengths = r["lengths"] + ([pad] if pad else [])
        input_ids.append(r["input_ids"] + [pad_token_id] * pad)
        labels.append(r["labels"] + [IGNORE_INDEX] * pad)
        positions.append([p for n in lengths for p in range(n)])
        segments.append([k for k, n in enumerate(lengths) for _ in range(n)])
    batch = {
        "input_ids": torch.tensor(input_ids),
        "labels": torch.tensor(labels),
        "position_ids": torch.tensor(positions),
        NON_PAD_TOKENS: torch.tensor(sum(len(r["input_ids"]) for r in rows)),
    }
    if attention != "position_ids":
        batch["attention_mask"] = block_causal_mask(torch.tensor(segments), additive=attention == "additive_mask")
    return batch


def block_causal_mask(segments: torch.Tensor, additive: bool) -> torch.Tensor:
    """[batch, 1, S, S] mask letting each token see the earlier tokens of its own segment: bool, or 0 / -inf-like float."""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    if not additive:
        return allowed[:, None]
    return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def packed_attention(model) -> str:
    """How packed batches must mark sample boundaries for this model: "position_ids", "additive_mask" or "binary_mask".

    For GPT-2 this switches the model to the block-mask attention function (call it before wrapping the model).

    Raises:
        ModelError: the model type has no packed attention path here.
    """
    from finetune.model import ModelError

    model_type, implementation = model.config.model_type, model.config._attn_implementation
    kind = architecture(model_type).packed_attention
    if kind == "native":  # the model's code uses a 4-D attention mask as given
        return "position_ids" if implementation == "flash_attention_2" else "additive_mask"
    if kind == "gpt2" and hasattr(model, "transformer") and hasattr(model.transformer, "_attn_implementation"):
        from transformers.modeling_utils import AttentionInterface

        AttentionInterface.register(GPT2_PACKED, _gpt2_packed_attention)
        # GPT2Attention reads the shared config, GPT2Model its own copy taken at init.
        model.config._attn_implementation = model.transformer._attn_implementation = GPT2_PACKED
        return "binary_mask"
    supported = ", ".join(sorted(k for k, a in ARCHITECTURES.items() if a.packed_attention))
    raise ModelError(f"data.packing=true: no packed attention for model type '{model_type}' here (supported: {supported}); set data.packing=false")


def _gpt2_packed_attention(module, query, key, value, attention_mask, head_mask=None, **kwargs):
    """GPT-2 attention that reads a packed batch's block mask; every other call is GPT-2's own eager attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

    q, k = query.shape[-2], key.shape[-2]
    if attention_mask is None or q == 1 or attention_mask.shape[-1] != q * k:
        return eager_attention_forward(module, query, key, value, attention_mask, head_mask=head_mask, **kwargs)
    # GPT2Model turned the [batch, 1, q, k] bool mask it was given into an additive [batch, 1, 1, q*k] one.
    mask = attention_mask.reshape(query.shape[0], 1, q, k).to(query.dtype)
    scale = value.shape[-1] ** -0.5 if module.scale_attn_weights else 1.0
    if module.scale_attn_by_inverse_layer_idx:
        scale /= module.layer_idx + 1
    return sdpa_attention_forward(module, query, key, value, mask, dropout=kwargs.get("dropout", 0.0), scaling=scale, is_causal=False)
