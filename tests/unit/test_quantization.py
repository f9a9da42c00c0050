"""QLoRA: the factory really quantizes (measured from the tensors), LoRA sits on top, the repairs that
make bitsandbytes work on CPU are needed and work, and 2-rank runs train adapters over frozen 4/8-bit
weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune import fixes, quantization
from finetune.fixes import bitsandbytes as bitsandbytes_fixes
from finetune.fixes import peft as peft_fixes
from finetune.fixes import transformers as transformers_fixes
from finetune.config import LoraConfig, ModelConfig, QuantizationConfig
from finetune.model import ModelError, build_lora_config, build_model, count_parameters, load_quantized
from tests.conftest import read_summary, run_fresh_python, run_grouped, selected_params, write_instruction_file
from tests.distributed.test_train import check_run_contract, common_args

FOUR_BIT = QuantizationConfig(bits=4, quant_type="nf4", double_quant=True)
EIGHT_BIT = QuantizationConfig(bits=8)


@pytest.fixture(scope="module", autouse=True)
def fixed_stack():
    """The pinned stack's fixes, as every run applies them at launch (bitsandbytes on CPU needs two)."""
    fixes.apply()


@pytest.fixture(scope="module")
def gpt2_bases():
    """GPT-2 124M (random init, same seed) in full precision, 8-bit and 4-bit NF4 with double quantization."""
    return {bits: build_model(ModelConfig(name="gpt2"), seed=0, quantization=quant)[0] for bits, quant in ((32, None), (8, EIGHT_BIT), (4, FOUR_BIT))}


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_gpt2_lora_on_every_base(gpt2_bases, bits, tmp_path):
    from peft import get_peft_model

    base = gpt2_bases[bits]
    peft_model = get_peft_model(base, build_lora_config(base, LoraConfig(r=8, target_modules=["c_attn"])))
    trainable, total = count_parameters(peft_model)
    assert trainable == 294_912
    assert total == 124_439_808 + trainable  # 4-bit weights counted by their real shape, not their packed bytes
    peft_model.save_pretrained(tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert 1.17e6 < size < 1.2e6  # 294,912 fp32 values and a small header
    peft_model.unload()  # take the adapters off the shared base for the next case


@pytest.mark.parametrize("bits, limit", [(4, 0.55), (8, 1.05)])
def test_gpt2_quantized_bytes_per_parameter(gpt2_bases, bits, limit):
    weights = quantization.weight_bytes(gpt2_bases[bits])
    assert weights.quantized_params == 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072)  # every Conv1D projection
    assert weights.quantized_bytes / weights.quantized_params <= limit
    # embeddings, norms, biases, and one float32 `masked_bias` buffer per block
    assert weights.unquantized["float32"]["params"] == 124_439_808 - weights.quantized_params + 12


def test_every_projection_is_quantized_and_heads_are_not(gpt2_bases):
    import bitsandbytes as bnb

    for quant, layer in ((FOUR_BIT, bnb.nn.Linear4bit), (EIGHT_BIT, bnb.nn.Linear8bitLt)):
        model = gpt2_bases[quant.bits]
        assert quantization.check_quantized(model, quant) == {"quantized_modules": 48, "unquantized_projections": ["lm_head"]}
        assert isinstance(model.transformer.h[0].attn.c_attn, layer)  # GPT-2's Conv1D, converted
        assert model.lm_head.weight is model.transformer.wte.weight  # still tied, still float32
        assert model.lm_head.weight.dtype == torch.float32


def test_llama_projections_are_all_quantized():
    model, _ = build_model(ModelConfig(name="tiny-llama"), seed=0, quantization=FOUR_BIT)
    found = quantization.check_quantized(model, FOUR_BIT)
    assert found == {"quantized_modules": 2 * 7, "unquantized_projections": ["lm_head"]}  # q k v o gate up down per layer


def test_roberta_projections_are_quantized_classifier_kept(tmp_path):
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    config = RobertaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=3)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    model = load_quantized(str(tmp_path), "eager", FOUR_BIT, "fp32", trust_remote_code=False, auto_class=AutoModelForSequenceClassification)
    found = quantization.check_quantized(model, FOUR_BIT)
    # query, key, value, attention output, intermediate, output per layer; the classification head stays trainable precision
    assert found == {"quantized_modules": 2 * 6, "unquantized_projections": ["classifier.dense", "classifier.out_proj"]}


def test_a_quantization_that_converts_nothing_is_refused():
    nothing = QuantizationConfig(bits=4, skip_modules=["c_attn", "c_proj", "c_fc", "lm_head"])
    with pytest.raises(ModelError, match="no layer of gpt2 was quantized"):
        build_model(ModelConfig(name="tiny-gpt2"), seed=0, quantization=nothing)


def test_quantized_weights_match_the_full_precision_base():
    full, _ = build_model(ModelConfig(name="tiny-llama"), seed=5)
    quantized, _ = build_model(ModelConfig(name="tiny-llama"), seed=5, quantization=FOUR_BIT)
    tokens = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        reference, approx = full(input_ids=tokens).logits, quantized(input_ids=tokens).logits
    assert not torch.equal(reference, approx)  # really quantized
    assert torch.nn.functional.cosine_similarity(reference.flatten(), approx.flatten(), dim=0) > 0.99  # the same model


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


def test_quantization_repairs_are_version_guarded():
    assert transformers_fixes.apply(transformers_version="4.53.0") == []
    assert bitsandbytes_fixes.keep_4bit_weights_trainable(torch.nn.Linear(2, 2), bitsandbytes_version="0.51.0") == 0
    assert peft_fixes.apply(peft_version="0.14.0") == []


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


# --- real 2-rank runs ----------------------------------------------------------------------------


QLORA_TWO_RANKS = [("torch_ddp.yaml", "tiny-gpt2", 4), ("zero2.yaml", "tiny-gpt2", 8), ("torch_ddp.yaml", "tiny-llama", 8), ("zero2.yaml", "tiny-llama", 4)]
QLORA_ARGS = ["method=qlora", "train.lr=5e-3"]


@pytest.fixture(scope="module")
def qlora_runs(request, tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """name -> (output dir, result) of the selected 2-rank QLoRA runs, all in one shared launch (tests/run_many.py)."""
    root = tmp_path_factory.mktemp("qlora")
    data = write_instruction_file(root / "train.jsonl")
    runs = {}
    for config, model, bits in selected_params(request, "test_qlora_two_ranks", "setup"):
        name = f"{config}-{model}-{bits}"
        runs[name] = (2, ["--config", f"booster_configs/{config}", f"model.name={model}", f"quantization.bits={bits}", *QLORA_ARGS, *common_args(data, root / name)])
    if selected_params(request, "test_qlora_pipeline_parallel", None):
        runs["pp2"] = (2, ["--config", "booster_configs/pp2.yaml", "model.name=tiny-llama", *QLORA_ARGS, *common_args(data, root / "pp2")])
    results = run_grouped(runs, root / "launches")
    return {name: (root / name, results[name]) for name in runs}


@pytest.mark.distributed
@pytest.mark.timeout(1800)  # the first case waits for the shared launch (bounded by run_many)
@pytest.mark.parametrize("setup", QLORA_TWO_RANKS, ids=lambda setup: "-".join(map(str, setup)))
def test_qlora_two_ranks(qlora_runs, setup):
    out, result = qlora_runs["-".join(map(str, setup))]
    assert result.returncode == 0, result.stderr[-3000:]
    summary = check_run_contract(out, world_size=2)  # loss down, adapters identical on both ranks, reload ok
    checks = summary["checks"]
    assert checks["frozen_changed"] == 0 and checks["frozen_tensors"] > 0  # quantized weights bit-identical
    assert checks["trainable_changed"] == checks["trainable_tensors"] > 0
    weights = summary["memory"]["model_weights"]
    assert weights["quantized"]["params"] > 0 and weights["quantized"]["bytes_per_param"] < (0.75 if setup[2] == 4 else 1.1)
    assert (out / "final" / "adapter_model.safetensors").is_file() and not (out / "final" / "model.safetensors").exists()


@pytest.mark.distributed
@pytest.mark.timeout(1800)
def test_qlora_pipeline_parallel(qlora_runs):
    out, result = qlora_runs["pp2"]
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(out)
    assert summary["eval"]["after"]["loss"] < summary["eval"]["before"]["loss"]
    assert summary["checks"]["frozen_changed"] == 0 and summary["reload"]["ok"]


@pytest.mark.e2e
def test_a_quantized_cpu_model_does_not_keep_the_full_precision_file_mapped():
    code = (
        "from finetune.config import ModelConfig, QuantizationConfig\nfrom finetune.model import build_model\nfrom finetune import fixes\nfixes.apply()\n"
        "m, _ = build_model(ModelConfig(name='tiny-llama'), 0, quantization=QuantizationConfig())\n"
        "print(any('.safetensors' in line for line in open('/proc/self/maps')), m.lm_head.weight.dtype)\n"
    )
    assert run_fresh_python(code).split() == ["False", "torch.float32"]
