"""Data module: exact label masking, EOS, prompt-disjoint splits, the chatterbot corpus, bad rows."""

from __future__ import annotations

import json

import pytest

from finetune.assets import gpt2_tokenizer
from finetune.config import DataConfig
from finetune.data import IGNORE_INDEX, DataError, build_data, chatterbot_records, collate, load_records, load_splits, prompt_ids, split_by_prompt, tokenize


def test_alpaca_masking_token_by_token():
    tok = gpt2_tokenizer()
    record = {"instruction": "Name a fruit.", "input": "", "output": "An apple."}
    sample, cut = tokenize(tok, record, max_length=512)
    prompt = tok("Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nName a fruit.\n\n### Response:\n")["input_ids"]
    response = tok("An apple.")["input_ids"] + [tok.eos_token_id]
    assert not cut
    assert sample["input_ids"] == prompt + response
    assert sample["labels"] == [IGNORE_INDEX] * len(prompt) + response


def test_input_field_uses_the_input_template():
    tok = gpt2_tokenizer()
    text = tok.decode(prompt_ids(tok, {"instruction": "Sum.", "input": "2 and 3", "output": "5"}))
    assert "### Input:\n2 and 3" in text


def test_chat_template_masking():
    tok = gpt2_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    sample, _ = tokenize(tok, {"instruction": "Hi", "input": "", "output": "Hello there"}, max_length=512)
    prompt = tok("<user>Hi<assistant>")["input_ids"]
    assert sample["input_ids"][: len(prompt)] == prompt
    assert sample["labels"] == [IGNORE_INDEX] * len(prompt) + tok("Hello there")["input_ids"] + [tok.eos_token_id]


def test_truncation_is_counted():
    tok = gpt2_tokenizer()
    sample, cut = tokenize(tok, {"instruction": "Say it.", "input": "", "output": "word " * 100}, max_length=40)
    assert cut and len(sample["input_ids"]) == 40 == len(sample["labels"])


def test_split_is_disjoint_by_prompt_and_seeded():
    records = [{"instruction": f"q{i % 20}", "input": "", "output": f"a{i}"} for i in range(100)]
    train, held = split_by_prompt(records, 0.1, seed=1)
    assert len(train) + len(held) == 100
    assert {r["instruction"] for r in train}.isdisjoint({r["instruction"] for r in held})
    assert len({r["instruction"] for r in held}) == 2
    assert split_by_prompt(records, 0.1, seed=1) == (train, held)


def test_chatterbot_corpus_pairs_are_unique():
    records = chatterbot_records()
    pairs = [(r["instruction"], r["output"]) for r in records]
    assert len(pairs) == len(set(pairs)) > 1000
    assert all(r["instruction"] and r["output"] for r in records)


def test_collate_pads_right_and_masks():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_json_array_and_jsonl_load_alike(tmp_path, instruction_file):
    rows = [json.loads(line) for line in instruction_file.read_text().splitlines()]
    array = tmp_path / "train.json"
    array.write_text(json.dumps(rows))
    assert load_records(str(array)) == load_records(str(instruction_file))


def test_build_data_holds_out_eval(instruction_file):
    cfg = DataConfig(train_path=str(instruction_file), eval_fraction=0.25)
    data = build_data(cfg, gpt2_tokenizer(), load_splits(cfg, seed=0))
    assert len(data.train) + len(data.eval) == 64 and len(data.eval) > 0


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], "row 2: missing field 'output'"),
        ([{"instruction": "a", "output": "  "}], "row 1: field 'output' is empty"),
        ([{"instruction": 3, "output": "b"}], "row 1: field 'instruction' must be a string, got int"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, rows, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError) as err:
        load_records(str(path))
    assert str(path) in str(err.value) and message in str(err.value)


def test_unreadable_and_wrong_files(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": \n')
    with pytest.raises(DataError, match="cannot be read as JSON"):
        load_records(str(broken))
    with pytest.raises(DataError, match="expected a .json or .jsonl"):
        (tmp_path / "x.csv").write_text("a,b\n")
        load_records(str(tmp_path / "x.csv"))
