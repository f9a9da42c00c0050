"""Memory estimator: public parameter counts, the bytes/param rules by hand, the activation formula
against the tensors autograd really saves, and the fit check's alternatives."""

from __future__ import annotations

import pytest
import torch

from finetune import estimate as est
from finetune.estimate.memory import gib
from finetune.architectures import NAMED_CONFIGS, architecture
from finetune.config import build_config, parse_args
from finetune.core.layout import Placement

LLAMA2_7B = 6_738_415_616
FAMILY_MODELS = ("tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3", "tiny-phi3", "tiny-mixtral")


def config_of(*args: str):
    return build_config(parse_args(list(args)))


def count(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize(
    "name, public",
    [
        ("gpt2", 124_439_808),
        ("llama2-7b", LLAMA2_7B),
        ("llama2-13b", 13_015_864_320),
        # Issue 26: the published sizes (model cards / safetensors index totals). GQA k/v projections,
        # Qwen2.5's q/k/v biases, Qwen3's q/k norms, Gemma-2's tied 256k embedding, all of Mixtral's experts.
        ("llama2-70b", 68_976_648_192),
        ("llama3.1-8b", 8_030_261_248),
        ("llama3.1-70b", 70_553_706_496),
        ("qwen2.5-7b", 7_615_616_512),
        ("qwen3-8b", 8_190_735_360),
        ("mistral-7b", 7_241_732_096),
        ("gemma2-9b", 9_241_705_984),
        ("mixtral-8x7b", 46_702_792_704),
    ],
)
def test_named_causal_lm_counts_equal_public_figures(name, public):
    model = est.build_meta_model(est.load_model_config(name))
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing was allocated
    assert count(model) == public
    assert est.estimate(config_of(f"model.name={name}", "method=full")).params == public


def test_roberta_large_counts_encoder_and_classification_head():
    from transformers import AutoModel

    config = est.load_model_config("roberta-large")
    with torch.device("meta"):
        encoder = AutoModel.from_config(config)  # RobertaModel, pooler included: the public 355M figure
    assert count(encoder) == 355_359_744
    classifier = est.build_meta_model(config)  # what fine-tuning trains: encoder (no pooler) + head
    h, labels = 1024, config.num_labels
    pooler, head = h * h + h, (h * h + h) + (h * labels + labels)
    assert type(classifier).__name__ == "RobertaForSequenceClassification"
    assert count(classifier) == 355_359_744 - pooler + head


def test_any_hugging_face_config_json(tmp_path):
    est.load_model_config("llama2-7b").save_pretrained(tmp_path)  # writes tmp_path/config.json
    for name in (tmp_path, tmp_path / "config.json"):
        assert est.estimate_request([f"model.name={name}", "method=full"]).params == LLAMA2_7B


def test_sixteen_bytes_per_param_for_mixed_precision_adamw():
    """bf16 weights 2 + grads 2 + fp32 master 4 + m 4 + v 4, on one rank and sharded by ZeRO."""
    one = est.estimate(config_of("model.name=llama2-7b", "method=full", "plugin.name=low_level_zero", "train.precision=bf16"), world_size=1)
    assert (one.weights, one.gradients, one.optimizer_states, one.master_weights) == (2 * LLAMA2_7B, 2 * LLAMA2_7B, 12 * LLAMA2_7B, 4 * LLAMA2_7B)
    assert one.weights + one.gradients + one.optimizer_states == 16 * LLAMA2_7B
    hybrid = est.estimate(config_of("model.name=llama2-7b", "method=full", "plugin.name=hybrid_parallel", "train.precision=bf16"), world_size=1)
    assert hybrid.weights + hybrid.gradients + hybrid.optimizer_states == 16 * LLAMA2_7B
    zero1 = est.estimate(config_of("model.name=llama2-7b", "method=full", "--config", "booster_configs/zero1.yaml", "train.precision=bf16"), world_size=8)
    zero2 = est.estimate(config_of("model.name=llama2-7b", "method=full", "--config", "booster_configs/zero2.yaml", "train.precision=bf16"), world_size=8)
    assert (zero1.weights, zero1.gradients, zero1.optimizer_states) == (2 * LLAMA2_7B, 2 * LLAMA2_7B, 12 * LLAMA2_7B // 8)
    assert (zero2.weights, zero2.gradients, zero2.optimizer_states) == (2 * LLAMA2_7B, 2 * LLAMA2_7B // 8, 12 * LLAMA2_7B // 8)


def test_plugin_semantics():
    base = ("model.name=llama2-7b", "method=full", "train.precision=bf16")
    per_rank = {name: est.estimate(config_of(*base, "--config", f"booster_configs/{name}.yaml"), world_size=8) for name in ("torch_ddp", "zero2_cpu_offload", "fsdp", "tp2", "pp2")}
    ddp = per_rank["torch_ddp"]  # fp32 replica, bf16 autocast: 4 + 4 (param.grad) + 4 (bucket) + 8
    assert (ddp.weights, ddp.gradients, ddp.optimizer_states, ddp.master_weights) == (4 * LLAMA2_7B, 8 * LLAMA2_7B, 8 * LLAMA2_7B, 0)
    offload = per_rank["zero2_cpu_offload"]  # optimizer states and fp32 master in host memory
    assert offload.optimizer_states == 0 and offload.host_offload >= 12 * LLAMA2_7B // 8
    fsdp = per_rank["fsdp"]  # fp32 shards + grads + states over 8; gathered in bf16: the root unit and two blocks
    layer = 202_383_360
    root = LLAMA2_7B - 32 * layer  # embeddings, final norm, lm_head
    assert fsdp.optimizer_states == 8 * LLAMA2_7B // 8
    assert fsdp.weights == pytest.approx(4 * LLAMA2_7B / 8 + 2 * (root + 2 * layer), abs=8)
    one_unit = config_of(*base, "--config", "booster_configs/fsdp.yaml")
    one_unit.plugin.options["auto_wrap"] = "none"  # set directly: the key is read with a default until booster.py lists it
    assert est.estimate(one_unit, world_size=8).weights == pytest.approx(4 * LLAMA2_7B / 8 + 2 * LLAMA2_7B, abs=8)
    tp = per_rank["tp2"]  # projections and vocabulary split in two, norms replicated
    norms = 65 * 4096
    assert tp.weights == pytest.approx(2 * ((LLAMA2_7B - norms) / 2 + norms), abs=8)
    pp = per_rank["pp2"]  # 16 of 32 layers (+ an embedding or the head) per stage
    assert pp.weights == 2 * (16 * layer + 32000 * 4096 + 4096)
    sgd = est.estimate(config_of(*base, "plugin.name=low_level_zero", "train.optimizer=sgd"), world_size=1)
    assert sgd.optimizer_states == (4 + 4) * LLAMA2_7B  # momentum + fp32 master


def test_lora_counts_adapters_on_the_meta_model():
    lora = est.estimate(config_of("model.name=llama2-7b", "method=lora", "lora.r=16"), world_size=1, device="cuda")
    adapters = 32 * 4 * 16 * (4096 + 4096)  # q/k/v/o: A (r x h) + B (h x r) per projection
    assert lora.trainable_params == adapters and lora.params == LLAMA2_7B + adapters
    assert lora.optimizer_states == 8 * adapters  # AdamW m, v in fp32; no master under DDP
    targeted = est.estimate(config_of("model.name=llama2-7b", "method=lora", "lora.r=16", "lora.target_modules=q_proj,v_proj"))
    assert targeted.trainable_params == adapters // 2


def test_qlora_base_bytes_per_param():
    shape = est.model_shape(est.load_model_config("llama2-7b"), "qlora", config_of("method=lora").lora)
    quantized = 32 * shape.layer_matmul  # every projection in the layers; embeddings and lm_head stay bf16
    rest = LLAMA2_7B - quantized
    nf4 = est.estimate(config_of("model.name=llama2-7b", "method=qlora"), quantization=est.Quantization(4, "nf4", True, "bf16"))
    assert est.Quantization(4).bytes_per_weight() == pytest.approx(0.5159, abs=1e-4)
    nf4_bytes = 4 / 8 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, an 8-bit absmax per 64, an fp32 absmax per 256 blocks
    assert nf4.weights == pytest.approx(quantized * nf4_bytes + rest * 2 + shape.trainable_params * 4, rel=1e-9)
    int8 = est.estimate(config_of("model.name=llama2-7b", "method=qlora"), quantization=est.Quantization(8))
    assert int8.weights == pytest.approx(quantized + 4 * 32 * shape.layer_rows + rest * 2 + shape.trainable_params * 4, rel=1e-9)


def test_qlora_under_fsdp_shards_the_packed_4bit_weights():
    """Issue 26: under FSDP the packed 4-bit data and the rest are divided over the ranks, the block constants (absmax)
    stay whole on each, and the gathered working copy (the root unit and two blocks) holds the 4-bit weights as stored."""
    shape = est.model_shape(est.load_model_config("llama2-7b"), "qlora", config_of("method=lora").lora)
    quant = est.Quantization(4, "nf4", True, "bf16")
    cfg = config_of("model.name=llama2-7b", "method=qlora", "--config", "booster_configs/fsdp.yaml", "train.precision=bf16")
    one, two = (est.estimate(cfg, world_size=n, quantization=quant) for n in (1, 2))
    quantized = 32 * shape.layer_matmul
    constants = quantized * (quant.bytes_per_weight() - 0.5)
    rest = one.params - quantized - one.trainable_params  # embeddings, norms, lm_head: bf16
    held = quantized * 0.5 + rest * 2 + one.trainable_params * 4
    gathered = (one.params - 30 * shape.layer_params) * 2 - 2 * shape.layer_matmul * (2 - 0.5)  # root unit and two blocks, their projections packed
    assert two.weights == pytest.approx(held / 2 + constants + gathered, rel=1e-9)
    assert one.weights == pytest.approx(held + constants, rel=1e-9)  # one rank: nothing to gather
    assert two.weights < 0.75 * one.weights


@pytest.mark.parametrize("tp", [2, 4])
def test_qlora_under_tensor_parallelism_divides_the_4bit_weights(tp):
    """Issue 26: each rank quantizes its own shards (finetune.qlora_tp): the layers' 4-bit weights with their fp32 block
    scales (no double quantization under TP), the embeddings and lm_head split by tp; norms and the LoRA adapters whole."""
    shape = est.model_shape(est.load_model_config("llama2-7b"), "qlora", config_of("method=lora").lora)
    cfg = config_of("--config", "booster_configs/tp2_lora.yaml", "model.name=llama2-7b", "method=qlora", f"plugin.tp_size={tp}", "train.precision=bf16", "quantization.double_quant=false")
    split = est.estimate(cfg, world_size=tp, quantization=est.quantization_of(cfg))
    quantized, vocabulary = 32 * shape.layer_matmul, 2 * 32000 * 4096  # embeddings and lm_head (32,000 rows split evenly)
    norms = split.params - quantized - vocabulary - split.trainable_params
    assert est.quantization_of(cfg).bytes_per_weight() == 0.5 + 4 / 64
    assert split.weights == pytest.approx(quantized / tp * (0.5 + 4 / 64) + (vocabulary / tp + norms) * 2 + split.trainable_params * 4, rel=1e-9)


def test_llama31_70b_qlora_tp4_fits_24_gib():
    """Issue 26's acceptance: Llama-3.1-70B QLoRA with TP=4 on 4 GPUs, 2048 tokens, batch 1, gradient checkpointing:
    <= 24 GiB per GPU predicted (docs/estimator.md records the figure)."""
    args = ["--config", "booster_configs/tp2_lora.yaml", "model=llama3.1-70b", "method=qlora", "plugin.tp_size=4", "world_size=4", "batch_size=1", "eval.batch_size=1",
            "seq_len=2048", "precision=bf16", "train.gradient_checkpointing=true", "quantization.double_quant=false"]
    prediction = est.estimate_request(args)
    assert prediction.total() / est.GIB == pytest.approx(13.93, abs=0.005)  # the loss in chunks of a quarter of the vocabulary
    assert prediction.total() <= 24 * est.GIB


def test_tensor_parallelism_keeps_the_column_inputs_and_the_vocabulary_parallel_loss():
    """Under tp>1 shardformer's column-parallel linears keep their input even where the weight is frozen (q/k/v, MLP in,
    the head; not finetune.qlora_tp's 4-bit shards, which bitsandbytes computes), and its own loss over the full logits
    (vocabulary-parallel cross entropy) peaks at the end of its forward: logits, their shifted copy, the exponentiated copy
    and the fp32 probabilities (cast back where the compute dtype is half), each over vocabulary / tp."""
    import dataclasses

    lora = config_of("model.name=gpt2", "method=lora", "--config", "booster_configs/tp2_lora.yaml")
    place = est.placement(lora, 2)
    assert place.column_inputs_saved and not est.placement(config_of("model.name=gpt2", "--config", "booster_configs/pp2.yaml"), 2).column_inputs_saved
    shape = est.model_shape(est.load_model_config("gpt2"), "lora", lora.lora)
    assert shape.saved_inputs == frozenset()  # a single process keeps none: LoRA's dropout reads its own copy of c_attn's input
    unsaved = dataclasses.replace(place, column_inputs_saved=False)
    assert est.layer_activation_bytes(shape, place, 64, "cpu", "sdpa") - est.layer_activation_bytes(shape, unsaved, 64, "cpu", "sdpa") == 2 * 4 * 768  # c_attn's and c_fc's
    assert est.vocab_parallel_loss_bytes(shape, place, 128) == 128 * ((4 + 4 + 4 + 4) * shape.vocab / 2 + 4 * 768)  # + the head's kept input
    assert est.vocab_parallel_loss_bytes(shape, dataclasses.replace(place, compute_bytes=2), 128) == 128 * ((2 + 2 + 2 + 4 + 2) * shape.vocab / 2 + 2 * 768)
    # QLoRA under tp2: the layers' projections are 4-bit shards, so of the column inputs LoRA under tp2 keeps beside the
    # adapters' own (q/k/v and o, read undropped), QLoRA keeps none: the MLP input of each of the 12 layers less.
    args = ("model.name=small-llama", "lora.dropout=0", "train.batch_size=2", "--config", "booster_configs/tp2_lora.yaml")
    lora_tp, qlora_tp = config_of(*args), config_of(*args, "method=qlora", "quantization.double_quant=false")
    lora_split, qlora_split = est.estimate(lora_tp, 2, 64, "cpu"), est.estimate(qlora_tp, 2, 64, "cpu", est.quantization_of(qlora_tp))
    assert lora_split.activations - qlora_split.activations == 2 * 64 * 12 * 4 * 768


def test_column_parallel_linears_keep_a_frozen_weights_input():
    """What Placement.column_inputs_saved stands for, checked on ColossalAI itself: the product its column-parallel linears
    compute with (linear_with_async_comm, which Linear1D_Col and the vocabulary-parallel head call) keeps the input for
    backward with the weight frozen, where torch's linear keeps none."""
    from colossalai.shardformer.layer._operation import linear_with_async_comm

    def inputs_kept(product) -> int:
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            product()
        return sum(t.data_ptr() == x.data_ptr() for t in kept)

    x, weight = torch.randn(2, 8, requires_grad=True), torch.randn(8, 8)  # a frozen weight
    assert inputs_kept(lambda: torch.nn.functional.linear(x, weight)) == 0
    assert inputs_kept(lambda: linear_with_async_comm(x, weight, None, None, False)) == 1


def saved_bytes_per_layer(config, autocast: bool, half_model: bool, lora=None, attention: str = "sdpa") -> float:
    """Bytes autograd saves per token for one layer: a 2-layer minus a 1-layer model (parameters and buffers aside)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    totals = []
    for layers in (1, 2):
        config.num_hidden_layers = layers
        factory = AutoModelForSequenceClassification if est.is_classifier(config) else AutoModelForCausalLM
        torch.manual_seed(0)
        model = factory.from_config(config, attn_implementation=attention).train()
        if lora:
            from peft import inject_adapter_in_model

            from finetune.model import build_lora_config

            model = inject_adapter_in_model(build_lora_config(model, lora), model)
        model = model.to(torch.bfloat16) if half_model else model
        owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        saved: dict[int, int] = {}

        def pack(t):
            saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        ids = torch.randint(0, 1000, (2, 32))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(input_ids=ids, labels=ids if not est.is_classifier(config) else torch.zeros(2, dtype=torch.long))
        totals.append(sum(n for ptr, n in saved.items() if ptr not in owned))
    return (totals[1] - totals[0]) / ids.numel()


TINY = {
    "gpt2": dict(n_embd=64, n_head=4, n_positions=64, vocab_size=1000),
    "llama": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),
    "roberta": dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, vocab_size=1000, max_position_embeddings=70),
    # Today's families (issue 26): GQA, q/k/v biases, q/k norms, 4 norms and soft-capping, fused projections, MoE.
    **{model_type: {**overrides, "vocab_size": 1000, "num_hidden_layers": 1} for name, (model_type, overrides) in NAMED_CONFIGS.items() if name in FAMILY_MODELS},
}


@pytest.mark.parametrize(
    "model_type, dropout, precision, method",
    [
        ("gpt2", 0.0, "fp32", "full"),
        ("gpt2", 0.1, "fp32", "full"),
        ("gpt2", 0.0, "autocast", "full"),
        ("gpt2", 0.0, "fp32", "lora"),
        ("llama", 0.0, "fp32", "full"),
        ("llama", 0.0, "bf16", "full"),
        ("llama", 0.0, "fp32", "lora"),
        ("llama", 0.0, "bf16", "lora-undropped"),
        ("roberta", 0.1, "fp32", "full"),
        *((NAMED_CONFIGS[name][0], 0.0, "fp32", method) for name in FAMILY_MODELS for method in ("full", "lora")),
        ("mixtral", 0.0, "bf16", "lora-undropped"),
        ("gemma2", 0.0, "bf16", "full"),  # Gemma's norms keep fp32, its eager scores a soft-capped copy
        ("gemma3_text", 0.0, "bf16", "full"),
    ],
)
def test_layer_activation_formula_matches_saved_tensors(model_type, dropout, precision, method):
    from transformers import AutoConfig

    drops = {"gpt2": dict(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout), "roberta": dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)}
    config = AutoConfig.for_model(model_type, **{"num_hidden_layers": 1, **TINY[model_type]}, **drops.get(model_type, {}))
    # LoRA on the default targets (GPT-2 c_attn, Llama q/k/v/o), with and without lora.dropout.
    lora = config_of(f"lora.dropout={0.0 if method == 'lora-undropped' else 0.1}").lora if method.startswith("lora") else None
    shape = est.model_shape(config, "lora" if lora else "full", lora)
    half = precision != "fp32"
    place = Placement(compute_bytes=2 if half else 4, residual_bytes=2 if precision == "bf16" else 4)
    attention = architecture(model_type).attention("auto", shardformer=False)  # Gemma: eager
    predicted = est.layer_activation_bytes(shape, place, seq=32, device="cpu", attention=attention)
    measured = saved_bytes_per_layer(config, autocast=precision == "autocast", half_model=precision == "bf16", lora=lora, attention=attention)
    if precision == "autocast":  # autocast also saves half copies of the layer's weights (the estimator adds them per rank)
        predicted += 2 * shape.layer_matmul / (2 * 32)
    assert predicted == pytest.approx(measured, rel=0.03), (predicted, measured)


SEED_JOB = ("model=llama2-7b", "batch_size=4", "seq_len=512")


def test_half_precision_lora_holds_the_frozen_base_in_two_bytes_and_fits_one_gpu():
    """Issue 15: llama2-7b LoRA bf16 on one GPU, batch 4 x 512, with checkpointing <= 20 GiB."""
    lora = est.estimate_request([*SEED_JOB, "method=lora", "precision=bf16", "plugin=torch_ddp"])
    frozen = lora.params - lora.trainable_params
    assert lora.weights == 2 * frozen + 4 * lora.trainable_params  # bf16 base, fp32 adapters
    fp32 = est.estimate_request([*SEED_JOB, "method=lora", "precision=fp32", "plugin=torch_ddp"])
    assert lora.activations_checkpointed < fp32.activations_checkpointed  # no autocast copies of the weights
    assert lora.total(True) <= 20 * est.GIB, lora.total(True) / est.GIB
    fsdp = est.estimate_request([*SEED_JOB, "method=lora", "precision=bf16", "plugin=fsdp", "world_size=4"])
    assert fsdp.weights < fp32.weights / 4  # a 2-byte base sharded over 4, plus the gathered blocks: below fp32 shards alone
    gemini = est.estimate(config_of("model.name=llama2-7b", "method=lora", "train.precision=bf16", "plugin.name=gemini"), world_size=4, seq_len=512)
    assert gemini.weights == est.estimate(config_of("model.name=llama2-7b", "method=lora", "train.precision=fp32", "plugin.name=gemini"), world_size=4, seq_len=512).weights


def test_fsdp_full_fine_tuning_gathers_one_block_at_a_time():
    """Issue 15: llama2-7b full FSDP fp16 SGD on 4 GPUs with checkpointing <= 25 GiB (seed 001's 25 GB)."""
    args = ["model.name=llama2-7b", "method=full", "--config", "booster_configs/fsdp.yaml", "train.precision=fp16", "train.optimizer=sgd"]
    by_block = est.estimate(config_of(*args), world_size=4, seq_len=512)
    assert by_block.total(True) <= 25 * est.GIB, by_block.total(True) / est.GIB
    one_unit = config_of(*args)
    one_unit.plugin.options["auto_wrap"] = "none"
    assert est.estimate(one_unit, world_size=4, seq_len=512).total(True) > 25 * est.GIB


def test_adamw_step_temporaries_are_per_tensor_not_all_at_once():
    """Issue 15: the pp2 bf16 AdamW x2 row: fused AdamW (CUDA) adds two temporaries of its largest tensor only."""
    pp2 = [*SEED_JOB, "method=full", "precision=bf16", "plugin=pp2", "world_size=2"]
    adamw, sgd = est.estimate_request([*pp2, "optimizer=adamw"]), est.estimate_request([*pp2, "optimizer=sgd"])
    embedding = 32000 * 4096  # the largest trainable tensor
    assert adamw.step_temporaries - sgd.step_temporaries == 2 * 4 * embedding
    assert adamw.step_temporaries - sgd.step_temporaries < 0.1 * adamw.optimizer_states


def test_fitting_alternatives_are_ranked_and_each_fits():
    """--fit / train.fit_check: the cheapest changes that fit, each with the estimator's own peak."""
    cfg = config_of("model.name=llama2-7b", "method=lora", "train.precision=bf16", "train.batch_size=4")
    available = 16 * est.GIB
    assert est.estimate(cfg, 1, 512).total() > available
    alternatives = est.fitting_alternatives(cfg, 1, available, seq_len=512)
    assert alternatives[0].overrides == ("train.gradient_checkpointing=true",)
    assert [a.cost for a in alternatives] == sorted(a.cost for a in alternatives)
    for alt in alternatives:
        changed = est.with_overrides(cfg, alt.overrides)
        assert alt.peak_bytes == est.estimate(changed, 1, 512, "cuda", est.quantization_of(changed)).total() <= available
    # Over 4 ranks, full fine-tuning under DDP: sharding and a smaller micro-batch (same global batch) enter.
    full = config_of("model.name=llama2-7b", "method=full", "train.precision=fp16", "train.optimizer=sgd", "train.batch_size=4")
    ranked = est.fitting_alternatives(full, 4, 30 * est.GIB, seq_len=512)
    assert any("plugin.name=torch_fsdp" in a.overrides for a in ranked)
    roomy = est.fitting_alternatives(cfg, 1, 20 * est.GIB, seq_len=512)
    micro = next(a for a in roomy if a.overrides[0].startswith("train.batch_size="))
    batch, accum = (int(o.split("=")[1]) for o in micro.overrides)
    assert batch < 4 and batch * accum == 4


def test_fit_check_line_names_peak_available_and_three_changes():
    cfg = config_of("model.name=llama2-7b", "method=lora", "train.precision=bf16", "train.batch_size=4")
    assert est.fit_check_line(cfg, 1, 80 * est.GIB, seq_len=512) is None
    line = est.fit_check_line(cfg, 1, 20 * est.GIB, seq_len=512)
    peak = est.estimate(cfg, 1, 512).total()
    assert line.startswith(f"predicted peak {peak / est.GIB:,.2f} GiB per rank does not fit the 20.00 GiB available")
    three = est.fitting_alternatives(cfg, 1, 20 * est.GIB, seq_len=512)[:3]
    assert len(three) == 3 and "\n" not in line
    assert all(a.describe() in line for a in three)


def test_cli_fit_prints_the_ranked_list(capsys):
    assert est.main(["model=llama2-7b", "method=lora", "precision=bf16", "seq_len=512", "--fit", "20"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("does not fit in 20.00 GiB") and out[2].strip().startswith("1. train.gradient_checkpointing=true")
    assert est.main(["model=gpt2", "--fit=lots"]) == 2
    assert capsys.readouterr().err.startswith("error: --fit: expected the memory per rank in GiB")


def test_train_fit_check_values():
    from finetune.config import validate

    assert config_of().train.fit_check == "error"
    assert any(p.startswith("train.fit_check: unknown value 'maybe'") for p in validate(config_of("train.fit_check=maybe"), 1, False))


def test_the_chunked_loss_holds_one_chunk_of_logits_and_the_label_positions_hidden_states():
    """train.loss_chunks: the loss term is chunk x vocabulary plus the gathered hidden states and their gradient at the
    label positions, not batch x tokens x vocabulary (12 bytes each); only label tokens (label_len) reach the head. Under
    the frozen head of LoRA in bf16 a chunk is one fp32 buffer and the bf16 logits (6 bytes each), plus log_softmax's
    output for 64 rows at a time; under tensor parallelism autograd's 12 bytes over the rank's share of the vocabulary."""
    args = ("model.name=llama2-7b", "method=lora", "train.precision=bf16", "train.batch_size=2")
    seq, vocab, hidden, residual = 2048, 32000, 4096, 2  # LoRA in bf16: the frozen base, and its hidden states, in bf16
    full = est.estimate(config_of(*args, "train.loss_chunks=off"), 1, seq)
    chunked = est.estimate(config_of(*args), 1, seq)
    tokens = 2 * seq
    assert chunked.setup["loss_chunks"] == est.DEFAULT_CHUNK_TOKENS == 1024
    kept = tokens * (2 * residual * hidden + est.CHUNKED_LOSS_TOKEN_BYTES)
    assert full.activations - chunked.activations == tokens * 12 * vocab - ((1024 * 6 + 64 * 4) * vocab + kept)
    assert chunked.activations_checkpointed < full.activations_checkpointed  # with checkpointing: the larger of the loss term and one recomputed layer
    prompts_masked = est.estimate(config_of(*args), 1, seq, label_len=seq // 4)  # a quarter of each row is scored
    assert chunked.activations - prompts_masked.activations == (tokens - tokens // 4) * (2 * residual * hidden + est.CHUNKED_LOSS_TOKEN_BYTES)
    assert est.estimate(config_of(*args, "train.loss_chunks=off"), 1, seq, label_len=seq // 4).activations == full.activations  # the full logits score every position
    # Tensor parallelism: each rank's chunk covers its half of the vocabulary, the hidden states stay whole. A pipeline chunks on its last stage.
    tp_args = (*args, "plugin.name=hybrid_parallel", "plugin.tp_size=2")
    tp_full, tp = (est.estimate(config_of(*tp_args, *extra), 2, seq) for extra in (["train.loss_chunks=off"], []))
    assert tp.setup["loss_chunks"] == 1024 and tp_full.setup["loss_chunks"] == 0
    # over the full logits: ColossalAI's vocabulary-parallel cross-entropy (12 bytes a token and vocabulary share in bf16) and the head's kept input
    assert tp_full.activations - tp.activations == tokens * (12 * vocab / 2 + residual * hidden) - (1024 * 12 * vocab / 2 + kept)
    assert est.estimate(config_of(*args, "plugin.name=hybrid_parallel", "plugin.pp_size=2", "plugin.num_microbatches=2"), 2, seq).setup["loss_chunks"] == 1024


def test_a_pipeline_of_pairs_slices_rows_two_to_a_pair():
    """Preference pairs under pp2: plugin.microbatch_size counts rows (two a pair), as the schedule slices them, so 4 rows
    of a 4-pair batch are 2 micro-batches, the same estimate as num_microbatches=2; the last stage takes the loss in chunks."""
    from tests.conftest import REPO

    args = ("--config", str(REPO / "booster_configs" / "pp2.yaml"), "model.name=llama2-7b", "method=lora", "train.precision=bf16", "task=preference", "train.batch_size=4")
    by_count = est.estimate(config_of(*args), 2, 512)
    by_size = est.estimate(config_of(*args, "plugin.num_microbatches=0", "plugin.microbatch_size=4"), 2, 512)
    assert by_count.setup["loss_chunks"] == est.DEFAULT_CHUNK_TOKENS
    assert by_size.activations == by_count.activations and by_size.activations_checkpointed == by_count.activations_checkpointed


LLAMA31_JOB = ("model.name=llama3.1-8b", "method=lora", "train.precision=bf16", "train.batch_size=2", "eval.batch_size=2")  # issue 27's acceptance job


def test_activation_offload_keeps_one_layer_on_the_device_and_the_rest_in_host_memory():
    """train.activation_offload on CUDA: every layer's saved tensors (checkpointing: its input) in host memory, its own
    line; on the device what is saved outside the layers, the loss, and one layer in backward. On CPU nothing moves."""
    tokens, layers, hidden, residual = 2 * 2048, 32, 4096, 2
    cfg = config_of(*LLAMA31_JOB)
    shape = est.model_shape(est.load_model_config("llama3.1-8b"), "lora", cfg.lora)
    layer = est.layer_activation_bytes(shape, est.placement(cfg, 1), 2048, "cuda", "sdpa")
    for checkpointing in ("false", "true"):
        args = (*LLAMA31_JOB, f"train.gradient_checkpointing={checkpointing}")
        kept, offloaded = est.estimate(config_of(*args), 1, 2048), est.estimate(config_of(*args, "train.activation_offload=true"), 1, 2048)
        assert (kept.host_activations, kept.host_activations_checkpointed) == (0, 0)
        assert offloaded.host_activations == round(tokens * layers * layer)
        assert offloaded.host_activations_checkpointed == tokens * layers * residual * hidden
        # The 1,024-token chunk of the 128k-vocabulary loss outweighs one layer here: the device keeps the loss and
        # what lies outside the layers, and sheds exactly the saved layers (checkpointing: their inputs).
        assert kept.activations - offloaded.activations == pytest.approx(offloaded.host_activations, abs=2)
        assert kept.activations_checkpointed - offloaded.activations_checkpointed == pytest.approx(offloaded.host_activations_checkpointed, abs=2)
        assert offloaded.total() < kept.total()
    assert "host memory (offloaded activations)" in est.format_table(offloaded)
    on_cpu = est.estimate(config_of(*LLAMA31_JOB, "train.activation_offload=true"), 1, 2048, device="cpu")
    assert on_cpu.total() == est.estimate(config_of(*LLAMA31_JOB), 1, 2048, device="cpu").total() and on_cpu.host_activations == 0


def test_offloaded_activations_formula():
    """One layer back at a time in backward, after the loss; the rest in host memory (numbers by hand)."""
    split = est.offloaded_activations(tokens=10, layers_held=4, layer=100, layer_input=8, outside=3, loss=500, resident=7)
    assert (split.device, split.device_checkpointed) == (10 * 3 + 1000 + 7, 10 * 3 + 1080 + 7)  # one layer (and its input) outweighs the loss
    assert (split.host, split.host_checkpointed) == (10 * 4 * 100, 10 * 4 * 8)
    assert est.offloaded_activations(10, 4, 100, 8, 3, loss=5000, resident=0).device == 10 * 3 + 5000


def test_fit_search_ranks_the_chunked_loss_offload_and_sharded_qlora_by_cost():
    """--fit proposes the chunked loss where it is off (~free), activation offload on CUDA (cheap beside checkpointing,
    PCIe-bound alone), CPU offload of the optimizer states where the plugin can, and FSDP with QLoRA; cheapest first."""
    off = config_of(*LLAMA31_JOB, "train.loss_chunks=off")
    ranked = est.fitting_alternatives(off, 1, 17 * est.GIB, seq_len=2048)  # checkpointing and the chunked loss alone: 17.47
    assert ranked[0].overrides == ("train.gradient_checkpointing=true", "train.activation_offload=true", "train.loss_chunks=auto")
    assert [a.cost for a in ranked] == sorted(a.cost for a in ranked)
    offload_alone = next(a for a in ranked if a.overrides == ("train.activation_offload=true", "train.loss_chunks=auto"))
    assert offload_alone.cost > ranked[0].cost  # without checkpointing every saved tensor crosses PCIe
    assert not any("train.activation_offload=true" in a.overrides for a in est.fitting_alternatives(off, 1, 17 * est.GIB, "cpu", 2048))
    # Llama-2-7B LoRA on two GPUs in 4.5 GiB (issue 26's shape, smaller): neither sharding (9.0) nor QLoRA (5.2) fits
    # alone; FSDP with CPU offload (2.7) and FSDP-QLoRA (4.0) do, in that order of cost.
    seed = config_of("model.name=llama2-7b", "method=lora", "train.precision=bf16", "train.batch_size=4", "train.gradient_checkpointing=true")
    changes = [a.overrides for a in est.fitting_alternatives(seed, 2, 4.5 * est.GIB, seq_len=512)]
    assert changes.index(("plugin.name=torch_fsdp", "plugin.cpu_offload=true")) < changes.index(("plugin.name=torch_fsdp", "method=qlora"))
    assert ("plugin.name=torch_fsdp",) not in changes and ("method=qlora",) not in changes


def test_fit_proposes_qlora_with_tensor_parallelism_and_single_quantization():
    """Issue 26: --fit proposes QLoRA under tensor parallelism where it fits, with quantization.double_quant=false (each rank
    quantizes its own shards; the default double quantization is refused there) and the reason, on its line."""
    from finetune.config import validate

    cfg = config_of("model.name=llama3.1-70b", "method=lora", "train.precision=bf16", "train.batch_size=1", "eval.batch_size=1", "train.gradient_checkpointing=true")
    ranked = est.fitting_alternatives(cfg, 4, 24 * est.GIB, seq_len=2048)
    tp = next(a for a in ranked if "plugin.name=hybrid_parallel" in a.overrides)
    assert tp.overrides == ("plugin.name=hybrid_parallel", "plugin.tp_size=4", "method=qlora", "quantization.double_quant=false")
    assert "double quantization" in tp.reason and tp.reason in tp.describe()
    changed = est.with_overrides(cfg, tp.overrides)
    assert not [p for p in validate(changed, 4, has_cuda=True) if not p.startswith(est.ignored_problems())]
    assert tp.peak_bytes == est.estimate(changed, 4, 2048, "cuda", est.quantization_of(changed)).total() <= 24 * est.GIB
    assert tp.reason in est.format_fit(cfg, 4, 24 * est.GIB, "cuda", 2048)
    # The proposals that keep one rank's whole model quantized keep the default (and carry no reason).
    fsdp = next(a for a in ranked if a.overrides == ("plugin.name=torch_fsdp", "method=qlora"))
    assert not fsdp.reason


def test_sequence_parallelism_divides_the_activations_and_adds_its_exchange_buffers():
    """plugin.sp_size / sp_mode: a rank keeps the activations of its 1/sp of each sequence (its share of the loss too,
    under all_to_all) plus one layer's exchange buffers: all_to_all's q, k and v parts sent and received (2 x 3h per
    local token here, Llama-2-7B has no GQA), split_gather's whole-sequence gather and reduce-scatter (2h per token)."""
    # The loss over the full logits throughout: sequence parallelism keeps it (train.loss_chunks), one process would chunk it.
    args = ("model.name=llama2-7b", "method=lora", "train.precision=bf16", "train.batch_size=2", "plugin.name=hybrid_parallel", "train.loss_chunks=off")
    seq, hidden, c = 4096, 4096, 2
    tokens = 2 * seq
    one = est.estimate(config_of(*args), 1, seq)
    ulysses = est.estimate(config_of(*args, "plugin.sp_size=4"), 4, seq)
    assert (ulysses.setup["sp"], ulysses.setup["dp"]) == (4, 1)
    assert ulysses.activations == pytest.approx(one.activations / 4 + 2 * (tokens / 4) * 3 * hidden * c)
    # all_to_all's ranks synchronize gradients with the data-parallel ones, so ZeRO shards over both.
    zero = est.estimate(config_of(*args, "plugin.zero_stage=1"), 1, seq)
    assert est.estimate(config_of(*args, "plugin.zero_stage=1", "plugin.sp_size=4"), 4, seq).optimizer_states == pytest.approx(zero.optimizer_states / 4)
    # split_gather over tp=2: everything tensor parallelism left whole is split too, so every activation is halved
    # (the loss over the gathered sequence holds half the vocabulary), plus what tensor parallelism saves that a single
    # process does not: the column-parallel q/k/v and MLP-in inputs (LoRA's dropout reads its own copy) of its half of
    # the tokens, and the head's input over the gathered sequence.
    megatron = est.estimate(config_of(*args, "plugin.tp_size=2", "plugin.sp_mode=split_gather"), 2, seq)
    assert (megatron.setup["sp"], megatron.setup["tp"]) == (2, 2)
    column_inputs = tokens / 2 * c * hidden * 2 * 32 + tokens * c * hidden
    assert megatron.activations == pytest.approx(one.activations / 2 + 2 * tokens * hidden * c + column_inputs)
    # Predicted (issue 27): Llama-2-7B LoRA at 32,768 tokens with sp_size=8 on 8 GPUs, checkpointing: <= 40 GiB per GPU.
    long = est.estimate(config_of(*args, "train.batch_size=1", "train.gradient_checkpointing=true", "plugin.sp_size=8"), 8, 32768)
    assert long.total() <= 40 * 2**30


def test_the_table_gives_the_cuda_peak_without_the_context_beside_the_cards():
    """Published peaks are torch allocator figures: on CUDA the table's last line is the peak without the assumed
    context, the comparable number; on CPU there is no context and no such line."""
    cfg = config_of(*LLAMA31_JOB)
    cuda = est.estimate(cfg, 1, 2048, "cuda")
    lines = est.format_table(cuda).splitlines()
    assert lines[-1] == f"without it, as torch.cuda.max_memory_allocated reads the peak: {gib(cuda.total() - est.CUDA_CONTEXT_BYTES)} GiB per rank"
    assert gib(cuda.total()) in lines[-3]
    assert "max_memory_allocated" not in est.format_table(est.estimate(cfg, 1, 2048, "cpu"))
