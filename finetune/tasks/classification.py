"""Task `classification`: records {text, text_pair?, label} (field names set by data.*_field); label a string or an integer.

The label set is data.labels when given (its order fixes the class ids), else every label of the
training file (integers sorted numerically, strings alphabetically). A label outside the set is an
error naming the file and row. Encoder tokenizers (RoBERTa, BERT) encode a pair as
`<s> text </s></s> text_pair </s>`; decoder tokenizers (GPT-2, Llama) read `text\\ntext_pair`.
"""

from __future__ import annotations

import dataclasses
import math

from finetune.errors import listed, shown
from finetune.tasks.base import DataError, Task, text_field


@dataclasses.dataclass(frozen=True)
class ClassificationTask(Task):
    text_field: str = "text"
    text_pair_field: str = "text_pair"
    label_field: str = "label"
    labels: tuple[str, ...] = ()  # the label set; empty until known

    name = "classification"
    classification = True

    @property
    def fields(self) -> str:
        return f"{{{self.text_field}, {self.text_pair_field}?, {self.label_field}}}"

    def check(self, row: dict, where: str) -> dict:
        label = _label(row.get(self.label_field), self.label_field, where)
        if self.labels and str(label) not in self.labels:
            raise DataError(f"{where}: label {shown(label)} is not in the label set ({listed(self.labels)})")
        return {
            "text": text_field(row, self.text_field, where),
            "text_pair": text_field(row, self.text_pair_field, where, required=False),
            "label": label,
        }

    def group_key(self, record: dict) -> tuple[str, str]:
        return record["text"], record["text_pair"]

    @classmethod
    def from_config(cls, cfg_data) -> "ClassificationTask":
        return cls(cfg_data.text_field, cfg_data.text_pair_field, cfg_data.label_field, tuple(cfg_data.labels))

    def with_labels(self, labels: list[str]) -> "ClassificationTask":
        """This task with its label set fixed."""
        return dataclasses.replace(self, labels=tuple(labels))

    def with_records(self, records: list[dict], where: str) -> "ClassificationTask":
        """The label set: data.labels when given, else the training records' labels."""
        return self.with_labels(label_set(records, list(self.labels), where))

    @property
    def labels_or_none(self) -> list[str]:
        return list(self.labels)

    eval_output = "logits"
    auto_model = "AutoModelForSequenceClassification"

    def write_artifacts(self, path) -> None:
        """labels.json: the class ids of the head (an adapter dir has no config.json to hold them)."""
        import json
        from pathlib import Path

        (Path(path) / "labels.json").write_text(json.dumps(list(self.labels), indent=2) + "\n")

    def tokenize(self, tokenizer, record: dict, max_length: int) -> tuple[dict, int]:
        full = self._encode(tokenizer, record)
        # The tokenizer truncates itself, so an encoder's closing </s> (or [SEP]) survives the cut.
        ids = full if len(full) <= max_length else self._encode(tokenizer, record, truncation=True, max_length=max_length)
        return {"input_ids": ids, "label": self.labels.index(str(record["label"]))}, len(full)

    @staticmethod
    def _encode(tokenizer, record: dict, **kwargs) -> list[int]:
        if record["text_pair"] and tokenizer.sep_token:
            return tokenizer(record["text"], record["text_pair"], **kwargs)["input_ids"]
        text = record["text"] + (f"\n{record['text_pair']}" if record["text_pair"] else "")
        return tokenizer(text, **kwargs)["input_ids"]


def _check_label_types(records: list[dict], where: str) -> None:
    """DataError naming the first row whose label is not of the first row's type: 1 and "1" would be two classes."""
    first = records[0]
    for record in records:
        if type(record["label"]) is not type(first["label"]):
            raise DataError(
                f"{where} row {record['_row']}: label {shown(record['label'])} is a {type(record['label']).__name__} but row {first['_row']}'s label "
                f"{shown(first['label'])} is a {type(first['label']).__name__}; make the label column all strings or all integers, or set data.labels"
            )


def _label(value, key: str, where: str) -> str | int:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise DataError(f"{where}: missing field {shown(key)}")
    if isinstance(value, float) and value.is_integer():  # CSV: an integer column with a blank cell becomes float
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: field {shown(key)} must be a string or an integer, got {type(value).__name__} {shown(value)}")
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{where}: field {shown(key)} is empty")
    return value


def label_set(records: list[dict], declared: list[str], where: str) -> list[str]:
    """The run's labels: the declared ones, else those of the training records; at least two."""
    if declared:
        labels = list(declared)
    else:
        _check_label_types(records, where)
        values = {r["label"] for r in records}
        numeric = all(isinstance(v, int) for v in values)
        labels = [str(v) for v in sorted(values, key=lambda v: v if numeric else str(v))]
    if len(labels) < 2:
        raise DataError(f"{where}: only one label ({listed(labels)}); classification needs at least two")
    return labels
