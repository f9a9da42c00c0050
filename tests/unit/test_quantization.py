"""QLoRA: the factory really quantizes (measured from the tensors), LoRA sits on top, and the repairs that
make bitsandbytes work on CPU are version-guarded."""

from __future__ import annotations

import pytest
import torch

from finetune import fixes, quantization
from finetune.fixes import bitsandbytes as bitsandbytes_fixes
from finetune.fixes import peft as peft_fixes
from finetune.fixes import transformers as transformers_fixes
from finetune.config import LoraConfig, ModelConfig, QuantizationConfig
from finetune.model import DTYPES, ModelError, build_lora_config, build_model, count_parameters, load_quantized

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


@pytest.mark.parametrize("storage", ["fp32", "bf16"])
def test_4bit_weights_stored_as_floats_compute_the_same(storage):
    """FSDP's storage (build_model's quant_storage): the same packed bytes in float tensors, every weight of the one
    dtype FSDP flattens, and forward and backward bit-identical to bitsandbytes' uint8 packing."""
    packed, _ = build_model(ModelConfig(name="tiny-llama"), seed=5, quantization=FOUR_BIT)
    stored, _ = build_model(ModelConfig(name="tiny-llama"), seed=5, quantization=FOUR_BIT, quant_storage=storage)
    assert {p.dtype for p in stored.parameters()} == {DTYPES[storage]}
    assert {p.dtype for p in packed.parameters() if quantization.is_quantized(p)} == {torch.uint8}
    layers = [(m.weight, s.weight) for m, s in zip(packed.modules(), stored.modules()) if isinstance(m, quantization.quantized_layer_types())]
    assert layers and all(torch.equal(a.view(-1), b.view(torch.uint8).view(-1)) for a, b in layers)
    if storage == "bf16":  # the unquantized weights follow the storage: compare the quantized layers' math alone
        layer_a, layer_b = packed.model.layers[0].mlp.up_proj, stored.model.layers[0].mlp.up_proj
        x = torch.randn(3, layer_a.in_features, requires_grad=True)
        y = x.detach().clone().requires_grad_()
        layer_a(x).sum().backward()
        layer_b(y).sum().backward()
        assert torch.equal(layer_a(x), layer_b(y)) and torch.equal(x.grad, y.grad)
        return
    tokens = torch.randint(0, 1000, (2, 12))
    a, b = packed(input_ids=tokens, labels=tokens), stored(input_ids=tokens, labels=tokens)
    a.loss.backward()
    b.loss.backward()
    assert torch.equal(a.logits, b.logits)
    grads = [(p.grad, q.grad) for p, q in zip(packed.parameters(), stored.parameters()) if p.grad is not None]
    assert grads and all(torch.equal(g, h) for g, h in grads)


def test_float_stored_4bit_weights_are_not_read_as_numbers():
    """The non-finite check skips packed data stored as floats (its bytes may read as NaN) and still finds a real NaN."""
    from finetune.checks import non_finite_parameters

    model, _ = build_model(ModelConfig(name="tiny-llama"), seed=5, quantization=FOUR_BIT, quant_storage="fp32")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.view(torch.uint8)[:8] = 0xFF  # packed codes 15: a NaN when read as float32
    assert non_finite_parameters(model) == []
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    assert non_finite_parameters(model) == ["model.norm.weight"]


def test_quantization_repairs_are_version_guarded():
    assert transformers_fixes.apply(transformers_version="4.53.0") == []
    assert bitsandbytes_fixes.keep_4bit_weights_trainable(torch.nn.Linear(2, 2), bitsandbytes_version="0.51.0") == 0
    assert peft_fixes.apply(peft_version="0.14.0") == []


@pytest.fixture(scope="module")
def wide_llama_bases():
    """tiny-llama-wide (random init, seed 0) in float32, and quantized whole as one process does (NF4, no double quantization)."""
    whole = QuantizationConfig(bits=4, quant_type="nf4", double_quant=False)
    return build_model(ModelConfig(name="tiny-llama-wide"), seed=0)[0], build_model(ModelConfig(name="tiny-llama-wide"), seed=0, quantization=whole)[0]


def _shard(weight: torch.Tensor, split: str, rank: int, tp: int) -> torch.Tensor:
    """Rank `rank`'s shard as shardformer cuts it: output rows (column-parallel) or input columns (row-parallel)."""
    return weight.chunk(tp, dim=0 if split == "column" else 1)[rank]


def test_tensor_parallel_4bit_shards_are_slices_of_the_whole_quantization(wide_llama_bases, tp=2):
    """Each rank's quantized shard (finetune.qlora_tp) is, bit for bit, the matching slice of the model quantized whole:
    packed data viewed (out, in / 2) and absmax viewed (out, in / 64), rows for column-parallel, columns for row-parallel."""
    from finetune.core.plugins.hybrid import QUANT_BLOCK, llama_projections, misaligned_projections
    from finetune.qlora_tp import ShardQuantization

    full, quantized = wide_llama_bases
    projections = llama_projections("tiny-llama-wide")
    assert not misaligned_projections(projections, tp)
    quant = ShardQuantization.of(QuantizationConfig(bits=4, quant_type="nf4", double_quant=False), "fp32")
    fulls, wholes = dict(full.named_modules()), dict(quantized.named_modules())
    checked = set()
    for name, whole in wholes.items():
        kind = name.rsplit(".", 1)[-1]
        if kind not in projections:
            continue
        out_features, in_features, split = projections[kind]
        packed = whole.weight.data.view(out_features, in_features // 2)
        absmax = whole.weight.quant_state.absmax.view(out_features, in_features // QUANT_BLOCK)
        for rank in range(tp):
            shard = quant.quantize(_shard(fulls[name].weight.data, split, rank, tp))
            assert torch.equal(shard.data.view(-1), _shard(packed, split, rank, tp).reshape(-1)), f"{name} rank {rank}: packed data"
            assert torch.equal(shard.quant_state.absmax, _shard(absmax, split, rank, tp).reshape(-1)), f"{name} rank {rank}: absmax"
            assert torch.equal(shard.quant_state.code, whole.weight.quant_state.code) and shard.quant_state.shape == _shard(fulls[name].weight, split, rank, tp).shape
        checked.add((kind, split))
    assert {split for _, split in checked} == {"column", "row"} and len(checked) == 7


def test_a_row_parallel_shard_narrower_than_a_block_is_not_a_slice_and_is_refused():
    """tiny-llama's o_proj (64 x 64) split by input columns over 2 ranks: 32-column rows, so each 64-element block of a
    shard mixes two rows; its quantization differs from the whole's, and the config check names it."""
    from bitsandbytes.functional import dequantize_4bit

    from finetune.core.plugins.hybrid import llama_projections, misaligned_projections
    from finetune.qlora_tp import ShardQuantization

    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    quant = ShardQuantization.of(QuantizationConfig(bits=4, quant_type="nf4", double_quant=False), "fp32")
    whole = quant.quantize(weight)
    shard = quant.quantize(_shard(weight, "row", 0, 2))
    assert shard.quant_state.absmax.numel() == 32 and whole.quant_state.absmax.numel() == 64  # a block per two half-rows, not per row
    assert not torch.equal(dequantize_4bit(shard.data, shard.quant_state), dequantize_4bit(whole.data, whole.quant_state)[:, :32])
    assert misaligned_projections(llama_projections("tiny-llama"), 2) == ["o_proj (64x64, row-parallel)"]
