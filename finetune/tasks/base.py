"""What every task shares: the DataError, the record-checking helpers and the Task interface.

A task turns one checked record into one tokenized sample:
  - causal-LM tasks: {input_ids, labels}, labels -100 wherever the loss must not look;
  - classification: {input_ids, label}, label an index into the run's label set;
  - preference pairs: the chosen sequence as {input_ids, labels}, the rejected one as {rejected_input_ids, rejected_labels}.
Tasks import no torch: they work on token-id lists, so config validation can read the registry.
"""

from __future__ import annotations

import math
from typing import Any, Hashable

from finetune.errors import FinetuneError, shown

IGNORE_INDEX = -100


class DataError(FinetuneError):
    """Bad data: names the file, the row and what is wrong."""


def text_field(row: dict, key: str, where: str, required: bool = True) -> str:
    """A string field of a row; missing, non-string or blank values raise DataError (blank is fine when optional)."""
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):  # CSV reads an empty cell as NaN/None
        if required:
            raise DataError(f"{where}: missing field {shown(key)}")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {shown(key)} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: field {shown(key)} is empty")
    return value


class Task:
    """One fine-tuning task: how records are checked, split, tokenized and prompted."""

    name: str = ""
    classification: bool = False
    keeps_end: tuple[str, ...] = ()  # record fields whose text keeps its end when an over-long record is cut (prompts)
    sequences_per_sample: int = 1  # rows a sample puts in a batch (the estimator's batch)
    pairs: bool = False  # a sample is a preference pair (chosen and rejected sequences), trained by a preference objective
    scalar_head: bool = False  # pairs scored by a one-output sequence-classification head (a reward model), not by log-probabilities
    fields: str = ""  # the record layout, for error messages and docs

    @classmethod
    def from_config(cls, cfg_data) -> "Task":
        """The task as the data config sets it up (default: nothing to set)."""
        return cls()

    def with_labels(self, labels: list[str]) -> "Task":
        """This task with a fixed label set (only classification has one)."""
        return self

    def check(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        """The clean record of a raw row, or DataError naming `where` (file and row) and the problem."""
        raise NotImplementedError

    def group_key(self, record: dict) -> Hashable:
        """What may not appear on both sides of a held-out split (e.g. the prompt)."""
        raise NotImplementedError

    def tokenize(self, tokenizer, record: dict, max_length: int) -> tuple[dict | None, int]:
        """(sample cut to max_length, or None when nothing of it can be kept; the sample's full length in tokens)."""
        raise NotImplementedError

    def prepare_tokenizer(self, tokenizer) -> None:
        """Give the tokenizer what this task needs before tokenizing (default: nothing)."""

    def with_records(self, records: list[dict], where: str) -> "Task":
        """This task with whatever it learns from the training records (classification: its label set)."""
        return self

    @property
    def labels_or_none(self) -> list[str] | None:
        """The class labels a classification head is built over; None: a causal LM head."""
        return None

    # What an eval batch must yield for this task: "loss" (summed over label tokens) or "logits".
    eval_output = "loss"
    auto_model = "AutoModelForCausalLM"  # the transformers class that loads a trained model dir

    def generation_prompts(self, records: list[dict], count: int) -> list[dict]:
        """The first `count` distinct held-out prompts to generate from (none for tasks that do not generate)."""
        return []

    def write_artifacts(self, path) -> None:
        """Files a trained model dir needs besides weights and tokenizer (default: none)."""


class LanguageModelingTask(Task):
    """A causal-LM task: samples are token ids with per-token labels; generation prompts come from records."""

    def tokenize(self, tokenizer, record: dict, max_length: int) -> tuple[dict, int]:
        input_ids, labels = self.token_labels(tokenizer, record)
        return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}, len(input_ids)

    def token_labels(self, tokenizer, record: dict) -> tuple[list[int], list[int]]:
        """Full-length (input_ids, labels) of a record."""
        raise NotImplementedError

    def prompt_ids(self, tokenizer, record: dict) -> list[int]:
        """Token ids a model continues from to produce the record's reference answer."""
        raise NotImplementedError

    def check_prompt(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        """The record of a row to generate from (finetune.generate): as check, the reference answer may be absent."""
        return self.check(row, where)

    def prompt_text(self, record: dict) -> str:
        """A short readable form of the prompt, for generations.json."""
        raise NotImplementedError

    def reference(self, record: dict) -> str:
        """The answer the data holds for the prompt."""
        raise NotImplementedError

    def generation_prompts(self, records: list[dict], count: int) -> list[dict]:
        return list({self.prompt_text(r): r for r in records}.values())[:count]


class PromptResponseTask(LanguageModelingTask):
    """Prompt + response, loss on the response only, EOS appended.

    The prompt is the tokenizer's chat template around `user_message` when it has one, else the plain
    `plain_prompt` template (base models).
    """

    reference_field: str = ""  # the row's field holding the response (what check_prompt does without)

    def check_prompt(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        # The response is never part of the prompt: a stand-in passes check's test of it.
        return self.check({**row, self.reference_field: "(not needed to prompt)"}, where)

    def user_message(self, record: dict) -> str:
        raise NotImplementedError

    def plain_prompt(self, record: dict) -> str:
        raise NotImplementedError

    def prompt_ids(self, tokenizer, record: dict) -> list[int]:
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template([{"role": "user", "content": self.user_message(record)}], add_generation_prompt=True)
        return tokenizer(self.plain_prompt(record), add_special_tokens=False)["input_ids"]

    def token_labels(self, tokenizer, record: dict) -> tuple[list[int], list[int]]:
        prompt = self.prompt_ids(tokenizer, record)
        # A chat template closes the assistant turn with EOS itself (plus a newline we leave out);
        # the plain template needs it appended. Either way the response ends with EOS.
        response = tokenizer(self.reference(record), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return prompt + response, [IGNORE_INDEX] * len(prompt) + response
