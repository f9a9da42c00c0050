"""LoRA adapters on tensor-parallel layers (method=lora with plugin.tp_size > 1).

ColossalAI 0.5.0 refuses LoRA with tensor parallelism (`HybridParallelPlugin.enable_lora` asserts
tp_size == 1). Here peft's LoRA layers are injected into the plain model first (model.inject_lora);
then, while shardformer shards the model, every projection that carries an adapter is sharded
together with it (`lora_policy` wraps the model's policy; `LoraParallelLinear` is the sharded layer).

How the adapter W + B A (A: r x in, B: out x r) is split, for a layer whose base weight is split:

- column-parallel base (output features split; Llama q/k/v/gate/up, GPT-2 c_attn/c_fc): B is split
  by output rows like the base weight, A is replicated. GPT-2's fused qkv (c_attn) splits B's rows
  per q, k and v exactly as shardformer splits the fused weight. The input gradient of the base and
  of the adapter are summed before the layer's one all-reduce (no second one); A's gradient is a
  partial sum on each rank and is all-reduced over the tensor-parallel group (r x in numbers).
- row-parallel base (input features split; Llama o_proj/down_proj, GPT-2 c_proj): A is split by
  input columns like the base weight, B is replicated. The adapter's partial output B (A_i x_i) is
  added to the base's partial output before the layer's one all-reduce; B's gradient is a partial
  sum and is all-reduced over the tensor-parallel group (out x r numbers).

Under sequence parallelism over the tensor-parallel group (split_gather, ring) the sequence is gathered before
a column-parallel layer and reduce-scattered after a row-parallel one instead of the all-reduces above; the
adapter's input and partial output take part in the same exchange.

adapters_disabled switches every adapter off (the preference reference under LoRA: the model itself without its
adapters), peft's injected layers and the sharded ones alike.

Communication added per adapted layer and step: one all-reduce of r x in (column) or out x r (row)
numbers in the backward pass; nothing in the forward pass. Split adapter weights are marked as
distributed tensors, so gradient clipping counts them once, and `state_dict()` gathers them into
the unsharded peft layout (and `load_state_dict` / `local_shard` split a full adapter again).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from finetune.errors import FinetuneError

ADAPTER = "default"  # peft's adapter name; one adapter per model here


class LoraTensorParallelError(FinetuneError):
    """A LoRA layer cannot be sharded for tensor parallelism."""


def _layer_classes() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(column-parallel, row-parallel, weight stored (in, out) as in Conv1D) shardformer layer classes."""
    from colossalai.shardformer.layer import GPT2FusedLinearConv1D_Col, GPT2FusedLinearConv1D_Row, Linear1D_Col, Linear1D_Row

    return (Linear1D_Col, GPT2FusedLinearConv1D_Col), (Linear1D_Row, GPT2FusedLinearConv1D_Row), (GPT2FusedLinearConv1D_Col, GPT2FusedLinearConv1D_Row)


@functools.cache
def _adapter_linear_class() -> type:
    from colossalai.shardformer.layer.parallel_module import ParallelModule

    class ShardedAdapterLinear(ParallelModule):
        """A LoRA A or B matrix holding only this rank's split; its state dict holds the whole matrix."""

        def __init__(self, weight: nn.Parameter):
            super().__init__()
            self.weight = weight  # the same Parameter object: the optimizer built before boosting keeps it

        @staticmethod
        def from_native_module(module, process_group=None, **kwargs):
            raise NotImplementedError("built by LoraParallelLinear")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.weight)

    return ShardedAdapterLinear


class LoraParallelLinear(nn.Module):
    """A column- or row-parallel base layer with a LoRA adapter split to match it.

    Attribute names are peft's (base_layer, lora_A, lora_B, lora_dropout), so parameter names and
    state-dict keys are those of the unsharded peft model.
    """

    adapter_off = False  # the base layer alone (adapters_disabled), its communication unchanged

    def __init__(self, base_layer: nn.Module, lora_layer: nn.Module, column: bool, conv_weight: bool, process_group):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A, self.lora_B, self.lora_dropout = lora_layer.lora_A, lora_layer.lora_B, lora_layer.lora_dropout
        self.scaling = lora_layer.scaling[ADAPTER]
        self.column, self.conv_weight, self.process_group = column, conv_weight, process_group

    def _base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's local product, without bias and without communication (a 4-bit shard's own: finetune.qlora_tp)."""
        if hasattr(self.base_layer, "local_product"):
            return self.base_layer.local_product(x)
        return torch.matmul(x, self.base_layer.weight) if self.conv_weight else F.linear(x, self.base_layer.weight)

    def _with_bias(self, out: torch.Tensor):
        return add_bias(self.base_layer, out)

    def forward(self, x: torch.Tensor):
        from colossalai.shardformer.layer._operation import (
            gather_forward_reducescatter_backward,
            reduce_backward,
            reduce_forward,
            reducescatter_forward_gather_backward,
            split_forward_gather_backward,
        )

        lora_a, lora_b, dropout = self.lora_A[ADAPTER], self.lora_B[ADAPTER], self.lora_dropout[ADAPTER]
        # Sequence parallelism over the tensor-parallel group (split_gather, ring): between layers each rank
        # holds a part of the sequence, gathered before a column layer and reduce-scattered after a row
        # layer, in place of the all-reduce (ring mode overlaps the same exchange with the matmul; here it is one step).
        # (GPT-2's fused Conv1D layers have no seq_parallel_dim: sequence parallelism is Llama-only, refused for them)
        over_sequence = getattr(self.base_layer, "seq_parallel_mode", None) in ("split_gather", "ring")
        dim = self.base_layer.seq_parallel_dim if over_sequence else None
        if self.column:
            # x is the same on every rank: its gradient (base + adapter parts) is all-reduced (reduce-scattered) once.
            x = gather_forward_reducescatter_backward(x, self.process_group, dim) if over_sequence else reduce_backward(x, self.process_group)
            out = self._base_matmul(x)
            if not self.adapter_off:
                out = out + lora_b(F.linear(dropout(x), reduce_backward(lora_a.weight, self.process_group))) * self.scaling
            return self._with_bias(out)
        if not self.base_layer.parallel_input:
            x = split_forward_gather_backward(x, -1, self.process_group)
        # x holds this rank's input features: the adapter's partial output joins the base's all-reduce.
        partial = self._base_matmul(x)
        if not self.adapter_off:
            partial = partial + F.linear(lora_a(dropout(x)), reduce_backward(lora_b.weight, self.process_group)) * self.scaling
        summed = reducescatter_forward_gather_backward(partial, self.process_group, dim) if over_sequence else reduce_forward(partial, self.process_group)
        return self._with_bias(summed)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """`model` with every LoRA adapter off, as peft's PeftModel.disable_adapter for a model whose adapters were injected
    (model.inject_lora: no PeftModel) and, under tensor parallelism, sharded (LoraParallelLinear)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    peft_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    sharded = [m for m in model.modules() if isinstance(m, LoraParallelLinear)]
    for layer in peft_layers:
        layer.enable_adapters(False)
    for layer in sharded:
        layer.adapter_off = True
    try:
        yield
    finally:
        for layer in peft_layers:
            layer.enable_adapters(True)
        for layer in sharded:
            layer.adapter_off = False


def add_bias(layer: nn.Module, out: torch.Tensor):
    """A sharded layer's output with its bias, or (output, bias) where the next op (a fused bias + activation) adds it."""
    if layer.skip_bias_add:
        return out, layer.bias
    return out if layer.bias is None else out + layer.bias


def _shard_adapter_matrix(linear: nn.Linear, process_group, dim: int, split_sizes: list[int] | None) -> nn.Module:
    """Keep this rank's split of a LoRA matrix (in place, same Parameter), marked for gathering."""
    from colossalai.shardformer.layer import qkv_fused_linear
    from colossalai.tensor.d_tensor.api import (
        customized_distributed_tensor_to_existing_param,
        distribute_tensor_with_customization,
        shard_colwise,
        shard_rowwise,
        sharded_tensor_to_existing_param,
    )

    weight = linear.weight
    with torch.no_grad():
        if split_sizes and len(split_sizes) > 1:  # fused q/k/v rows, split per projection like the base
            # Looked up at call time: finetune.fixes.colossalai replaces the gather function on CPU.
            sharded = distribute_tensor_with_customization(
                weight.data,
                lambda t: qkv_fused_linear.split_fused_qkv_in_gpt2_style(t, split_sizes, process_group, False),
                lambda t: qkv_fused_linear.gather_fused_qkv_in_gpt2_style(t, split_sizes, process_group, False),
            )
            customized_distributed_tensor_to_existing_param(sharded, weight)
        else:
            sharded = (shard_rowwise if dim == 0 else shard_colwise)(weight.data, process_group)
            sharded_tensor_to_existing_param(sharded, weight)
    return _adapter_linear_class()(weight)


def shard_lora_layer(lora_layer: nn.Module, base_class: type, process_group, **kwargs) -> nn.Module:
    """Shard a peft LoRA layer's base with shardformer's `base_class`, and its adapter to match.

    Raises:
        LoraTensorParallelError: the layer kind or its options have no adapter sharding here.
    """
    column_classes, row_classes, conv_classes = _layer_classes()
    name = type(lora_layer.base_layer).__name__
    if base_class not in column_classes + row_classes:
        raise LoraTensorParallelError(f"LoRA on a {name} sharded as {base_class.__name__} is not supported under tensor parallelism")
    if list(lora_layer.lora_A) != [ADAPTER] or getattr(lora_layer, "use_dora", {}).get(ADAPTER):
        raise LoraTensorParallelError("tensor-parallel LoRA supports one plain LoRA adapter per layer (no DoRA, no extra adapters)")
    if kwargs.get("seq_parallel_mode") not in (None, "split_gather", "ring") or kwargs.get("fp8_communication") or kwargs.get("gather_output") or kwargs.get("stream_chunk_num", 1) > 1:
        raise LoraTensorParallelError(f"LoRA on {name} under tensor parallelism: sequence parallelism other than split_gather/ring, fp8 communication and gathered outputs are not supported")
    base = base_class.from_native_module(lora_layer.base_layer, process_group=process_group, **kwargs)
    if base is lora_layer.base_layer:  # shardformer left a layer too small to split unsharded
        return lora_layer
    column = base_class in column_classes
    adapter = lora_layer.lora_B if column else lora_layer.lora_A
    adapter[ADAPTER] = _shard_adapter_matrix(adapter[ADAPTER], process_group, dim=0 if column else 1, split_sizes=kwargs.get("split_sizes") if column else None)
    return LoraParallelLinear(base, lora_layer, column, base_class in conv_classes, process_group)


_LORA_AWARE: dict[type, type] = {}


def lora_aware(base_class: type) -> type:
    """A stand-in for a shardformer layer class: shards peft LoRA layers with their adapter, others as before."""
    if base_class not in _LORA_AWARE:

        class LoraAware:
            @staticmethod
            def from_native_module(module: nn.Module, process_group=None, **kwargs) -> nn.Module:
                from peft.tuners.lora import LoraLayer

                if isinstance(module, LoraLayer):
                    return shard_lora_layer(module, base_class, process_group, **kwargs)
                return base_class.from_native_module(module, process_group=process_group, **kwargs)

        LoraAware.__qualname__ = f"LoraAware{base_class.__name__}"
        _LORA_AWARE[base_class] = LoraAware
    return _LORA_AWARE[base_class]


def lora_policy(model: nn.Module, policy=None):
    """The shardformer policy for `model` (its own, or `policy`), sharding LoRA layers with their adapters."""
    from colossalai.shardformer.policies.auto_policy import get_autopolicy

    policy = policy or get_autopolicy(model)
    module_policy = policy.module_policy

    def lora_module_policy():
        descriptions = module_policy()
        for description in descriptions.values():
            for replacement in description.sub_module_replacement or []:
                replacement.target_module = lora_aware(replacement.target_module)
        return descriptions

    policy.module_policy = lora_module_policy  # this instance only
    return policy


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly tensor-parallel split) parameter; a collective for split ones."""
    from colossalai.checkpoint_io.utils import gather_distributed_param

    return gather_distributed_param(param)


def full_like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """The whole, unpadded tensor of `local`, a tensor split (and padded) the way `param` is, e.g. its Adam
    moment; a collective over the tensor-parallel group for split parameters."""
    from colossalai.tensor.d_tensor import Layout, ShardingSpec, get_global_shape, get_layout, is_customized_distributed_tensor, is_distributed_tensor
    from colossalai.tensor.d_tensor.api import layout_converter
    from colossalai.tensor.padded_tensor import is_padded_tensor

    if is_distributed_tensor(param):
        layout = get_layout(param)
        whole = Layout(device_mesh=layout.device_mesh, sharding_spec=ShardingSpec(local.dim(), {}), global_shape=get_global_shape(param))
        local = layout_converter.apply(local, layout, whole)
    elif is_customized_distributed_tensor(param):
        local = param.gather_fn(local)
    if is_padded_tensor(param):  # a vocabulary padded to split evenly: the padding rows are no one's
        local = local.narrow(param._padding_dim, 0, param._origin_length)
    return local


def shard_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's split of a whole, unpadded tensor (full_like's inverse): padded and split the way `param` is."""
    from colossalai.tensor.padded_tensor import is_padded_tensor

    if is_padded_tensor(param) and full.shape[param._padding_dim] < param._current_length:
        shape = list(full.shape)
        shape[param._padding_dim] = param._current_length - shape[param._padding_dim]
        full = torch.cat([full, full.new_zeros(shape)], dim=param._padding_dim)
    local = local_shard(param, full)
    return torch.empty(local.shape, dtype=local.dtype, device=local.device).copy_(local)  # a plain tensor: no layout attributes


def read_split(reader, key: str, param: torch.Tensor) -> torch.Tensor:
    """This rank's split of tensor `key` of a safetensors file (`reader`: safe_open) holding the whole, unpadded
    tensor split like `param`: only its rows or columns are read where `param` is split along one dim, the
    whole tensor otherwise (then split: fused q/k/v rows interleave)."""
    cut = split_range(param)
    if cut is None:
        return shard_like(param, reader.get_tensor(key))
    dim = cut[0]
    piece = read_range(reader, key, *cut)
    if piece.shape[dim] < param.shape[dim]:  # the vocabulary's padding rows: no one's, zero
        shape = list(piece.shape)
        shape[dim] = param.shape[dim] - shape[dim]
        piece = torch.cat([piece, piece.new_zeros(shape)], dim=dim)
    return piece


def read_range(reader, key: str, dim: int, start: int, stop: int) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) start:stop of tensor `key` of a safetensors file (`reader`: safe_open), and no more."""
    # a copy: the slice may borrow the file's memory, which is gone once the file is closed
    return reader.get_slice(key)[(slice(None),) * dim + (slice(start, stop),)].clone()


def split_range(param: torch.Tensor) -> tuple[int, int, int] | None:
    """(dim, start, stop): where this rank's split of a parameter split along one dim lies in the whole,
    unpadded tensor; None where it is not split that way."""
    import torch.distributed as dist
    from colossalai.tensor.d_tensor import get_device_mesh, get_sharding_spec, is_distributed_tensor
    from colossalai.tensor.padded_tensor import is_padded_tensor

    if not is_distributed_tensor(param) or len(get_sharding_spec(param).dim_partition_dict) != 1:
        return None
    ((dim, axes),) = get_sharding_spec(param).dim_partition_dict.items()
    if len(axes) != 1 or (is_padded_tensor(param) and param._padding_dim != dim):
        return None
    length = param.shape[dim]
    start = dist.get_rank(get_device_mesh(param).get_process_group(axes[0])) * length
    stop = min(start + length, param._origin_length) if is_padded_tensor(param) else start + length
    return dim, start, max(start, stop)


def local_shard(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's split of a whole tensor, split the way `param` is."""
    from colossalai.tensor.d_tensor import distribute_tensor, get_device_mesh, get_sharding_spec, is_customized_distributed_tensor, is_distributed_tensor

    if is_distributed_tensor(param):
        return distribute_tensor(full, get_device_mesh(param), get_sharding_spec(param))
    if is_customized_distributed_tensor(param):
        return param.shard_fn(full)
    return full
