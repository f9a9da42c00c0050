"""Fused forward and backward for the elementwise hot spots of a step: Llama's RMSNorm and rotary embedding, and
peft's LoRA linear (issue 24).

transformers and peft write these as chains of tensor ops, and autograd walks each link with a full-size tensor:
HF's RMSNorm backward is about seven passes over the hidden states, rotate_half's backward zero-fills and copies two
halves, and peft adds the scaled adapter output in passes of its own. Each function here computes the same values
with fewer passes and a hand-written backward:
- the forward runs the original's ops in the original's order where it can (the RMSNorm forward is bitwise HF's,
  the LoRA dropout draws peft's masks);
- it saves for backward exactly what autograd saved for the original, so the estimator's activation terms hold.
SmolLM2-135M LoRA on one CPU thread: about 5% of a step (docs/benchmarks.md, issue 24).

`install` puts them on one model (finetune.run.build_run, so the peers' runs in bench/ keep the upstream code):
- the norms and rotary embedding of architectures whose record says they are Llama's
  (Architecture.llama_norm_and_rotary);
- peft's plain LoRA linears.
Anything else keeps its own code: other versions of transformers or peft, DoRA, several adapters, autocast,
mixed dtypes, quantized or tensor-parallel base layers, layers a plugin wraps or hooks (FSDP's adapters).
"""

from __future__ import annotations

import sys
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from finetune.architectures import architecture
from finetune.fixes.peft import GUARD as PEFT  # the versions whose code this file was checked against: lora.Linear.forward
from finetune.fixes.transformers import GUARD as TRANSFORMERS  # LlamaRMSNorm and apply_rotary_pos_emb


class _RMSNorm(torch.autograd.Function):
    """LlamaRMSNorm: weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), the statistics in fp32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # noqa: D102
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        normalized = (x32 * rstd).to(x.dtype)
        ctx.dtype = x.dtype
        if ctx.needs_input_grad[1]:  # autograd kept the normalized input for the weight's gradient
            ctx.save_for_backward(x32, rstd, weight, normalized)
            return weight * normalized
        ctx.save_for_backward(x32, rstd, weight)
        # in place where the dtypes allow: the same product (it commutes), one full-size tensor less
        return normalized.mul_(weight) if weight.dtype == normalized.dtype else weight * normalized

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: D102
        x32, rstd, weight, *normalized = ctx.saved_tensors
        grad_normalized = (grad * weight).to(ctx.dtype).float()  # the casts autograd made at each link
        # d/dx of x * rstd, with rstd = (mean(x^2) + eps)^-1/2: rstd * g - x * rstd^3 * mean(g * x)
        dot = (grad_normalized * x32).sum(-1, keepdim=True)
        grad_x = grad_normalized.mul_(rstd).addcmul_(x32, dot.mul_(rstd.pow(3)).div_(-x32.shape[-1]))
        grad_weight = (grad * normalized[0]).sum(tuple(range(grad.dim() - 1))).to(weight.dtype) if normalized else None
        return grad_x.to(ctx.dtype), grad_weight, None


def rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm.forward, fused."""
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


class _Rotary(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1): two passes, where HF's chain takes about
    five forward and ten backward. The backward is the same rotation by -sin."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # noqa: D102
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: D102
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        grad_x = grad * cos
        grad_x[..., :half].addcmul_(grad[..., half:], sin[..., half:])
        grad_x[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
        return grad_x, None, None


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids=None, unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb (Llama's), fused; the same signature."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _Rotary.apply(q, cos, sin), _Rotary.apply(k, cos, sin)


def _dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """F.dropout(x, p)'s draws in training: (x times the mask, the mask, the factor still owed to the product).

    On CPU F.dropout multiplies x by bernoulli(1 - p) noise in x's dtype divided by 1 - p. The same draws come about
    four times faster into a bool tensor (the generator advances alike); the mask is kept in x's dtype, as autograd
    kept F.dropout's noise, and the division is left to the adapter's small tensors (a full-size pass less, rounded
    once differently). Elsewhere the fused kernel's scaled output and bool mask, as F.dropout returns them.
    """
    if x.device.type == "cpu":
        noise = torch.empty(x.shape, dtype=torch.bool).bernoulli_(1 - p).to(x.dtype)
        return x * noise, noise, 1 / (1 - p)
    dropped, mask = torch.native_dropout(x, p, True)
    return dropped, mask, 1.0


class _LoraLinear(torch.autograd.Function):
    """A frozen nn.Linear plus LoRA: x W^T + b + scaling * B A dropout(x). The adapter's output is added inside the
    second small matmul (addmm's alpha), and its input gradient inside the dropout's backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float):  # noqa: D102
        dropped, mask, owed = _dropout(x, p) if p > 0 else (x, None, 1.0)
        down = F.linear(dropped, lora_a)
        out = F.linear(x, weight, bias).contiguous()
        out.view(-1, out.shape[-1]).addmm_(down.reshape(-1, down.shape[-1]), lora_b.t(), alpha=scaling * owed)
        ctx.save_for_backward(weight, lora_a, lora_b, mask, dropped, down)
        ctx.scaling, ctx.p = scaling * owed, p
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: D102
        weight, lora_a, lora_b, mask, dropped, down = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_down = (grad2 @ lora_b).mul_(ctx.scaling)
        grad_b = (grad2.t() @ down.reshape(-1, down.shape[-1])).mul_(ctx.scaling) if ctx.needs_input_grad[4] else None
        grad_a = grad_down.t() @ dropped.reshape(-1, dropped.shape[-1]) if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad2 @ weight
            through_adapter = grad_down @ lora_a
            if mask is None:
                grad_x.add_(through_adapter)
            elif mask.dtype == torch.bool:
                grad_x.add_(torch.native_dropout_backward(through_adapter, mask, 1 / (1 - ctx.p)))
            else:
                grad_x.addcmul_(through_adapter, mask.reshape(through_adapter.shape))
            grad_x = grad_x.view(*grad.shape[:-1], weight.shape[1])
        return grad_x, None, None, grad_a, grad_b, None, None


def _fusable(layer: nn.Module, x: torch.Tensor) -> str | None:
    """The one active adapter of a peft lora.Linear when the fused path computes what peft would, else None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or layer.use_dora[name] or not isinstance(layer.lora_dropout[name], (nn.Dropout, nn.Identity)):
        return None
    base, linears = layer.base_layer, (layer.base_layer, layer.lora_A[name], layer.lora_B[name])
    # plain nn.Linear, whose forward nothing watches: not a tensor-parallel or quantized layer, nor one a plugin wrapped
    # or hooked (FSDP gathers an adapter wrapped on its own in its forward hook)
    if any(type(m) is not nn.Linear or m._forward_pre_hooks or m._forward_hooks for m in linears):
        return None
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        return None
    return name if x.dtype == base.weight.dtype == layer.lora_A[name].weight.dtype == layer.lora_B[name].weight.dtype else None


def lora_linear_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft lora.Linear.forward, fused where `_fusable`; peft's own otherwise."""
    name = None if args or kwargs else _fusable(self, x)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    return _LoraLinear.apply(x, self.base_layer.weight, self.base_layer.bias, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p)


UPSTREAM_ROTARY: dict[str, Callable] = {}  # transformers' own apply_rotary_pos_emb of each module `install` changed


def install(model: nn.Module) -> list[str]:
    """Put the fused functions on `model` where they compute what its own code does; returns what was fused."""
    fused = []
    if architecture(getattr(model.config, "model_type", None)).llama_norm_and_rotary and TRANSFORMERS.matches():
        norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm") and type(m).__module__.startswith("transformers.models.")]
        for norm in norms:
            norm.forward = types.MethodType(rms_norm_forward, norm)
        # A module global, read by the attention forward at each call: every model of that module in this process.
        for modeling in {sys.modules[type(norm).__module__] for norm in norms}:
            UPSTREAM_ROTARY.setdefault(modeling.__name__, modeling.apply_rotary_pos_emb)
            modeling.apply_rotary_pos_emb = apply_rotary_pos_emb
        fused += ["RMSNorm", "rotary embedding"] if norms else []
    if PEFT.matches():
        from peft.tuners.lora.layer import Linear

        linears = [m for m in model.modules() if type(m) is Linear and type(m.base_layer) is nn.Linear]
        for linear in linears:
            linear.forward = types.MethodType(lora_linear_forward, linear)
        fused += ["LoRA linear"] if linears else []
    return fused
