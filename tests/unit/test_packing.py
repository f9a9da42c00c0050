"""Sequence packing: rows hold every sample once within max_length, and packed batches score exactly like padded ones."""

from __future__ import annotations

import random

import pytest
import torch

from finetune.config import DataConfig, ModelConfig
from finetune.data import IGNORE_INDEX, Padding, collate, load_splits, model_inputs, non_pad_tokens
from finetune.model import ModelError, build_model
from finetune.packing import collate_packed, pack, packed_attention
from finetune.tasks import build_task


def lm_samples(tokenizer, instruction_file) -> list[dict]:
    """Real instruction samples (prompt labels -100) of varied lengths."""
    task = build_task("instruction", DataConfig())
    splits = load_splits(DataConfig(train_path=str(instruction_file), eval_path=str(instruction_file)), seed=0)
    return [task.tokenize(tokenizer, r, 512)[0] for r in splits.train[:12]]


def test_pack_places_every_sample_once_within_max_length():
    rng = random.Random(0)
    samples = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate(rng.randint(1, 60) for _ in range(200))]
    rows = pack(samples, max_length=64)
    assert all(sum(r["lengths"]) == len(r["input_ids"]) <= 64 for r in rows)
    assert sorted(t for r in rows for t in set(r["input_ids"])) == list(range(200))
    # a new row opens only when no row has room, so at most one row is half empty or worse
    assert sum(len(r["input_ids"]) <= 32 for r in rows) <= 1
    # each sample's first label is masked: it would be predicted from the previous sample
    first = rows[0]
    starts = [sum(first["lengths"][:k]) for k in range(len(first["lengths"]))]
    assert all(first["labels"][s] == IGNORE_INDEX for s in starts)


def test_packed_batch_layout():
    rows = [{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "lengths": [3, 2]}, {"input_ids": [6, 7], "labels": [-100, 7], "lengths": [2]}]
    batch = collate_packed(rows, pad_token_id=0, attention="additive_mask")
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert non_pad_tokens(batch) == 7 and "non_pad_tokens" not in model_inputs(batch)
    allowed = batch["attention_mask"][0, 0] == 0
    assert allowed.tolist()[4] == [False, False, False, True, True]  # token 5 sees only its own sample
    assert "attention_mask" not in collate_packed(rows, 0, attention="position_ids")  # padding-free (flash attention)


def test_sequence_parallel_padding_rounds_batches_up_to_a_multiple():
    """Sequence parallelism splits every batch's sequence evenly over its ranks: padded and packed batches are widened
    to a multiple of its degree (pipelines: at least their fixed width first); the padding is masked and unscored."""
    assert [Padding(multiple=4)(n) for n in (1, 4, 5)] == [4, 4, 8]
    assert Padding(width=10, multiple=4)(7) == 12 and Padding()(7) == 7
    rows = [{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "lengths": [3, 2]}]
    packed = collate_packed(rows, pad_token_id=0, attention="additive_mask", padding=Padding(multiple=4))
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0]] and packed["labels"][0, 5:].eq(IGNORE_INDEX).all()
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]] and non_pad_tokens(packed) == 5
    assert (packed["attention_mask"][0, 0, 4] == 0).tolist() == [False, False, False, True, True, False, False, False]
    padded = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}], pad_token_id=0, padding=Padding(multiple=2))
    assert padded["input_ids"].tolist() == [[1, 2, 3, 0]] and padded["attention_mask"].tolist() == [[1, 1, 1, 0]] and padded["labels"][0, 3] == IGNORE_INDEX


@pytest.mark.parametrize(
    "name, attention",
    [("tiny-gpt2", "sdpa"), ("tiny-llama", "sdpa"), ("tiny-llama", "eager"), *((f"tiny-{family}", "auto") for family in ("mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral"))],
)
def test_packed_and_padded_batches_give_the_same_loss(instruction_file, name, attention):
    model, tokenizer = build_model(ModelConfig(name=name, attn_implementation=attention), seed=0)
    model.eval()
    samples = lm_samples(tokenizer, instruction_file)
    padded = collate(samples, tokenizer.pad_token_id)
    rows = pack(samples, max_length=128)
    assert len(rows) < len(samples)  # several samples share a row
    packed = collate_packed(rows, tokenizer.pad_token_id, packed_attention(model))
    assert non_pad_tokens(packed) == non_pad_tokens(padded)
    with torch.no_grad():
        expected = model(**padded).loss.item()
        got = model(**model_inputs(packed)).loss.item()
        after = model(**padded).loss.item()  # the packed attention path leaves unpacked batches as they were
    assert abs(got - expected) < 1e-5 and abs(after - expected) < 1e-5, (got, expected, after)


def test_packing_refuses_models_without_a_packed_attention_path():
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt_neox", vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ModelError, match="data.packing=true: no packed attention for model type 'gpt_neox'"):
        packed_attention(model)
