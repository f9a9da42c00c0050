"""Model factory: named configs, the real GPT-2 tokenizer, LoRA defaults and the trainable line."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from finetune.config import LoraConfig, ModelConfig
from finetune.model import ModelError, build_lora_config, build_model, count_parameters, resolve_source, trainable_line


def test_gpt2_is_the_public_124m_config():
    model, tokenizer = build_model(ModelConfig(name="gpt2"), seed=0)
    assert count_parameters(model) == (124_439_808, 124_439_808)
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256
    assert tokenizer.decode(tokenizer("Hello world, 2024!")["input_ids"]) == "Hello world, 2024!"


def test_same_seed_same_weights():
    a, _ = build_model(ModelConfig(name="tiny-llama"), seed=3)
    b, _ = build_model(ModelConfig(name="tiny-llama"), seed=3)
    c, _ = build_model(ModelConfig(name="tiny-llama"), seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("name, targets, expected", [("gpt2", ["c_attn"], 294_912), ("tiny-llama", ["q_proj", "k_proj", "v_proj", "o_proj"], 2 * 4 * 8 * (64 + 64) - 2 * 2 * 8 * 32)])
def test_lora_defaults_and_peft_trainable_line(name, targets, expected):
    from peft import get_peft_model

    model, _ = build_model(ModelConfig(name=name), seed=0)
    lora = build_lora_config(model, LoraConfig(r=8))
    assert sorted(lora.target_modules) == sorted(targets)
    peft_model = get_peft_model(model, lora)
    trainable, total = count_parameters(peft_model)
    assert trainable == expected
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        peft_model.print_trainable_parameters()
    assert printed.getvalue().strip() == trainable_line(trainable, total)


def test_unknown_lora_target_lists_the_real_ones():
    model, _ = build_model(ModelConfig(name="tiny-gpt2"), seed=0)
    with pytest.raises(ModelError, match=r"\['q_proj'\] not found in gpt2; its projections are: c_attn, c_fc, c_proj"):
        build_lora_config(model, LoraConfig(target_modules=["q_proj"]))


def test_local_hf_dir_round_trip(tmp_path):
    model, tokenizer = build_model(ModelConfig(name="tiny-llama"), seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert resolve_source(str(tmp_path)).kind == "dir"
    again, _ = build_model(ModelConfig(name=str(tmp_path)), seed=99)
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), again.parameters()))


def test_bad_model_sources(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_source(str(tmp_path))
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_source(str(tmp_path / "missing.gguf"))
