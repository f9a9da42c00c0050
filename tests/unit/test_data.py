"""Data module: file formats, splits and slices, truncation and dropping, bad rows, the tokenized-data cache."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from finetune.assets import gpt2_tokenizer
from finetune.config import DataConfig
from finetune.corpus import chat_records, instruction_records, preference_records, topic_records
from finetune.data import IGNORE_INDEX, DataError, build_data, collate, load_records, load_splits, select_slice, split_by_group
from finetune.tasks import build_task
from tests.conftest import write_classification_file

INSTRUCTION = build_task("instruction", DataConfig())


def rows_of(n: int) -> list[dict]:
    return [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(n)]


def test_all_four_formats_load_alike(tmp_path, instruction_file):
    rows = [json.loads(line) for line in instruction_file.read_text().splitlines()]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "train.csv", index=False)
    frame.to_parquet(tmp_path / "train.parquet")
    expected = load_records(str(instruction_file), INSTRUCTION)
    assert len(expected) == 64 and expected[3]["_row"] == 4
    for name in ("train.json", "train.csv", "train.parquet"):
        assert load_records(str(tmp_path / name), INSTRUCTION) == expected, name


def test_csv_integer_labels_with_a_blank_cell(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("text,label\nhello,1\nworld,0\nagain,\n")  # pandas reads the column as float
    task = build_task("classification", DataConfig())
    with pytest.raises(DataError, match=f"^{path} row 3: missing field 'label'$"):
        load_records(str(path), task)
    path.write_text("text,label\nhello,1\nworld,0\n")
    assert [r["label"] for r in load_records(str(path), task)] == [1, 0]


def test_split_is_disjoint_by_group_and_seeded():
    records = [{"instruction": f"q{i % 20}", "input": "", "output": f"a{i}"} for i in range(100)]
    train, held = split_by_group(records, 0.1, seed=1, task=INSTRUCTION)
    assert len(train) + len(held) == 100
    assert {r["instruction"] for r in train}.isdisjoint({r["instruction"] for r in held})
    assert len({r["instruction"] for r in held}) == 2
    assert split_by_group(records, 0.1, seed=1, task=INSTRUCTION) == (train, held)


@pytest.mark.parametrize(
    "spec, expected",
    [("10", range(0, 10)), ("25%", range(0, 10)), ("10:30", range(10, 30)), ("2.5%:5%", range(1, 2)), ("35:", range(35, 40)), (":7", range(0, 7)), ("99%", range(0, 39))],
)
def test_split_slice_counts_are_exact(spec, expected):
    records = rows_of(40)
    assert select_slice(records, spec, "f.jsonl") == [records[i] for i in expected]


def test_split_slice_past_the_end_or_empty_is_refused():
    with pytest.raises(DataError, match="^data.split_slice=10:50: asks for records up to 50 but f.jsonl has 40 training records$"):
        select_slice(rows_of(40), "10:50", "f.jsonl")
    with pytest.raises(DataError, match="selects no records"):
        select_slice(rows_of(5), "10%", "f.jsonl")  # floor(0.5) = 0


def test_split_slice_applies_after_the_eval_hold_out(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_of(40)))
    full = load_splits(DataConfig(train_path=str(path), eval_fraction=0.25), seed=0)
    sliced = load_splits(DataConfig(train_path=str(path), eval_fraction=0.25, split_slice="10%"), seed=0)
    assert len(full.train) == 30 and sliced.eval == full.eval  # the held-out split does not move with the slice
    assert sliced.train == full.train[:3]


def test_build_data_holds_out_eval_and_caches(tmp_path, instruction_file, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(train_path=str(instruction_file), eval_fraction=0.25)
    splits = load_splits(cfg, seed=0)
    built = build_data(cfg, gpt2_tokenizer(), splits)
    assert len(built.train) + len(built.eval) == 64 and len(built.eval) > 0
    assert built.cache.startswith("built ")
    again = build_data(cfg, gpt2_tokenizer(), splits)
    assert again.cache == built.cache.replace("built", "hit") and (again.train, again.eval) == (built.train, built.eval)
    # A different setting or a changed file is a different cache entry.
    assert build_data(DataConfig(train_path=str(instruction_file), eval_fraction=0.25, max_length=64), gpt2_tokenizer(), splits).cache.startswith("built ")
    os.utime(instruction_file, ns=(1, 1))
    assert build_data(cfg, gpt2_tokenizer(), splits).cache.startswith("built ")
    assert build_data(DataConfig(train_path=str(instruction_file), cache=False), gpt2_tokenizer(), splits).cache == "off"


def test_truncate_and_drop_are_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    rows = rows_of(6) + [{"instruction": "Say it.", "input": "", "output": "word " * 100}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for truncation, expected in (("truncate", (1, 0, 7)), ("drop", (0, 1, 6))):
        cfg = DataConfig(train_path=str(path), eval_path=str(path), max_length=60, truncation=truncation)
        data = build_data(cfg, gpt2_tokenizer(), load_splits(cfg, seed=0))
        assert (data.truncated // 2, data.dropped // 2, len(data.train)) == expected  # train and eval hold the same file
        assert max(len(s["input_ids"]) for s in data.train) <= 60


@pytest.mark.parametrize("truncation", ["truncate", "drop"])
def test_every_sample_too_long_is_one_clear_error(tmp_path, truncation, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"instruction": "Say it " * n, "output": "ok"}) + "\n" for n in (40, 30, 50)))
    cfg = DataConfig(train_path=str(path), eval_path=str(path), max_length=20, truncation=truncation)
    with pytest.raises(DataError) as err:
        build_data(cfg, gpt2_tokenizer(), load_splits(cfg, seed=0))
    message = str(err.value)
    assert message.startswith(f"{path}: every training sample is longer than data.max_length=20 tokens") and "(the shortest, row 2, has" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "task, rows, message",
    [
        ("instruction", [{"instruction": "a", "output": "b"}, {"instruction": "c"}], "row 2: missing field 'output'"),
        ("instruction", [{"instruction": "a", "output": "  "}], "row 1: field 'output' is empty"),
        ("instruction", [{"instruction": 3, "output": "b"}], "row 1: field 'instruction' must be a string, got int"),
        ("summarization", [{"id": 1, "dialogue": "A: hi", "summary": "x"}, {"id": 2, "dialogue": "", "summary": "y"}], "row 2: field 'dialogue' is empty"),
        ("chat", [{"messages": [{"role": "user", "content": "hi"}]}], "row 1: no assistant message, so nothing to train on"),
        ("chat", [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}], "row 1: message 2 has role 'bot'; expected one of system, user, assistant"),
        ("chat", [{"messages": "hello"}], "row 1: field 'messages' is a string but not a JSON list"),
        ("classification", [{"text": "a", "label": "x"}, {"text": "b", "label": 1.5}], "row 2: field 'label' must be a string or an integer, got float 1.5"),
        ("classification", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c", "label": "z"}], "row 3: label 'z' is not in the label set (x, y)"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, task, rows, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = DataConfig(train_path=str(path), labels=["x", "y"] if task == "classification" else [])
    with pytest.raises(DataError) as err:
        load_splits(cfg, seed=0, task=task)
    assert str(err.value).startswith(f"{path} ") and message in str(err.value) and "\n" not in str(err.value)


def test_eval_label_outside_the_training_labels(tmp_path):
    train = write_classification_file(tmp_path / "train.csv")
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"text": "rain rain", "label": "weather"}) + "\n" + json.dumps({"text": "ice", "label": "hockey"}) + "\n")
    with pytest.raises(DataError, match=f"^{evals} row 2: label 'hockey' is not in the label set \\(food, sports, weather\\)$"):
        load_splits(DataConfig(train_path=str(train), eval_path=str(evals)), seed=0, task="classification")


def test_unreadable_and_wrong_files(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": \n')
    with pytest.raises(DataError, match=r"broken.jsonl line 1: not valid JSON \(Expecting value; column 32\)"):
        load_records(str(broken), INSTRUCTION)
    (tmp_path / "x.txt").write_text("a,b\n")
    with pytest.raises(DataError, match="expected a .json, .jsonl, .csv, .parquet file"):
        load_records(str(tmp_path / "x.txt"), INSTRUCTION)


def test_chatterbot_corpus_shapes():
    pairs = [(r["instruction"], r["output"]) for r in instruction_records()]
    assert len(pairs) == len(set(pairs)) > 1000
    chats, topics = chat_records(), topic_records()
    assert len(chats) > 800 and all(len(c["messages"]) >= 2 and c["messages"][0]["role"] == "user" for c in chats)
    assert [m["role"] for m in max(chats, key=lambda c: len(c["messages"]))["messages"]][:4] == ["user", "assistant", "user", "assistant"]
    labels = {t["label"] for t in topics}
    assert len(topics) > 800 and {"greetings", "food", "sports", "trivia"} <= labels and len(labels) == 21


def test_chatterbot_preference_pairs_reject_an_off_topic_reply_the_same_way_each_time():
    """Every instruction pair becomes a preference pair (unless no other reply exists): its own reply chosen, a reply
    found only under other topics rejected; the pairs pass the preference task's row checks and never change."""
    from finetune.corpus import _turn_pairs
    from finetune.tasks import build_task

    pairs, records = _turn_pairs(), preference_records()
    assert len(records) == len(pairs) > 1000 and records == preference_records()
    topics_of: dict[str, set[str]] = {}
    for (_, reply), topic in pairs.items():
        topics_of.setdefault(reply, set()).add(topic)
    for record, ((prompt, reply), topic) in zip(records, pairs.items()):
        assert (record["prompt"], record["chosen"]) == (prompt, reply) and record["rejected"] != reply
        assert topics_of[record["rejected"]] - {topic}  # the rejected reply answers some other topic's prompt
    assert len({r["rejected"] for r in records}) > 500  # spread over the corpus, not a few fixed replies
    task = build_task("preference", DataConfig(train_path="chatterbot-corpus:preference"))
    for i, record in enumerate(records):
        task.check(record, f"row {i}")


def test_collate_pads_right_and_masks():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    classes = collate([{"input_ids": [5, 6], "label": 2}, {"input_ids": [8], "label": IGNORE_INDEX}], pad_token_id=1)
    assert classes["labels"].tolist() == [2, IGNORE_INDEX] and classes["input_ids"].tolist() == [[5, 6], [8, 1]]
