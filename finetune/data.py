"""The data module: records from local files (or the offline chatterbot corpus) -> checked, split, tokenized samples.

    rows (datasets: .json array, .jsonl, .csv, .parquet)  -> task.check: records, bad rows named by file and row
    -> eval split (data.eval_path, else a seeded data.eval_fraction of train_path's prompts)
    -> data.split_slice of the training records -> task.tokenize, truncate or drop at data.max_length
    -> cached under $FINETUNE_CACHE/data, keyed by the data files, tokenizer and settings

What a record holds and how it becomes a sample is the task's business (finetune/tasks/). Row numbers
count records from 1 in file order (for CSV: data lines after the header).

data.split_slice takes part of the training records, in file order, after the eval records are held
out (so the eval split does not change with the slice): "N" is the first N records, "P%" the first
floor(P% of them), "A:B" records A to B-1 counted from 0 (either end a count or a percentage, and
either may be left out). Asking for more records than there are is an error, not a silent clip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from finetune import assets, corpus
from finetune.config import DataConfig, SliceBound, parse_split_slice
from finetune.tasks import IGNORE_INDEX, DataError, LanguageModelingTask, Task, build_task  # noqa: F401 (IGNORE_INDEX, DataError: re-exported)

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
NON_PAD_TOKENS = "non_pad_tokens"  # a batch entry that counts tokens for throughput; not a model input


@dataclass
class Splits:
    """Checked records of a run, before tokenization (cheap: built before the model)."""

    task: Task  # built once, with what it learned from the training records (its label set)
    train: list[dict]
    eval: list[dict]
    labels: list[str] | None  # classification: the label set, class id = position
    train_source: str  # where the records came from, for error messages
    eval_source: str


@dataclass
class SplitData:
    train: list[dict]  # tokenized samples: {input_ids, labels} or {input_ids, label}
    eval: list[dict]
    eval_records: list[dict]  # raw held-out records, for generation prompts
    truncated: int  # samples cut at data.max_length (train + eval)
    dropped: int  # samples left out: too long under data.truncation=drop, or nothing left to learn after the cut
    labels: list[str] | None
    cache: str  # "off", "built" or "hit", and where


def read_rows(path: str) -> list[dict]:
    """The raw rows of a data file (or a built-in corpus), read with `datasets`."""
    if path in corpus.BUILTIN_SOURCES:
        return corpus.builtin_records(path)
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    kind = FORMATS.get(Path(path).suffix.lower())
    if kind is None:
        raise DataError(f"{path}: expected a {', '.join(FORMATS)} file")
    if kind != "parquet" and not _has_content(path):
        raise DataError(f"{path}: the file is empty (no records)")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a file it cannot parse is reported below, in one line
    try:
        return datasets.load_dataset(kind, data_files=path, split="train").to_list()  # pyarrow decodes strings here
    except Exception as err:  # datasets wraps parser errors in several exception types
        if kind != "parquet":
            _check_utf8(path)  # the usual cause, which datasets reports without a line number
        if "corresponds to no data" in str(err):  # a CSV header alone, or an empty JSON array
            raise DataError(f"{path}: no records") from None
        raise DataError(f"{path}: cannot be read as {kind.upper()} ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


def _has_content(path: str) -> bool:
    """Whether a text file holds anything besides whitespace and a UTF-8 byte-order mark."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.replace(b"\xef\xbb\xbf", b"").strip():
                return True
    return False


def _check_utf8(path: str) -> None:
    """DataError naming the first line of a text file that is not UTF-8."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):  # a newline byte never occurs inside a UTF-8 sequence
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path} line {number}: not UTF-8 (byte 0x{line[err.start]:02x} at column {err.start + 1}); re-save the file as UTF-8") from None


def load_records(path: str, task: Task) -> list[dict]:
    """The task's records of a file, checked row by row; each carries its row number as `_row`."""
    records = [{**task.check(row, f"{path} row {i}"), "_row": i} for i, row in enumerate(read_rows(path), start=1)]
    if not records:
        raise DataError(f"{path}: no records")
    return records


def split_by_group(records: list[dict], eval_fraction: float, seed: int, task: Task) -> tuple[list[dict], list[dict]]:
    """Hold out a seeded fraction of the distinct group keys (prompts, texts), so none is on both sides."""
    groups = sorted({task.group_key(r) for r in records})
    random.Random(seed).shuffle(groups)
    held_out = set(groups[: max(1, round(len(groups) * eval_fraction))])
    train = [r for r in records if task.group_key(r) not in held_out]
    return train, [r for r in records if task.group_key(r) in held_out]


def _resolve_bound(bound: SliceBound | None, count: int, default: int) -> int:
    if bound is None:
        return default
    value, percent = bound
    return math.floor(value * count / 100) if percent else int(value)


def select_slice(records: list[dict], spec: str, source: str) -> list[dict]:
    """data.split_slice applied to the training records (see the module docstring for the exact semantics)."""
    if not spec:
        return records
    start_bound, stop_bound = parse_split_slice(spec)
    start, stop = _resolve_bound(start_bound, len(records), 0), _resolve_bound(stop_bound, len(records), len(records))
    if stop > len(records) or start > len(records):
        raise DataError(f"data.split_slice={spec}: asks for records up to {max(start, stop)} but {source} has {len(records)} training records")
    if start >= stop:
        raise DataError(f"data.split_slice={spec}: selects no records of the {len(records)} training records of {source}")
    return records[start:stop]


def load_splits(cfg_data: DataConfig, seed: int, task: str = "instruction") -> Splits:
    """Train and eval records, checked row by row (cheap: run it before building the model)."""
    checker = build_task(task, cfg_data)
    records = load_records(cfg_data.train_path, checker)
    checker = checker.with_records(records, cfg_data.train_path)  # e.g. classification's label set
    if cfg_data.eval_path:
        train_records, eval_records, eval_source = records, load_records(cfg_data.eval_path, checker), cfg_data.eval_path
    else:
        train_records, eval_records = split_by_group(records, cfg_data.eval_fraction, seed, checker)
        eval_source = cfg_data.train_path
    train_records = select_slice(train_records, cfg_data.split_slice, cfg_data.train_path)
    if 0 < cfg_data.max_eval_samples < len(eval_records):  # a seeded sample: files sorted by class stay represented
        keep = sorted(random.Random(seed).sample(range(len(eval_records)), cfg_data.max_eval_samples))
        eval_records = [eval_records[i] for i in keep]
    return Splits(checker, train_records, eval_records, checker.labels_or_none, cfg_data.train_path, eval_source)


# No tokenizer here packs more characters into one token (runs of spaces in code vocabularies come
# closest), so a text cut at max_length * this still fills max_length tokens.
MAX_CHARS_PER_TOKEN = 64


def cap_text(value, limit: int):
    """A record (or any of its values) with every string cut to `limit` characters."""
    if isinstance(value, str):
        return value[:limit]
    if isinstance(value, list):
        return [cap_text(v, limit) for v in value]
    if isinstance(value, dict):
        return {k: cap_text(v, limit) for k, v in value.items()}
    return value


def tokenize_records(task: Task, tokenizer, records: list[dict], cfg_data: DataConfig, source: str, split: str) -> tuple[list[dict], int, int]:
    """(samples, truncated, dropped) of one split; DataError when no sample is left."""
    samples, truncated, dropped = [], 0, 0
    shortest = None  # (length, row) of the shortest sample, for the every-sample-too-long error
    for record in records:
        # A multi-megabyte row would otherwise be tokenized in full only to be cut to max_length.
        capped = cap_text(record, cfg_data.max_length * MAX_CHARS_PER_TOKEN)
        try:
            sample, length = task.tokenize(tokenizer, capped, cfg_data.max_length)
        except DataError as err:
            raise DataError(f"{source} row {record['_row']}: {err}") from None
        if capped != record:  # its full length is unknown, but longer than max_length: counted as cut
            length = max(length, cfg_data.max_length + 1)
        shortest = min(shortest or (length, record["_row"]), (length, record["_row"]))
        if length > cfg_data.max_length and cfg_data.truncation == "drop":
            dropped += 1
        elif isinstance(task, LanguageModelingTask) and all(label == IGNORE_INDEX for label in sample["labels"][1:]):
            dropped += 1  # the cut left no token to learn (a causal LM never predicts the first one)
        else:
            truncated += length > cfg_data.max_length
            samples.append(sample)
    if not samples:
        fix = "raise data.max_length" + (" or set data.truncation=truncate" if cfg_data.truncation == "drop" else "")
        raise DataError(
            f"{source}: every {split} sample is longer than data.max_length={cfg_data.max_length} tokens"
            f"{' with nothing left to learn after the cut' if cfg_data.truncation == 'truncate' else ''}"
            f" (the shortest, row {shortest[1]}, has {shortest[0]}); {fix}"
        )
    return samples, truncated, dropped


def build_data(cfg_data: DataConfig, tokenizer, splits: Splits) -> SplitData:
    """Tokenize the splits, or load them from the cache when the same files, tokenizer and settings were seen before."""
    task = splits.task
    task.prepare_tokenizer(tokenizer)
    path = cache_path(cfg_data, splits, tokenizer) if cfg_data.cache else None
    if path is not None and path.is_file():
        train, evals, truncated, dropped = read_cache(path)
        return SplitData(train, evals, splits.eval, truncated, dropped, splits.labels, f"hit {path}")
    train, train_cut, train_dropped = tokenize_records(task, tokenizer, splits.train, cfg_data, splits.train_source, "training")
    evals, eval_cut, eval_dropped = tokenize_records(task, tokenizer, splits.eval, cfg_data, splits.eval_source, "eval")
    truncated, dropped = train_cut + eval_cut, train_dropped + eval_dropped
    cache = "off"
    if path is not None:
        cache = f"built {path}" if write_cache(path, train, evals, truncated, dropped) else "off (cache dir not writable)"
    return SplitData(train, evals, splits.eval, truncated, dropped, splits.labels, cache)


# --- cache: one .npz per (files, tokenizer, settings); flat int arrays, no pickle ---------------------------------

CACHE_FORMAT = 1
_CODE = [Path(__file__), Path(corpus.__file__), *sorted((Path(__file__).parent / "tasks").glob("*.py"))]


def _source_stamp(source: str) -> str:
    if not source:
        return ""
    if source in corpus.BUILTIN_SOURCES:
        return f"{source}@chatterbot-corpus=={metadata.version('chatterbot-corpus')}"
    stat = Path(source).stat()
    return f"{Path(source).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything in a tokenizer that changes its output: vocabulary, merges, normalizers, specials, template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    if getattr(tokenizer, "is_fast", False):
        digest.update(tokenizer.backend_tokenizer.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps([str(tokenizer.chat_template), tokenizer.special_tokens_map, tokenizer.padding_side], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_path(cfg_data: DataConfig, splits: Splits, tokenizer) -> Path:
    """Where the tokenized splits of these files, records, tokenizer and settings are cached."""
    settings = {k: v for k, v in dataclasses.asdict(cfg_data).items() if k != "cache"}
    key = {
        "format": CACHE_FORMAT,
        "code": hashlib.sha256(b"".join(p.read_bytes() for p in _CODE)).hexdigest(),
        "task": splits.task.name,
        "labels": splits.labels,
        "rows": [[r["_row"] for r in splits.train], [r["_row"] for r in splits.eval]],  # which records, after split and slice
        "settings": settings,
        "train": _source_stamp(cfg_data.train_path),
        "eval": _source_stamp(cfg_data.eval_path),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return assets.cache_dir() / "data" / f"{splits.task.name}-{digest}.npz"


def _flat(samples: list[dict], prefix: str) -> dict[str, np.ndarray]:
    arrays = {f"{prefix}_lengths": np.array([len(s["input_ids"]) for s in samples], dtype=np.int64)}
    arrays[f"{prefix}_input_ids"] = np.array([t for s in samples for t in s["input_ids"]], dtype=np.int64)
    if samples and "label" in samples[0]:
        arrays[f"{prefix}_label"] = np.array([s["label"] for s in samples], dtype=np.int64)
    else:
        arrays[f"{prefix}_labels"] = np.array([t for s in samples for t in s["labels"]], dtype=np.int64)
    return arrays


def _unflat(arrays, prefix: str) -> list[dict]:
    offsets = np.concatenate([[0], np.cumsum(arrays[f"{prefix}_lengths"])]).tolist()
    ids = arrays[f"{prefix}_input_ids"].tolist()
    if f"{prefix}_label" in arrays:
        labels = arrays[f"{prefix}_label"].tolist()
        return [{"input_ids": ids[a:b], "label": label} for a, b, label in zip(offsets, offsets[1:], labels)]
    token_labels = arrays[f"{prefix}_labels"].tolist()
    return [{"input_ids": ids[a:b], "labels": token_labels[a:b]} for a, b in zip(offsets, offsets[1:])]


def write_cache(path: Path, train: list[dict], evals: list[dict], truncated: int, dropped: int) -> bool:
    """Write the tokenized splits beside and rename into place (readers never see half a file); False if not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
        np.savez(staging, **_flat(train, "train"), **_flat(evals, "eval"), counts=np.array([truncated, dropped]))
        staging.replace(path)
        return True
    except OSError:
        return False


def read_cache(path: Path) -> tuple[list[dict], list[dict], int, int]:
    """(train, eval, truncated, dropped) from a cache file."""
    with np.load(path, allow_pickle=False) as arrays:
        truncated, dropped = arrays["counts"].tolist()
        return _unflat(arrays, "train"), _unflat(arrays, "eval"), truncated, dropped


# --- batches ------------------------------------------------------------------------------------------------------


def masked(sample: dict) -> dict:
    """A copy of a sample that weighs nothing in a loss (eval filler)."""
    if "label" in sample:
        return {"input_ids": sample["input_ids"], "label": IGNORE_INDEX}
    return {"input_ids": sample["input_ids"], "labels": [IGNORE_INDEX] * len(sample["labels"])}


def collate(samples: list[dict], pad_token_id: int, pad_to: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sample (or to pad_to); padding is masked out of attention and labels.

    Classification samples give `labels` of shape [batch] (one class id each), LM samples [batch, tokens].
    """
    width = max(pad_to, max(len(s["input_ids"]) for s in samples))
    batch: dict[str, list] = {"input_ids": [], "labels": [], "attention_mask": []}
    for s in samples:
        pad = width - len(s["input_ids"])
        batch["input_ids"].append(s["input_ids"] + [pad_token_id] * pad)
        batch["labels"].append(s["label"] if "label" in s else s["labels"] + [IGNORE_INDEX] * pad)
        batch["attention_mask"].append([1] * len(s["input_ids"]) + [0] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def non_pad_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-pad) tokens of a batch, padded or packed."""
    if NON_PAD_TOKENS in batch:
        return int(batch[NON_PAD_TOKENS])
    return int(batch["attention_mask"].sum())


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a batch the model takes."""
    return {k: v for k, v in batch.items() if k != NON_PAD_TOKENS}


def batches_forever(dataloader, grad_accum_steps: int, steps_per_epoch: int, start_step: int = 0):
    """Yield (epoch, micro-batches of one optimizer step), reshuffling each epoch.

    Resuming after `start_step` steps continues with the next unseen batch: the sampler's order depends
    only on train.seed and the epoch, so the batches already consumed in that epoch are skipped.
    """
    epoch, skip = divmod(start_step, steps_per_epoch)
    skip *= grad_accum_steps
    while True:
        if hasattr(dataloader.sampler, "set_epoch"):
            dataloader.sampler.set_epoch(epoch)
        micro_batches = []
        for index, batch in enumerate(dataloader):
            if index < skip:
                continue
            micro_batches.append(batch)
            if len(micro_batches) == grad_accum_steps:
                yield epoch, micro_batches
                micro_batches = []
        epoch, skip = epoch + 1, 0
