"""QLoRA with tensor parallelism (method=qlora with plugin.tp_size > 1): shard in full precision, then quantize each shard.

bitsandbytes cannot split a 4-bit weight, so the model is built in float32 (no quantization_config),
LoRA is injected and shardformer shards every projection with its adapter as LoRA+TP does
(finetune.lora_tp); then each rank quantizes its own shard of every projection to NF4/FP4
(`Linear4bitParallel`) and computes it with bitsandbytes' 4-bit matmul.

Why the shards equal the whole model's quantization (tests/unit/test_quantization.py checks it bit for bit):
bitsandbytes quantizes a weight (out, in) flattened row-major, in blocks of BLOCK elements, each with its
own absmax. A column-parallel shard (a range of output rows) is a contiguous range of the flattened
weight: its blocks are the whole's when it starts on a block boundary, (out / tp) * in a multiple of
BLOCK. A row-parallel shard (a range of input columns) is a strided piece: its blocks are the whole's
when every row of it is whole blocks, in / tp a multiple of BLOCK (then the shard's packed data is the
whole's viewed (out, in / 2) with those columns, its absmax the whole's viewed (out, in / BLOCK)).
Other shapes are refused at config time (finetune.core.plugins.hybrid.misaligned_projections). Double
quantization is refused under tensor parallelism: it quantizes the absmax values again in blocks of 256
offset by their mean over the whole weight, which a row-parallel shard cannot reproduce. 8-bit (LLM.int8) is refused too: it scales each
output row by its absmax over the whole row, which a row-parallel shard splits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from finetune.config import QuantizationConfig
from finetune.core.plugins.hybrid import QUANT_BLOCK as BLOCK
from finetune.errors import FinetuneError
from finetune.lora_tp import LoraParallelLinear, add_bias, lora_aware, lora_policy


class QuantizedShardError(FinetuneError):
    """A tensor-parallel shard cannot be quantized as the whole model would be."""


@dataclass(frozen=True)
class ShardQuantization:
    """How each rank quantizes its shards: the quantization section's 4-bit type and the compute dtype."""

    quant_type: str
    compute_dtype: torch.dtype
    skip_modules: tuple[str, ...]

    @classmethod
    def of(cls, cfg_quant: QuantizationConfig, precision: str) -> ShardQuantization:
        """From the run's quantization section and train.precision (config validation refused 8-bit and double quantization)."""
        from finetune.quantization import DEFAULT_SKIP_MODULES, compute_dtype

        return cls(cfg_quant.quant_type, compute_dtype(cfg_quant, precision), tuple(cfg_quant.skip_modules or DEFAULT_SKIP_MODULES))

    def quantizes(self, suffix: str) -> bool:
        """Whether the module at a policy's `suffix` is quantized (the quantization's skip list names the last component)."""
        return suffix.rsplit(".", 1)[-1] not in self.skip_modules

    def quantize(self, weight: torch.Tensor):
        """A float weight (out, in), e.g. one rank's shard, as bitsandbytes' Params4bit (what transformers makes of a whole one)."""
        import bitsandbytes as bnb

        param = bnb.nn.Params4bit(weight.detach().float().contiguous(), requires_grad=False, compress_statistics=False, quant_type=self.quant_type)
        param = param.to(weight.device)  # bitsandbytes quantizes when the weight moves to its device
        if param.quant_state.blocksize != BLOCK:
            raise QuantizedShardError(f"bitsandbytes quantized in blocks of {param.quant_state.blocksize}, not {BLOCK}: the shard alignment checked at config time does not hold")
        return param


@functools.cache
def _linear4bit_parallel_class() -> type:
    import bitsandbytes as bnb

    class Linear4bitParallel(bnb.nn.Linear4bit):
        """One rank's shard of a column- or row-parallel projection, quantized to 4 bits.

        Computes as shardformer's Linear1D_Col / Linear1D_Row (the same communication), with bitsandbytes'
        4-bit matmul on the local shard; `weight` and `bias` keep the names of the whole layer.
        """

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            from colossalai.shardformer.layer._operation import reduce_backward, reduce_forward, split_forward_gather_backward

            if self.column:
                return add_bias(self, self.local_product(reduce_backward(x, self.process_group)))
            if not self.parallel_input:
                x = split_forward_gather_backward(x, -1, self.process_group)
            return add_bias(self, reduce_forward(self.local_product(x), self.process_group))

        def local_product(self, x: torch.Tensor) -> torch.Tensor:
            """x times this rank's shard: no bias, no communication (Linear4bit.forward's matmul)."""
            out = bnb.matmul_4bit(x.to(self.compute_dtype), self.weight, bias=None, quant_state=self.weight.quant_state)
            return out.to(x.dtype)

    return Linear4bitParallel


@dataclass(frozen=True)
class DeferredQuantization:
    """A shard whose weights are still to be read (a deferred build, finetune.deferred): how to quantize it once they are,
    and where its split lies in the whole weight (dim, start, stop)."""

    quant: ShardQuantization
    column: bool
    process_group: object
    split: tuple[int, int, int]


DEFERRED_ATTR = "finetune_deferred_quantization"


def quantize_sharded(layer: nn.Module, quant: ShardQuantization, column: bool, process_group, weights_pending: bool = False) -> nn.Module:
    """A shardformer Linear1D_Col / Linear1D_Row holding a float shard, as a Linear4bitParallel holding it quantized.

    weights_pending: the model was built without its weights (finetune.deferred), so the shard holds no values yet: it is
    returned marked, its float weight dropped, for quantize_deferred_shards to quantize once the weights are read.
    """
    from finetune.lora_tp import split_range

    if weights_pending:
        split = split_range(layer.weight)
        if split is None:
            raise QuantizedShardError(f"a {type(layer).__name__} split other than along one dim cannot be quantized from a deferred build")
        setattr(layer, DEFERRED_ATTR, DeferredQuantization(quant, column, process_group, split))
        layer.weight = None  # no float copy of a weight held in 4 bits
        return layer
    out_features, in_features = layer.weight.shape
    quantized = _linear4bit_parallel_class()(
        in_features, out_features, bias=False, compute_dtype=quant.compute_dtype, compress_statistics=False, quant_type=quant.quant_type, device="meta"
    )
    quantized.weight = quant.quantize(layer.weight.data)
    quantized.weight.module = quantized
    quantized.quant_state = quantized.weight.quant_state
    quantized.bias = layer.bias  # frozen; split with the output rows (column) or whole (row), as shardformer left it
    quantized.support_avx512bf16_for_cpu = False  # its inference-only repacking has no backward (finetune.fixes.bitsandbytes)
    quantized.column, quantized.process_group = column, process_group
    quantized.skip_bias_add = getattr(layer, "skip_bias_add", False)
    quantized.parallel_input = getattr(layer, "parallel_input", True)
    return quantized


def quantizing(target: type, quant: ShardQuantization, weights_pending: bool) -> type:
    """A stand-in for a (LoRA-aware) shardformer layer class that quantizes the shard it makes (weights_pending: marks it
    to be quantized once the weights are read, quantize_sharded)."""

    class QuantizedShard:
        @staticmethod
        def from_native_module(module: nn.Module, process_group=None, **kwargs) -> nn.Module:
            from colossalai.shardformer.layer import Linear1D_Col, Linear1D_Row

            sharded = target.from_native_module(module, process_group=process_group, **kwargs)
            if isinstance(sharded, LoraParallelLinear):
                sharded.base_layer = quantize_sharded(sharded.base_layer, quant, sharded.column, process_group, weights_pending)
                return sharded
            if isinstance(sharded, (Linear1D_Col, Linear1D_Row)):
                if kwargs.get("seq_parallel_mode") or kwargs.get("fp8_communication") or kwargs.get("gather_output") or kwargs.get("stream_chunk_num", 1) > 1:
                    raise QuantizedShardError(f"a 4-bit {type(sharded).__name__}: sequence parallelism, fp8 communication and gathered outputs are not supported")
                return quantize_sharded(sharded, quant, isinstance(sharded, Linear1D_Col), process_group, weights_pending)
            raise QuantizedShardError(f"{type(module).__name__} sharded as {type(sharded).__name__} cannot be quantized per shard")

    QuantizedShard.__qualname__ = f"Quantized{getattr(target, '__qualname__', target.__name__)}"
    return QuantizedShard


def qlora_policy(model: nn.Module, policy, quant: ShardQuantization):
    """lora_policy's policy (LoRA layers sharded with their adapters), each split projection the quantization does not
    skip then quantized on its rank: at once, or, for a model built without its weights, once load_deferred has read them."""
    from colossalai.shardformer.layer import Linear1D_Col, Linear1D_Row

    from finetune.deferred import pending

    policy = lora_policy(model, policy)
    module_policy = policy.module_policy
    splits = (lora_aware(Linear1D_Col), lora_aware(Linear1D_Row))
    weights_pending = pending(model) is not None

    def quantized_module_policy():
        descriptions = module_policy()
        for description in descriptions.values():
            for replacement in description.sub_module_replacement or []:
                if replacement.target_module in splits and quant.quantizes(replacement.suffix):
                    replacement.target_module = quantizing(replacement.target_module, quant, weights_pending)
        return descriptions

    policy.module_policy = quantized_module_policy  # this instance only
    return policy


def quantize_deferred_shards(model: nn.Module, pending) -> None:
    """Quantize the shards quantize_sharded left marked, each from its split of the pretrained weights (`pending`:
    finetune.deferred.Pending) read in float32 as the eager build quantizes them, on CPU, then moved beside the layer's
    other tensors; every rank calls this after its other weights are loaded. Nothing marked: nothing to do."""
    from finetune.checkpoint.files import OpenFiles, weight_errors, weight_files, weight_key
    from finetune.lora_tp import read_range

    marked = [(name, module) for name, module in model.named_modules() if hasattr(module, DEFERRED_ATTR)]
    if not marked:
        return
    device = next(p.device for p in model.parameters())
    with weight_errors(pending.path, "model.name"):
        files = weight_files(pending.path, "model.name")
        keys = {name: weight_key(files, pending.stored_names(f"{name}.weight") or [f"{name}.weight"], pending.path, "model.name") for name, _ in marked}
        with OpenFiles(files) as opened, torch.no_grad():
            for name, layer in marked:
                todo = getattr(layer, DEFERRED_ATTR)
                delattr(layer, DEFERRED_ATTR)
                layer.weight = nn.Parameter(read_range(opened[keys[name]], keys[name], *todo.split).float(), requires_grad=False)
                quantized = quantize_sharded(layer, todo.quant, todo.column, todo.process_group).to(device)
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, quantized)
