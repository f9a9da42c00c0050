"""Today's model families (issue 26): one record each (default LoRA targets, what hybrid_parallel can shard),
a tiny random config of each family's own architecture that builds, adapts and is counted exactly by the
estimator. Training under every plugin each claims, against one process: tests/distributed/test_fidelity.py."""

from __future__ import annotations

import pytest
import torch

from finetune import estimate as est
from finetune.architectures import ARCHITECTURES, ESTIMATE_ONLY, NAMED_CONFIGS, architecture, model_type
from finetune.config import ConfigError, LoraConfig, ModelConfig, load_config
from finetune.model import build_lora_config, build_model
from tests.conftest import REPO

FAMILY_MODELS = ("tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3", "tiny-phi3", "tiny-mixtral")


def test_default_lora_targets_of_every_family():
    assert {t: a.lora_targets for t, a in ARCHITECTURES.items()} == {
        "gpt2": ("c_attn",),
        "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "gemma2": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "gemma3_text": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "phi3": ("qkv_proj", "o_proj"),  # fused q/k/v
        "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"),  # attention and every expert
        "roberta": ("query", "key", "value"),
        "bert": ("query", "key", "value"),
        "xlm-roberta": ("query", "key", "value"),
        "distilbert": ("q_lin", "k_lin", "v_lin"),
    }


def count(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_tiny_family_trains_a_step_adapts_its_default_targets_and_is_counted_exactly(name):
    model, tokenizer = build_model(ModelConfig(name=name), seed=0)
    record = architecture(model_type(name))
    assert type(model).__name__.lower().startswith(record.model_type.split("_")[0])  # its own architecture, not Llama's
    assert model.config._attn_implementation == record.default_attention  # Gemma: eager (sdpa drops soft-capping)
    shape = est.model_shape(est.load_model_config(name), "full", LoraConfig())
    assert shape.total_params == count(model) and shape.layers == model.config.num_hidden_layers
    from peft import get_peft_model

    peft_model = get_peft_model(model, build_lora_config(model, LoraConfig(dropout=0.0)))
    adapted = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(record.lora_targets)
    lora_shape = est.model_shape(est.load_model_config(name), "lora", LoraConfig(dropout=0.0))
    assert lora_shape.trainable_params == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    ids = tokenizer(["Repeat: the cat sat", "one two"], return_tensors="pt", padding=True).input_ids
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-gemma2", "tiny-gemma3", "tiny-phi3"])
@pytest.mark.parametrize("setup", ["tp2", "pp2"])
def test_hybrid_parallel_refuses_families_without_a_shardformer_policy(name, setup):
    with pytest.raises(ConfigError) as err:
        load_config(["--config", str(REPO / "booster_configs" / f"{setup}.yaml"), f"model.name={name}"], world_size=2)
    line = str(err.value)
    assert line.startswith("plugin.name=hybrid_parallel: ColossalAI 0.5.0's shardformer has no policy for ") and "\n" not in line
    assert line.endswith("use torch_ddp, low_level_zero or torch_fsdp") and "(and" not in line
    for plugin in ("torch_ddp", "zero2", "fsdp"):  # the plugins the line names take it
        assert load_config(["--config", str(REPO / "booster_configs" / f"{plugin}.yaml"), f"model.name={name}"], world_size=2).model.name == name


def test_tensor_parallel_qwen2_and_mixtral_need_a_vocabulary_tp_size_divides(tmp_path):
    """Their ColossalAI policies split lm_head without padding: 50,257 rows (GPT-2's) would fail at boost."""
    config = est.load_model_config("tiny-qwen2")
    config.vocab_size = 50257
    config.save_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")  # a tokenizer file, so the model dir is complete
    with pytest.raises(ConfigError, match=r"plugin.tp_size=2: ColossalAI 0.5.0 splits Qwen2's lm_head without padding it, and the 50,257 tokens"):
        load_config(["--config", str(REPO / "booster_configs" / "tp2.yaml"), f"model.name={tmp_path}"], world_size=2)
    assert load_config(["--config", str(REPO / "booster_configs" / "pp2.yaml"), f"model.name={tmp_path}"], world_size=2)  # no TP: no split
    assert load_config(["--config", str(REPO / "booster_configs" / "tp2.yaml"), "model.name=tiny-mixtral", "method=full"], world_size=2)  # 50,304 rows


def test_mixtral_lora_under_tensor_parallelism_adapts_attention_only():
    with pytest.raises(ConfigError, match=r"lora.target_modules: \['w1', 'w2', 'w3'\] cannot be adapted under tensor parallelism in mixtral; these can: q_proj, k_proj, v_proj, o_proj"):
        load_config(["--config", str(REPO / "booster_configs" / "tp2_lora.yaml"), "model.name=tiny-mixtral"], world_size=2)


@pytest.mark.parametrize("name", sorted(ESTIMATE_ONLY))
def test_public_configs_are_for_the_estimator_only(name):
    with pytest.raises(ConfigError, match=f"model.name: {name} is a public config for the memory estimator"):
        load_config([f"model.name={name}"], world_size=1)


def test_tensor_parallelism_splits_mixtral_attention_and_vocabulary_but_not_its_experts():
    """ColossalAI's Mixtral policy splits attention, the router and the vocabulary; every rank holds all experts."""
    from finetune.estimate.cli import estimate_request

    h, kv, vocab, layers = 4096, 1024, 32000, 32
    split = layers * (2 * h * h + 2 * h * kv + 8 * h) + 2 * vocab * h  # q/o, k/v, router; embedding and lm_head
    tp2 = estimate_request(["model=mixtral-8x7b", "method=full", "precision=bf16", "plugin=tp2", "world_size=2"])
    assert tp2.params == 46_702_792_704
    assert tp2.weights == pytest.approx(2 * (tp2.params - split / 2), abs=8)
