"""QLoRA base models: bitsandbytes 4-bit (NF4/FP4, optional double quantization) or 8-bit weights.

Quantization goes through transformers' `from_pretrained(quantization_config=...)`, which converts
GPT-2's Conv1D projections as well as nn.Linear ones. (ColossalAI's own quantizer only swaps
nn.Linear: on GPT-2 it converts nothing and still marks the model as quantized.) After loading we
count the quantized layers and refuse a model in which a requested quantization converted nothing.

Memory: `weight_bytes` measures what the base weights occupy, from the tensors themselves: packed
4-bit/8-bit data plus their quantization state (absmax, nested absmax, code book, row scales).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from finetune.config import QuantizationConfig
from finetune.errors import FinetuneError

# Kept in full precision unless quantization.skip_modules says otherwise: the LM head (often tied to
# the embeddings, which bitsandbytes never quantizes) and classification heads, which are trained.
DEFAULT_SKIP_MODULES = ["lm_head", "score", "classifier"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class QuantizationError(FinetuneError):
    """A requested quantization did not happen."""


def compute_dtype(cfg_quant: QuantizationConfig, precision: str) -> torch.dtype:
    """The dtype quantized layers compute in: the configured one, or the run's precision for `auto`."""
    return DTYPES[precision if cfg_quant.compute_dtype == "auto" else cfg_quant.compute_dtype]


def bnb_config(cfg_quant: QuantizationConfig, precision: str, storage: str | None = None):
    """transformers' BitsAndBytesConfig for this quantization section.

    Args:
        storage: fp32, bf16 or fp16: hold the packed 4-bit data in tensors of that float dtype (bitsandbytes'
            quant_storage; the same bytes, read as floats) for a plugin that flattens parameters into float
            tensors (FSDP); None: uint8.
    """
    from transformers import BitsAndBytesConfig

    skip = cfg_quant.skip_modules or DEFAULT_SKIP_MODULES
    if cfg_quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg_quant.quant_type,
        bnb_4bit_use_double_quant=cfg_quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg_quant, precision),
        bnb_4bit_quant_storage=DTYPES[storage] if storage else torch.uint8,
        llm_int8_skip_modules=skip,  # transformers reads the skip list from this field for 4-bit too
    )


def quantized_layer_types() -> tuple[type, ...]:
    import bitsandbytes as bnb

    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_quantized(param: torch.Tensor) -> bool:
    """Whether a parameter holds bitsandbytes' packed 4-bit or 8-bit data (whatever its storage dtype), not numbers."""
    return type(param).__name__ in ("Params4bit", "Int8Params")  # by name: no bitsandbytes import for the common case


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the bitsandbytes layers in a model (the base layers under any LoRA wrapper)."""
    types = quantized_layer_types()
    return [name for name, module in model.named_modules() if isinstance(module, types)]


def check_quantized(model: nn.Module, cfg_quant: QuantizationConfig) -> dict:
    """Count quantized projections and refuse a model where the requested quantization converted nothing.

    Returns:
        {"quantized_modules": n, "unquantized_projections": [names left in full precision]}
    """
    from transformers.pytorch_utils import Conv1D

    quantized = quantized_modules(model)
    types = quantized_layer_types()
    left = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and not isinstance(m, types)]
    if not quantized:
        raise QuantizationError(
            f"quantization.bits={cfg_quant.bits}: no layer of {model.config.model_type} was quantized "
            f"({len(left)} projections left in full precision); check quantization.skip_modules"
        )
    return {"quantized_modules": len(quantized), "unquantized_projections": left}


@dataclass
class WeightBytes:
    quantized_params: int  # logical parameter count of the quantized weights
    quantized_bytes: int  # their packed data plus quantization state
    packed_bytes: int  # of which the packed data (what FSDP shards; the state is whole on every rank)
    unquantized: dict[str, dict[str, int]]  # dtype -> {"params", "bytes"} for every other parameter/buffer
    per_rank: list[WeightBytes] | None = None  # where a plugin shards the weights (FSDP): what each rank holds of them

    def as_dict(self) -> dict:
        per_param = self.quantized_bytes / self.quantized_params if self.quantized_params else None
        shares = {"per_rank": [held.as_dict() for held in self.per_rank]} if self.per_rank else {}
        return {
            "quantized": {"params": self.quantized_params, "bytes": self.quantized_bytes, "packed_bytes": self.packed_bytes, "bytes_per_param": per_param},
            "unquantized": self.unquantized,
            "total_bytes": self.quantized_bytes + sum(d["bytes"] for d in self.unquantized.values()),
            **shares,
        }


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _quant_state_bytes(weight) -> tuple[int, int, int]:
    """(logical params, bytes, packed data bytes) of one bitsandbytes weight: packed data + scales / absmax / code book."""
    state = getattr(weight, "quant_state", None)
    if state is not None:  # 4-bit: Params4bit packs two values per byte; the state holds the real shape
        packed = _tensor_bytes(weight)  # under FSDP: this rank's shard of the packed data (the state is whole on every rank)
        nbytes = packed + _tensor_bytes(state.absmax) + _tensor_bytes(state.code)
        if state.nested:  # double quantization: absmax itself is 8-bit, with its own absmax and code
            nbytes += _tensor_bytes(state.state2.absmax) + _tensor_bytes(state.state2.code)
        whole = (state.shape.numel() + 1) // 2
        return state.shape.numel() * packed // whole, nbytes, packed
    scales = getattr(weight, "SCB", None)  # 8-bit: int8 weights + one fp32 scale per output row
    return weight.numel(), _tensor_bytes(weight) + (_tensor_bytes(scales) if scales is not None else 0), _tensor_bytes(weight)


def weight_bytes(model: nn.Module) -> WeightBytes:
    """Bytes the model's weights occupy, quantized layers (with their state) apart from the rest."""
    quantized_ids, quantized_params, quantized_bytes, packed_bytes = set(), 0, 0, 0
    for module in model.modules():
        # (a pipeline stage sets the weights of the layers it does not hold to None: they occupy nothing here)
        if isinstance(module, quantized_layer_types()) and module.weight is not None:
            params, nbytes, packed = _quant_state_bytes(module.weight)
            quantized_ids.add(id(module.weight))
            quantized_params += params
            quantized_bytes += nbytes
            packed_bytes += packed
    unquantized: dict[str, dict[str, int]] = {}
    seen = set(quantized_ids)
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:  # tied weights are stored once
            continue
        seen.add(id(tensor))
        entry = unquantized.setdefault(str(tensor.dtype).removeprefix("torch."), {"params": 0, "bytes": 0})
        entry["params"] += tensor.numel()
        entry["bytes"] += _tensor_bytes(tensor)
    return WeightBytes(quantized_params, quantized_bytes, packed_bytes, unquantized)


def format_weight_bytes(weights: WeightBytes, label: str = "model weights") -> str:
    """One line: what the base weights occupy, quantized layers apart from the rest."""
    parts = [f"{dtype} {d['params'] / 1e6:.2f}M params in {d['bytes'] / 1e6:.1f} MB" for dtype, d in weights.unquantized.items()]
    if weights.quantized_params:
        per_param = weights.quantized_bytes / weights.quantized_params
        parts.insert(0, f"quantized {weights.quantized_params / 1e6:.2f}M params in {weights.quantized_bytes / 1e6:.1f} MB ({per_param:.3f} bytes/param)")
    return f"{label}: " + "; ".join(parts)


def own_unquantized_tensors(model: nn.Module) -> int:
    """Copy the unquantized parameters and buffers into memory of their own; return how many.

    On CPU, transformers loads them zero-copy from the memory-mapped safetensors file. Those few
    views keep the whole mapping alive, and with it every page the quantizer read: the full-precision
    file stays resident (GPT-2 124M: 325 MB more than the model itself), which defeats the point of
    quantizing. Tied weights stay tied: each shared Parameter object is visited once.
    """
    quantized = {id(m.weight) for m in model.modules() if isinstance(m, quantized_layer_types())}
    count = 0
    with torch.no_grad():
        for param in model.parameters():
            if id(param) not in quantized:
                param.data = param.data.clone()
                count += 1
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.clone()
                    count += 1
    return count
