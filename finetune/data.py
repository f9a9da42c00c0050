"""Data module: records from local files (or the offline chatterbot corpus), tokenized for causal-LM SFT.

Task `instruction` (Alpaca layout): each record has `instruction`, optional `input`, and `output`.
The prompt is the tokenizer's chat template when it has one, else the Alpaca template; the loss covers
only the response tokens (prompt labels are -100) and the response ends with EOS.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from finetune import assets
from finetune.config import DataConfig

IGNORE_INDEX = -100
CHATTERBOT = "chatterbot-corpus"
ALPACA_PROMPT = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class DataError(ValueError):
    """Bad data: names the file, the row and what is wrong."""


@dataclass
class SplitData:
    train: list[dict]  # tokenized samples: input_ids, labels
    eval: list[dict]
    eval_records: list[dict]  # raw held-out records, for generation prompts
    truncated: int  # samples cut at data.max_length


def chatterbot_records() -> list[dict]:
    """Consecutive turns of chatterbot-corpus's English conversations as unique instruction/output pairs."""
    english = assets.package_file("chatterbot_corpus", "data/english")
    pairs: dict[tuple[str, str], None] = {}  # dict keeps first-seen order and drops duplicates
    for path in sorted(english.glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text()).get("conversations", []):
            if not isinstance(conversation, list):  # one trivia.yml entry is a bare string
                continue
            turns = [str(t).strip() for t in conversation]
            for prompt, reply in zip(turns, turns[1:]):
                if prompt and reply:
                    pairs[(prompt, reply)] = None
    return [{"instruction": p, "input": "", "output": r} for p, r in pairs]


def load_records(path: str) -> list[dict]:
    """Instruction records from a JSON array / JSONL file (or the built-in chatterbot corpus), checked row by row."""
    if path == CHATTERBOT:
        return chatterbot_records()
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    if Path(path).suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: expected a .json or .jsonl file of {{instruction, input, output}} records")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a file it cannot parse is reported below, in one line
    try:
        rows = datasets.load_dataset("json", data_files=path, split="train")
    except Exception as err:  # datasets wraps JSON errors in several exception types
        raise DataError(f"{path}: cannot be read as JSON/JSONL ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    return [_check_record(path, i + 1, row) for i, row in enumerate(rows)]


def _check_record(path: str, row_number: int, row: dict) -> dict:
    for key in ("instruction", "output"):
        if key not in row or row[key] is None:
            raise DataError(f"{path} row {row_number}: missing field '{key}'")
        if not isinstance(row[key], str):
            raise DataError(f"{path} row {row_number}: field '{key}' must be a string, got {type(row[key]).__name__}")
        if not row[key].strip():
            raise DataError(f"{path} row {row_number}: field '{key}' is empty")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"{path} row {row_number}: field 'input' must be a string, got {type(extra).__name__}")
    return {"instruction": row["instruction"], "input": extra, "output": row["output"]}


def split_by_prompt(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out a seeded fraction of the distinct prompts, so no prompt is on both sides."""
    prompts = sorted({(r["instruction"], r["input"]) for r in records})
    random.Random(seed).shuffle(prompts)
    held_out = set(prompts[: max(1, round(len(prompts) * eval_fraction))])
    train = [r for r in records if (r["instruction"], r["input"]) not in held_out]
    return train, [r for r in records if (r["instruction"], r["input"]) in held_out]


def prompt_ids(tokenizer, record: dict) -> list[int]:
    """Token ids of the prompt part of a record (what the model sees before its response)."""
    if tokenizer.chat_template:
        user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
    template = ALPACA_PROMPT_WITH_INPUT if record["input"] else ALPACA_PROMPT
    return tokenizer(template.format(**record), add_special_tokens=False)["input_ids"]


def tokenize(tokenizer, record: dict, max_length: int) -> tuple[dict, bool]:
    """One training sample (labels -100 on the prompt) and whether it was truncated."""
    prompt = prompt_ids(tokenizer, record)
    # The chat template ends the assistant turn with EOS itself (plus a newline we leave out);
    # the Alpaca template needs it appended.
    response = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt + response)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
    return {"input_ids": input_ids, "labels": labels}, len(prompt) + len(response) > max_length


def load_splits(cfg_data: DataConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and eval records, checked row by row (cheap: run it before building the model)."""
    records = load_records(cfg_data.train_path)
    if cfg_data.eval_path:
        train_records, eval_records = records, load_records(cfg_data.eval_path)
    else:
        train_records, eval_records = split_by_prompt(records, cfg_data.eval_fraction, seed)
    if cfg_data.max_eval_samples:
        eval_records = eval_records[: cfg_data.max_eval_samples]
    return train_records, eval_records


def build_data(cfg_data: DataConfig, tokenizer, splits: tuple[list[dict], list[dict]]) -> SplitData:
    """Tokenize the splits; samples whose response is cut away entirely are dropped."""
    train_records, eval_records = splits
    truncated = 0
    splits = []
    for part in (train_records, eval_records):
        samples = []
        for record in part:
            sample, cut = tokenize(tokenizer, record, cfg_data.max_length)
            truncated += cut
            if any(label != IGNORE_INDEX for label in sample["labels"]):
                samples.append(sample)
        splits.append(samples)
    if not splits[0]:
        raise DataError(f"{cfg_data.train_path}: no training sample has a response within data.max_length={cfg_data.max_length}")
    return SplitData(splits[0], splits[1], eval_records, truncated)


def collate(samples: list[dict], pad_token_id: int, pad_to: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sample (or to pad_to); padded labels are -100 and masked out of attention."""
    width = max(pad_to, max(len(s["input_ids"]) for s in samples))
    batch = {"input_ids": [], "labels": [], "attention_mask": []}
    for s in samples:
        pad = width - len(s["input_ids"])
        batch["input_ids"].append(s["input_ids"] + [pad_token_id] * pad)
        batch["labels"].append(s["labels"] + [IGNORE_INDEX] * pad)
        batch["attention_mask"].append([1] * len(s["input_ids"]) + [0] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
