"""finetune.fused: the fused RMSNorm, rotary embedding and LoRA linear compute what transformers' and peft's code
computes (the loss and every gradient within 1e-5 of the largest, LoRA dropout drawing peft's very masks), save
for backward the bytes autograd saved for the original (what the estimator counts), and stay off wherever they
would not compute the same thing."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from finetune import fused
from finetune.architectures import ARCHITECTURES, NAMED_CONFIGS
from finetune.config import load_config
from finetune.model import build_lora_config, build_model

TINY = {}  # model_type -> the first tiny named config of it
for _name, (_type, _) in NAMED_CONFIGS.items():
    if _name.startswith("tiny-"):
        TINY.setdefault(_type, _name)
FUSED_TYPES = sorted(a.model_type for a in ARCHITECTURES.values() if a.llama_norm_and_rotary)


@pytest.fixture
def upstream_rotary(monkeypatch):
    """transformers' own apply_rotary_pos_emb in every modeling module while a test runs (another test in this
    process may have installed the fused one); the fused ones come back after it."""
    for module_name, function in fused.UPSTREAM_ROTARY.items():
        monkeypatch.setattr(sys.modules[module_name], "apply_rotary_pos_emb", function)
    yield monkeypatch
    for module_name in fused.UPSTREAM_ROTARY:  # what the test's install changed, back to upstream for the next test
        monkeypatch.setattr(sys.modules[module_name], "apply_rotary_pos_emb", fused.UPSTREAM_ROTARY[module_name])


def tiny(model_type: str, method: str) -> nn.Module:
    """A tiny model of `model_type` in train mode; under LoRA (dropout 0.5) with random lora_B, so the adapters count."""
    cfg = load_config([f"model.name={TINY[model_type]}", "lora.dropout=0.5"])
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, 0)
    if method == "lora":
        model = get_peft_model(model, build_lora_config(model, cfg.lora))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(param, std=0.05)
    return model.train()


def loss_and_gradients(model: nn.Module, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(5)  # the same dropout draws for both models
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("model_type", FUSED_TYPES)
def test_a_fused_model_computes_the_loss_and_gradients_of_its_own_code(model_type, method, upstream_rotary):
    model = tiny(model_type, method)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    expected_loss, expected = loss_and_gradients(reference, ids)
    assert fused.install(model) == ["RMSNorm", "rotary embedding", *(["LoRA linear"] if method == "lora" else [])]
    loss, gradients = loss_and_gradients(model, ids)
    assert loss == pytest.approx(expected_loss, rel=1e-6)  # a different dropout mask would move it by far more
    assert gradients.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(gradients[name], grad, rtol=0, atol=1e-5 * grad.abs().max().item(), msg=name)


def saved_bytes(compute, module: nn.Module | None = None) -> int:
    """Bytes of the tensors autograd saves for backward while `compute()` runs, each storage once, `module`'s
    parameters (and views of them, such as a weight's transpose) not counted."""
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()} if module is not None else set()
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in parameters:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compute()
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_the_fused_norm_saves_what_autograd_saved_and_matches_it(dtype, weight_trains):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(64).to(dtype)
    nn.init.normal_(norm.weight, 1.0, 0.1)
    norm.weight.requires_grad_(weight_trains)
    x = torch.randn(3, 5, 64, dtype=dtype).mul_(3).requires_grad_()
    grad = torch.randn(3, 5, 64, dtype=dtype)
    results = {}
    for name, forward in (("upstream", lambda: LlamaRMSNorm.forward(norm, x)), ("fused", lambda: fused.rms_norm_forward(norm, x))):
        x.grad = norm.weight.grad = None
        out = []
        nbytes = saved_bytes(lambda: out.append(forward()), norm)
        out[0].backward(grad)
        results[name] = (nbytes, out[0], x.grad.clone(), norm.weight.grad.clone() if weight_trains else None)
    assert results["fused"][0] == results["upstream"][0]
    if dtype == torch.float32:
        assert torch.equal(results["fused"][1], results["upstream"][1])  # the forward runs HF's ops in HF's order
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: a rounding or two apart
    for got, want in zip(results["fused"][1:], results["upstream"][1:]):
        if want is not None:
            torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tolerance * want.abs().max().item())


def test_the_fused_rotary_embedding_saves_what_autograd_saved_and_matches_it(upstream_rotary):
    from transformers.models.llama import modeling_llama

    q = torch.randn(2, 8, 4, 16).transpose(1, 2).requires_grad_()  # (batch, heads, positions, head_dim), as attention views it
    k = torch.randn(2, 8, 2, 16).transpose(1, 2).requires_grad_()
    angles = torch.randn(2, 8, 8)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    results = {}
    for name, rotate in (("upstream", modeling_llama.apply_rotary_pos_emb), ("fused", fused.apply_rotary_pos_emb)):
        q.grad = k.grad = None
        out = []
        nbytes = saved_bytes(lambda: out.extend(rotate(q, k, cos, sin)))
        (out[0].square().sum() + out[1].pow(3).sum()).backward()
        results[name] = (nbytes, *out, q.grad.clone(), k.grad.clone())
    assert results["fused"][0] == results["upstream"][0]
    for got, want in zip(results["fused"][1:], results["upstream"][1:]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def lora_linear(**config) -> nn.Module:
    """peft's lora.Linear around a 32 -> 24 nn.Linear with a bias, lora_B random."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(32, 24)), LoraConfig(r=4, lora_alpha=12, target_modules=["0"], **config))
    layer = model.base_model.model[0]
    nn.init.normal_(layer.lora_B["default"].weight)
    return layer.train()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_fused_lora_linear_draws_peft_masks_saves_what_it_saved_and_matches_it(dropout):
    layer = lora_linear(lora_dropout=dropout)
    x = torch.randn(3, 7, 32).requires_grad_()
    grad = torch.randn(3, 7, 24)
    results = {}
    for name, forward in (("upstream", lambda: type(layer).forward(layer, x)), ("fused", lambda: fused.lora_linear_forward(layer, x))):
        x.grad = None
        for param in layer.parameters():
            param.grad = None
        torch.manual_seed(3)
        out = []
        nbytes = saved_bytes(lambda: out.append(forward()), layer)
        out[0].backward(grad)
        results[name] = (nbytes, out[0], x.grad.clone(), layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone())
    assert results["fused"][1].grad_fn.name() == "_LoraLinearBackward"
    assert results["fused"][0] == results["upstream"][0]
    for got, want in zip(results["fused"][1:], results["upstream"][1:]):  # other masks would differ by far more
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def fused_forward(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether the layer's forward on x ran the fused function."""
    out = fused.lora_linear_forward(layer, x.requires_grad_())
    return out.grad_fn is not None and out.grad_fn.name() == "_LoraLinearBackward"


def test_the_lora_linear_keeps_peft_code_wherever_it_would_compute_something_else():
    x = torch.randn(2, 32)
    assert fused_forward(lora_linear(), x)
    assert not fused_forward(lora_linear(use_dora=True), x)  # DoRA: a magnitude vector
    half_base = lora_linear()
    half_base.base_layer.to(torch.bfloat16)  # a bf16 base beside fp32 adapters: peft casts between them
    assert not fused_forward(half_base, x.bfloat16().detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_forward(lora_linear(), x)
    merged = lora_linear()
    merged.merge()
    assert not fused_forward(merged, x)
    layer = lora_linear()
    layer.base_layer.weight.requires_grad_(True)  # a base that trains needs its own gradients
    assert not fused_forward(layer, x)
    hooked = lora_linear()
    hooked.lora_A["default"].register_forward_pre_hook(lambda module, args: None)  # as FSDP gathers a wrapped adapter
    assert not fused_forward(hooked, x)


def test_only_llama_layout_norms_and_plain_linear_adapters_are_fused(upstream_rotary):
    assert fused.install(tiny("gemma2", "lora")) == ["LoRA linear"]  # Gemma's norm scales by 1 + weight
    assert fused.install(tiny("gpt2", "lora")) == []  # Conv1D projections
