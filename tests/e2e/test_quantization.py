"""QLoRA in fresh interpreters: the bitsandbytes repairs are needed and work, and a quantized model leaves its file unmapped."""

from __future__ import annotations

import pytest

from tests.conftest import run_fresh_python


# --- repairs: each is needed by the pinned stack, and works ----------------------------------------


@pytest.mark.e2e
def test_transformers_refuses_bitsandbytes_on_cpu_without_the_repair():
    code = (
        "import torch, transformers.integrations.bitsandbytes as b\n"
        "try:\n    b.validate_bnb_backend_availability(raise_exception=True); print('accepted')\n"
        "except RuntimeError as e:\n    print('refused')\n"
        "from finetune.fixes import transformers; transformers.apply()\n"
        "print('accepted' if b.validate_bnb_backend_availability(raise_exception=True) else 'refused')\n"
    )
    assert run_fresh_python(code).split() == ["refused", "accepted"]


@pytest.mark.e2e
def test_peft_8bit_lora_needs_the_fix():
    code = (
        "from finetune.config import ModelConfig, QuantizationConfig, LoraConfig\n"
        "from finetune import fixes, model as m\n"
        "from bitsandbytes.autograd._functions import MatmulLtState\n"
        "print(hasattr(MatmulLtState, 'memory_efficient_backward'))\n"
        "fixes.apply()\n"
        "base, _ = m.build_model(ModelConfig(name='tiny-llama'), seed=0, quantization=QuantizationConfig(bits=8))\n"
        "from peft import get_peft_model\n"
        "model = get_peft_model(base, m.build_lora_config(base, LoraConfig()))\n"
        "print(type(model.base_model.model.model.layers[0].self_attn.q_proj).__module__)\n"
    )
    # Before fixes.apply() (every run applies it at launch), bitsandbytes lacks what peft 0.13.2 reads.
    assert run_fresh_python(code).split() == ["False", "peft.tuners.lora.bnb"]


def _train_after_eval(repaired: bool) -> str:
    """A script printing whether LoRA gradients after an eval pass equal those of a fresh model."""
    return (
        "import torch\nfrom finetune import fixes\nfrom finetune.fixes import bitsandbytes as bnb_fixes\nfixes.apply()\n"
        "from finetune.config import ModelConfig, QuantizationConfig, LoraConfig\nfrom finetune import model as m\n"
        f"bnb_fixes.keep_4bit_weights_trainable = (lambda model: 0) if {not repaired} else bnb_fixes.keep_4bit_weights_trainable\n"
        "base, _ = m.build_model(ModelConfig(name='tiny-llama'), seed=0, quantization=QuantizationConfig(bits=4))\n"
        "from peft import get_peft_model\nmodel = get_peft_model(base, m.build_lora_config(base, LoraConfig(dropout=0.0)))\n"
        "x = torch.randint(0, 1000, (2, 8))\n"
        "def grads():\n    model.zero_grad()\n    model(input_ids=x, labels=x).loss.backward()\n"
        "    return [p.grad.clone() for n, p in model.named_parameters() if 'lora_B' in n]\n"
        "fresh = grads()\nmodel.eval()\n"
        "with torch.no_grad(): model(input_ids=x)\n"
        "model.train()\n"
        "try:\n    after = grads()\n    print(len(fresh), all(torch.equal(a, b) for a, b in zip(fresh, after)))\n"
        "except RuntimeError:\n    print(len(fresh), 'failed')\n"
    )


@pytest.mark.e2e
def test_training_after_an_eval_pass_keeps_every_adapter_trainable():
    from bitsandbytes.nn.modules import has_avx512bf16 as cpu_repacks  # the stock failure needs such a CPU

    assert run_fresh_python(_train_after_eval(repaired=True)).split() == ["8", "True"]  # lora_B of q k v o, 2 layers
    if cpu_repacks():
        assert run_fresh_python(_train_after_eval(repaired=False)).split() != ["8", "True"]  # the stock failure is real here


@pytest.mark.e2e
def test_a_quantized_cpu_model_does_not_keep_the_full_precision_file_mapped():
    code = (
        "from finetune.config import ModelConfig, QuantizationConfig\nfrom finetune.model import build_model\nfrom finetune import fixes\nfixes.apply()\n"
        "m, _ = build_model(ModelConfig(name='tiny-llama'), 0, quantization=QuantizationConfig())\n"
        "print(any('.safetensors' in line for line in open('/proc/self/maps')), m.lm_head.weight.dtype)\n"
    )
    assert run_fresh_python(code).split() == ["False", "torch.float32"]
