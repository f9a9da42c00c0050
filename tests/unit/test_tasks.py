"""Tasks: exact label masking token by token for each task, classification encoding and metrics, config checks."""

from __future__ import annotations

import pytest
import torch

from finetune.assets import gpt2_tokenizer, roberta_tokenizer
from finetune.config import TASKS as CONFIG_TASKS
from finetune.config import Config, DataConfig, build_config, validate
from finetune.evaluation import macro_f1
from finetune.tasks import IGNORE_INDEX, TASKS, build_task
from finetune.tasks.classification import label_set
from tests.conftest import REPO


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_registry_is_the_config_choice():
    assert CONFIG_TASKS == tuple(TASKS) == ("instruction", "summarization", "chat", "classification", "preference", "reward")
    assert validate(build_config([("c", "task", "chats")]), 1, False)[0] == "task: unknown value 'chats' (did you mean 'chat'?); choose from instruction, summarization, chat, classification, preference, reward"


def test_instruction_masking_token_by_token(gpt2):
    sample, length = build_task("instruction", DataConfig()).tokenize(gpt2, {"instruction": "Name a fruit.", "input": "", "output": "An apple."}, max_length=512)
    prompt = ids(gpt2, "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nName a fruit.\n\n### Response:\n")
    response = ids(gpt2, "An apple.") + [gpt2.eos_token_id]
    assert sample["input_ids"] == prompt + response and length == len(prompt + response)
    assert sample["labels"] == [IGNORE_INDEX] * len(prompt) + response


def test_instruction_input_template_and_chat_template(gpt2):
    task = build_task("instruction", DataConfig())
    assert "### Input:\n2 and 3" in gpt2.decode(task.prompt_ids(gpt2, {"instruction": "Sum.", "input": "2 and 3", "output": "5"}))
    tok = gpt2_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    sample, _ = task.tokenize(tok, {"instruction": "Hi", "input": "", "output": "Hello there"}, max_length=512)
    prompt = ids(tok, "<user>Hi<assistant>")
    assert sample["input_ids"][: len(prompt)] == prompt
    assert sample["labels"] == [IGNORE_INDEX] * len(prompt) + ids(tok, "Hello there") + [tok.eos_token_id]


def test_summarization_masking_token_by_token(gpt2):
    record = {"dialogue": "Anna: I bring cake.\nBen: Fine.", "summary": "Anna brings cake."}
    sample, _ = build_task("summarization", DataConfig()).tokenize(gpt2, record, max_length=512)
    prompt = ids(gpt2, "Summarize the following dialogue.\n\n### Dialogue:\nAnna: I bring cake.\nBen: Fine.\n\n### Summary:\n")
    summary = ids(gpt2, "Anna brings cake.") + [gpt2.eos_token_id]
    assert sample["input_ids"] == prompt + summary
    assert sample["labels"] == [IGNORE_INDEX] * len(prompt) + summary


def test_chat_masking_token_by_token_on_assistant_turns_only(gpt2):
    tok = gpt2_tokenizer()
    task = build_task("chat", DataConfig())
    task.prepare_tokenizer(tok)  # GPT-2 has no chat template: the default one is set (and saved with the model)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sky colour?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes, blue."},
    ]
    sample, _ = task.tokenize(tok, task.check({"messages": messages}, "row"), max_length=512)
    first = ids(tok, "### System:\nBe brief.\n\n### User:\nSky colour?\n\n### Assistant:\n")
    answer = ids(tok, "Blue.") + [tok.eos_token_id]
    between = ids(tok, "\n\n### User:\nSure?\n\n### Assistant:\n")
    second = ids(tok, "Yes, blue.") + [tok.eos_token_id]
    assert sample["input_ids"] == first + answer + between + second
    assert sample["labels"] == [IGNORE_INDEX] * len(first) + answer + [IGNORE_INDEX] * len(between) + second
    assert task.reference({"messages": messages}) == "Yes, blue."
    assert tok.decode(task.prompt_ids(tok, {"messages": messages})).endswith("Sure?\n\n### Assistant:\n")


def test_classification_encoding_roberta_and_gpt2(gpt2):
    task = build_task("classification", DataConfig(), labels=["neg", "pos"])
    rob = roberta_tokenizer()
    sample, length = task.tokenize(rob, {"text": "good film", "text_pair": "very good", "label": "pos"}, max_length=64)
    assert sample == {"input_ids": [0, *[i + 4 for i in ids(gpt2, "good film")], 2, 2, *[i + 4 for i in ids(gpt2, "very good")], 2], "label": 1}
    assert length == len(sample["input_ids"])
    cut, length = task.tokenize(rob, {"text": "word " * 50, "text_pair": "", "label": "neg"}, max_length=8)
    assert len(cut["input_ids"]) == 8 and cut["input_ids"][0] == 0 and cut["input_ids"][-1] == 2 and length > 8 and cut["label"] == 0
    joined, _ = task.tokenize(gpt2, {"text": "good film", "text_pair": "very good", "label": "neg"}, max_length=64)
    assert joined["input_ids"] == ids(gpt2, "good film\nvery good")


def test_label_sets():
    records = [{"label": v} for v in (10, 2, 1, 2)]
    assert label_set(records, [], "f") == ["1", "2", "10"]  # integers sort numerically
    assert label_set([{"label": "b"}, {"label": "a"}], [], "f") == ["a", "b"]
    assert label_set([{"label": "a"}], ["z", "a"], "f") == ["z", "a"]  # declared order fixes the ids
    with pytest.raises(ValueError, match="only one label"):
        label_set([{"label": "a"}], [], "f")


def test_macro_f1_matches_hand_computation():
    confusion = torch.tensor([[2, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.float64)  # rows: truth, columns: prediction
    # class 0: F1 = 2*2/(3+2); class 1: 2*1/(1+2); class 2 never occurs: left out (as sklearn does)
    assert macro_f1(confusion) == pytest.approx((0.8 + 2 / 3) / 2)


@pytest.mark.parametrize(
    "settings, problem",
    [
        ({"task": "chat", "data.train_path": "chatterbot-corpus"}, "data.train_path=chatterbot-corpus holds instruction records, not chat records; use task=instruction or data.train_path=chatterbot-corpus:chat"),
        ({"task": "classification", "data.packing": True}, "data.packing=true: only for causal-LM tasks"),
        ({"data.packing": True, "plugin.name": "hybrid_parallel"}, "data.packing=true with plugin hybrid_parallel"),
        ({"task": "classification", "data.train_path": "chatterbot-corpus:topics", "model.name": "tiny-llama", "plugin.name": "hybrid_parallel", "plugin.tp_size": 2}, "task=classification for Llama with plugin.tp_size>1"),
        ({"data.split_slice": "1:2:3"}, "data.split_slice='1:2:3': '1:2' is not a record count"),
        ({"data.split_slice": "120%"}, "data.split_slice='120%': '120%' is over 100%"),
        ({"data.truncation": "cut"}, "data.truncation: unknown value 'cut'"),
        ({"data.labels": "a,b"}, "data.labels: only for task=classification"),
        ({"model.name": "tiny-roberta"}, "model.name=tiny-roberta is an encoder (roberta) and only serves task=classification"),
        ({"data.train_path": str(REPO / "README.md")}, f"data.train_path: {REPO / 'README.md'} is not a .json, .jsonl, .csv, .parquet file"),
    ],
)
def test_data_settings_are_validated(settings, problem):
    cfg = build_config([("command line", k, v) for k, v in settings.items()])
    problems = validate(cfg, world_size=2, has_cuda=False)
    assert any(p.startswith(problem) for p in problems), problems


def test_defaults_and_task_sources_validate():
    assert validate(Config(), 2, False) == []
    for task, source in (("chat", "chatterbot-corpus:chat"), ("classification", "chatterbot-corpus:topics")):
        cfg = build_config([("c", "task", task), ("c", "data.train_path", source), ("c", "model.name", "tiny-roberta" if task == "classification" else "tiny-gpt2")])
        assert validate(cfg, 2, False) == []


@pytest.mark.parametrize(
    "model, parallel",
    [
        ("tiny-roberta", {"plugin.tp_size": 2, "method": "full"}),
        ("tiny-roberta", {"plugin.pp_size": 2, "plugin.num_microbatches": 2, "method": "lora"}),
        ("tiny-gpt2", {"plugin.tp_size": 2, "method": "full"}),
        ("tiny-llama", {"plugin.pp_size": 2, "plugin.num_microbatches": 2, "method": "lora"}),
    ],
)
def test_classification_validates_under_hybrid_parallel(model, parallel):
    settings = {"task": "classification", "data.train_path": "chatterbot-corpus:topics", "model.name": model, "plugin.name": "hybrid_parallel", **parallel}
    assert validate(build_config([("c", k, v) for k, v in settings.items()]), 2, False) == []


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-roberta"])
def test_classification_heads_read_the_last_real_token(name):
    from finetune.config import ModelConfig
    from finetune.data import collate
    from finetune.model import build_model

    model, tokenizer = build_model(ModelConfig(name=name), seed=0, labels=["a", "b", "c"])
    assert model.config.num_labels == 3 and model.config.pad_token_id == tokenizer.pad_token_id and model.config.id2label[2] == "c"
    task = build_task("classification", DataConfig(), labels=["a", "b", "c"])
    samples = [task.tokenize(tokenizer, {"text": text, "text_pair": "", "label": "a"}, 64)[0] for text in ("a short one", "a much longer text than the first")]
    model.eval()
    with torch.no_grad():
        padded = model(**collate(samples, tokenizer.pad_token_id)).logits[0]  # sample 0 is right-padded here
        alone = model(**collate(samples[:1], tokenizer.pad_token_id)).logits[0]
    assert torch.allclose(padded, alone, atol=1e-5)
