"""The data module: records from local files (or the offline chatterbot corpus) -> checked, split, tokenized samples.

    rows of each source (datasets: .json array, .jsonl, .csv, .parquet) -> task.check: records, bad rows named by file and row
    -> eval split (data.eval_path, else a seeded data.eval_fraction of each source's prompts)
    -> data.split_slice of the training records -> task.tokenize, truncate or drop at data.max_length
       (each rank a share, meeting in the cache directory outside any collective: tokenize_shared)
    -> cached under $FINETUNE_CACHE/data, keyed by the data files, tokenizer and settings
    -> a mixture's training set drawn by data.weights and train.seed (mixture_order)

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
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from finetune import assets, corpus
from finetune.faults import Faults
from finetune.config import BUILTIN_SOURCES, DataConfig, SliceBound, Source, parse_split_slice, train_sources
from finetune.tasks import IGNORE_INDEX, DataError, LanguageModelingTask, Task, build_task  # noqa: F401 (IGNORE_INDEX, DataError: re-exported)
from finetune.tasks.preference import REJECTED

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
NON_PAD_TOKENS = "non_pad_tokens"  # a batch entry that counts tokens for throughput; not a model input
REFERENCE = "reference_logps"  # a pair sample's (and batch's) reference log-probabilities, chosen and rejected; not a model input


@dataclass
class Splits:
    """Checked records of a run, before tokenization (cheap: built before the model)."""

    task: Task  # built once, with what it learned from the training records (its label set)
    train: list[dict]  # every source's training records, source by source; each carries its source's index as `_source`
    eval: list[dict]
    labels: list[str] | None  # classification: the label set, class id = position
    sources: list[Source]  # data.train_path's sources (one, or a mixture's)
    eval_path: str  # data.eval_path (one source only), or empty: each source's eval records are held out of it
    seed: int  # train.seed: the eval hold-out and the mixture are drawn with it

    def where(self, split: int, source: int) -> str:
        """The file a record of this split (TRAIN or EVAL) and source came from, for error messages."""
        return self.eval_path if split == EVAL and self.eval_path else self.sources[source].path


@dataclass
class SplitData:
    train: list[dict]  # tokenized samples: {input_ids, labels} or {input_ids, label}; a mixture's drawn by data.weights
    eval: list[dict]  # every source's eval samples
    eval_records: list[dict]  # raw held-out records, for generation prompts
    truncated: int  # samples cut at data.max_length (train + eval)
    dropped: int  # samples left out: too long under data.truncation=drop, or nothing left to learn after the cut
    labels: list[str] | None
    cache: str  # "off", "built" or "hit", and where
    eval_by_source: dict[str, list[dict]] = dataclasses.field(default_factory=dict)  # a mixture: each source's eval samples, by name
    sources: list[dict] = dataclasses.field(default_factory=list)  # a mixture: per source, its weight and sample counts (summary.json)


def read_rows(path: str) -> list[dict]:
    """The raw rows of a data file (or a built-in corpus): JSON with Python's json (_read_json), CSV and Parquet with `datasets`."""
    if path in BUILTIN_SOURCES:
        return corpus.builtin_records(path)
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    kind = FORMATS.get(Path(path).suffix.lower())
    if kind is None:
        raise DataError(f"{path}: expected a {', '.join(FORMATS)} file")
    if kind != "parquet" and not _has_content(path):
        raise DataError(f"{path}: the file is empty (no records)")
    if kind == "json":
        return _read_json(path)
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


def _read_json(path: str) -> list:
    """The rows of a JSON array or of JSON Lines, each checked to be an object; a syntax error names its line.

    Not through `datasets`: its pyarrow reader crashes the process (SIGSEGV) on a JSON Lines file holding
    `null`, drops such rows beside objects, reads an array of numbers as rows of a `text` column, and
    names no line for a syntax error.
    """
    _check_utf8(path)
    text = Path(path).read_text(encoding="utf-8-sig")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):
            raise DataError(f"{path} line {err.lineno}: not valid JSON ({err.msg}; column {err.colno})") from None
        document = None  # JSON Lines: each line its own document
    if isinstance(document, list):
        where = [f"{path} row {i}" for i in range(1, len(document) + 1)]
        rows = document
    elif document is not None:  # one document that is not an array: a JSON Lines file of one line
        where, rows = [f"{path} line {text[: len(text) - len(text.lstrip())].count(chr(10)) + 1}"], [document]
    else:
        where, rows = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number}: not valid JSON ({err.msg}; column {err.colno}); each line must be one JSON object") from None
            where.append(f"{path} line {number}")
    for place, row in zip(where, rows):
        if not isinstance(row, dict):
            raise DataError(f"{place}: a JSON {_JSON_TYPES.get(type(row), type(row).__name__)}, not an object with the task's fields")
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


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


TRAIN, EVAL = 0, 1  # a tokenized sample's split; its group is 2 * source + split


def load_splits(cfg_data: DataConfig, seed: int, task: str = "instruction") -> Splits:
    """Train and eval records of every source, checked row by row (cheap: run it before building the model).

    Each source holds out its own eval split (data.eval_fraction of its prompts) and gets data.split_slice
    and data.max_eval_samples on its own, so every source of a mixture has its own eval loss.
    """
    sources = train_sources(cfg_data)
    checker = build_task(task, cfg_data)
    loaded = [[{**r, "_source": i} for r in load_records(source.path, checker)] for i, source in enumerate(sources)]
    checker = checker.with_records([r for records in loaded for r in records], ", ".join(s.path for s in sources))  # e.g. classification's label set
    train, evals = [], []
    for i, records in enumerate(loaded):
        if cfg_data.eval_path:  # one source only (config check)
            held = [{**r, "_source": i} for r in load_records(cfg_data.eval_path, checker)]
        else:
            records, held = split_by_group(records, cfg_data.eval_fraction, seed, checker)
        train += select_slice(records, cfg_data.split_slice, sources[i].path)
        if 0 < cfg_data.max_eval_samples < len(held):  # a seeded sample: files sorted by class stay represented
            held = [held[k] for k in sorted(random.Random(seed).sample(range(len(held)), cfg_data.max_eval_samples))]
        evals += held
    return Splits(checker, train, evals, checker.labels_or_none, sources, cfg_data.eval_path, seed)


def mixture_order(sizes: list[int], weights: list[float], seed: int) -> list[tuple[int, int]]:
    """(source, sample) pairs of a mixture's training set, drawn by weight and seed.

    The mixture is as long as all sources together (sum of sizes): source i gets that length times
    w_i / sum(w) places, rounded by largest remainder, so the ratio is exact up to one sample. A source
    with more places than samples repeats them, each pass in a new seeded order (upsampling); one with
    fewer places contributes a seeded subset (downsampling). The places are then shuffled by seed. The
    set is the same every epoch (the sampler reshuffles its order), so a resumed run sees the same data.
    """
    total, weight_sum = sum(sizes), sum(weights)
    exact = [total * w / weight_sum for w in weights]
    places = [math.floor(x) for x in exact]
    for i in sorted(range(len(sizes)), key=lambda i: places[i] - exact[i])[: total - sum(places)]:
        places[i] += 1
    rng = random.Random(seed)
    order: list[tuple[int, int]] = []
    for source, (size, count) in enumerate(zip(sizes, places)):
        picks: list[int] = []
        while len(picks) < count:
            rng.shuffle(batch := list(range(size)))
            picks += batch
        order += [(source, k) for k in picks[:count]]
    rng.shuffle(order)
    return order


# No tokenizer here packs more characters into one token (runs of spaces in code vocabularies come
# closest), so a text cut at max_length * this still fills max_length tokens.
MAX_CHARS_PER_TOKEN = 64


def cap_text(value, limit: int, keep_end: bool = False):
    """A record (or any of its values) with every string cut to `limit` characters: its start, or its end with keep_end."""
    if isinstance(value, str):
        return value[-limit:] if keep_end else value[:limit]
    if isinstance(value, list):
        return [cap_text(v, limit, keep_end) for v in value]
    if isinstance(value, dict):
        return {k: cap_text(v, limit, keep_end) for k, v in value.items()}
    return value


@dataclass
class Tokenized:
    """Tokenized samples of some records, each with its group (2 * source + split), and per group
    [truncated, dropped, shortest length, its row] (-1 while the group has no record): what the cache holds."""

    samples: list[dict]
    groups: list[int]
    stats: np.ndarray

    @staticmethod
    def merge(parts: list[Tokenized]) -> Tokenized:
        """Parts tokenized from consecutive slices of the records, as if tokenized in one go."""
        stats = parts[0].stats.copy()
        for part in parts[1:]:
            stats[:, :2] += part.stats[:, :2]
            shorter = (part.stats[:, 2] >= 0) & ((stats[:, 2] < 0) | (part.stats[:, 2] < stats[:, 2]))
            stats[shorter, 2:] = part.stats[shorter, 2:]
        return Tokenized([s for p in parts for s in p.samples], [g for p in parts for g in p.groups], stats)


def _tokenize(task: Task, tokenizer, units: list[tuple[int, dict]], cfg_data: DataConfig, groups: int, where, progress: bool = False) -> Tokenized:
    """Tokenize (group, record) units; `where(group)` names the file in a bad row's error."""
    result = Tokenized([], [], np.full((groups, 4), -1, dtype=np.int64))
    result.stats[:, :2] = 0
    for group, record in tqdm(units, desc="tokenize", disable=not progress, mininterval=2, dynamic_ncols=True):
        # A multi-megabyte row would otherwise be tokenized in full only to be cut to max_length.
        capped = {k: cap_text(v, cfg_data.max_length * MAX_CHARS_PER_TOKEN, k in task.keeps_end) for k, v in record.items()}
        try:
            sample, length = task.tokenize(tokenizer, capped, cfg_data.max_length)
        except DataError as err:
            raise DataError(f"{where(group)} row {record['_row']}: {err}") from None
        if capped != record:  # its full length is unknown, but longer than max_length: counted as cut
            length = max(length, cfg_data.max_length + 1)
        stats = result.stats[group]
        if stats[2] < 0 or (length, record["_row"]) < (stats[2], stats[3]):
            stats[2:] = length, record["_row"]
        if sample is None or (length > cfg_data.max_length and cfg_data.truncation == "drop"):
            stats[1] += 1
        elif isinstance(task, LanguageModelingTask) and all(label == IGNORE_INDEX for label in sample["labels"][1:]):
            stats[1] += 1  # the cut left no token to learn (a causal LM never predicts the first one)
        else:
            stats[0] += length > cfg_data.max_length
            result.samples.append(sample)
            result.groups.append(group)
    return result


def _check_left(samples: list[dict], stats: np.ndarray, cfg_data: DataConfig, source: str, split: str) -> None:
    """DataError when a split of a source has no sample left after truncation/dropping."""
    if samples:
        return
    fix = "raise data.max_length" + (" or set data.truncation=truncate" if cfg_data.truncation == "drop" else "")
    raise DataError(
        f"{source}: every {split} sample is longer than data.max_length={cfg_data.max_length} tokens"
        f"{' with nothing left to learn after the cut' if cfg_data.truncation == 'truncate' else ''}"
        f" (the shortest, row {stats[3]}, has {stats[2]}); {fix}"
    )


def tokenize_records(task: Task, tokenizer, records: list[dict], cfg_data: DataConfig, source: str, split: str) -> tuple[list[dict], int, int]:
    """(samples, truncated, dropped) of one split of one file; DataError when no sample is left."""
    done = _tokenize(task, tokenizer, [(0, r) for r in records], cfg_data, 1, lambda group: source)
    _check_left(done.samples, done.stats[0], cfg_data, source, split)
    return done.samples, int(done.stats[0, 0]), int(done.stats[0, 1])


def build_data(cfg_data: DataConfig, tokenizer, splits: Splits) -> SplitData:
    """Tokenize the splits (shared among the ranks), or load them from the cache when the same files, tokenizer
    and settings were seen before; then draw a mixture's training set (mixture_order)."""
    task = splits.task
    task.prepare_tokenizer(tokenizer)
    path = cache_path(cfg_data, splits, tokenizer)
    if cfg_data.cache and path.is_file():
        done, cache = read_cache(path), f"hit {path}"
    else:
        done, cache = tokenize_shared(task, tokenizer, splits, cfg_data, path)
    names = [s.name for s in splits.sources]
    per_group: list[list[dict]] = [[] for _ in range(2 * len(names))]
    for sample, group in zip(done.samples, done.groups):
        per_group[group].append(sample)
    for group, samples in enumerate(per_group):
        _check_left(samples, done.stats[group], cfg_data, splits.where(group % 2, group // 2), "training" if group % 2 == TRAIN else "eval")
    train_sets, eval_sets = per_group[TRAIN::2], per_group[EVAL::2]
    truncated, dropped = (int(x) for x in done.stats[:, :2].sum(axis=0))
    evals = [s for samples in eval_sets for s in samples]
    if len(names) == 1:
        return SplitData(train_sets[0], evals, splits.eval, truncated, dropped, splits.labels, cache)
    order = mixture_order([len(t) for t in train_sets], [s.weight for s in splits.sources], splits.seed)
    drawn = [sum(1 for source, _ in order if source == i) for i in range(len(names))]
    sources = [{"name": s.name, "path": s.path, "weight": s.weight, "train_samples": len(t), "drawn": n, "eval_samples": len(e)} for s, t, n, e in zip(splits.sources, train_sets, drawn, eval_sets)]
    train = [train_sets[source][k] for source, k in order]
    return SplitData(train, evals, splits.eval, truncated, dropped, splits.labels, cache, dict(zip(names, eval_sets)), sources)


# Ranks poll for each other's tokenized parts (outside any collective, so launch.timeout_s does not bound
# tokenization); a rank that fails leaves its error line in place of its part.
POLL_S = 0.2
PROGRESS_MIN_RECORDS = 2000  # smaller data tokenizes in a moment: no progress bar


def tokenize_shared(task: Task, tokenizer, splits: Splits, cfg_data: DataConfig, path: Path) -> tuple[Tokenized, str]:
    """Tokenize the records, each rank of the world a consecutive slice, then every rank reads every part.

    The parts meet in the cache directory (which a multi-node run shares: distributed.check_shared_dirs);
    rank 0 also writes the whole as the cache file when data.cache is on. Without a process group, or with
    an unwritable cache directory, this rank tokenizes everything itself.
    """
    import torch.distributed as dist

    units = [(2 * r["_source"] + TRAIN, r) for r in splits.train] + [(2 * r["_source"] + EVAL, r) for r in splits.eval]
    groups, where = 2 * len(splits.sources), lambda group: splits.where(group % 2, group // 2)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    progress = rank == 0 and len(units) >= PROGRESS_MIN_RECORDS
    if world == 1 or not _writable(path.parent):
        done = _tokenize(task, tokenizer, units, cfg_data, groups, where, progress)
        if not cfg_data.cache:
            return done, "off"
        return done, f"built {path}" if write_cache(path, done) else "off (cache dir not writable)"
    parts = [path.with_name(f"{path.stem}.part{k}of{world}.npz") for k in range(world)]
    try:
        mine = _tokenize(task, tokenizer, units[len(units) * rank // world : len(units) * (rank + 1) // world], cfg_data, groups, where, progress)
    except DataError as err:
        parts[rank].with_suffix(".error").write_text(str(err))
        raise
    Faults().delay("slow_tokenize")
    write_cache(parts[rank], mine)
    while not all(p.is_file() for p in parts):
        failed = [p.with_suffix(".error") for p in parts if p.with_suffix(".error").is_file()]
        if failed:
            parts[rank].unlink(missing_ok=True)
            raise DataError(failed[0].read_text())
        time.sleep(POLL_S)
    done = Tokenized.merge([read_cache(p) for p in parts])
    cache = "off"
    if cfg_data.cache:  # rank 0 writes it; the others only say so
        cache = f"built {path}" if rank != 0 or write_cache(path, done) else "off (cache dir not writable)"
    dist.barrier()  # every rank has read every part (all arrive together: reading is quick)
    if rank == 0:
        for part in parts:
            part.unlink(missing_ok=True)
    return done, cache


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


# --- cache: one .npz per (files, tokenizer, settings); flat int arrays, no pickle ---------------------------------

CACHE_FORMAT = 3  # 2: samples of every source and split in one list, with their group and per-group counts; 3: preference pairs
_CODE = [Path(__file__), Path(corpus.__file__), *sorted((Path(__file__).parent / "tasks").glob("*.py"))]


def _source_stamp(source: str) -> str:
    if not source:
        return ""
    if source in BUILTIN_SOURCES:
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
    """Where the tokenized splits of these files, records, tokenizer and settings (a mixture's sources and weights included) are cached."""
    settings = {k: v for k, v in dataclasses.asdict(cfg_data).items() if k != "cache"}
    key = {
        "format": CACHE_FORMAT,
        "code": hashlib.sha256(b"".join(p.read_bytes() for p in _CODE)).hexdigest(),
        "task": splits.task.name,
        "labels": splits.labels,
        # which records, after split and slice, of which source
        "rows": [[(r["_source"], r["_row"]) for r in splits.train], [(r["_source"], r["_row"]) for r in splits.eval]],
        "settings": settings,
        "sources": [(s.name, s.weight, _source_stamp(s.path)) for s in splits.sources],
        "eval": _source_stamp(cfg_data.eval_path),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return assets.cache_dir() / "data" / f"{splits.task.name}-{digest}.npz"


def _flat(samples: list[dict]) -> dict[str, np.ndarray]:
    if samples and "label" in samples[0]:
        arrays = _flat_sequences(samples, "")
        arrays["label"] = np.array([s["label"] for s in samples], dtype=np.int64)
        return arrays
    pairs = bool(samples) and REJECTED + "input_ids" in samples[0]
    return {**_flat_sequences(samples, "", "labels"), **(_flat_sequences(samples, REJECTED, "labels") if pairs else {})}


def _flat_sequences(samples: list[dict], prefix: str, *per_token: str) -> dict[str, np.ndarray]:
    """One sequence of each sample (its keys start with `prefix`): lengths, then input_ids and each per-token key concatenated."""
    arrays = {f"{prefix}lengths": np.array([len(s[f"{prefix}input_ids"]) for s in samples], dtype=np.int64)}
    for key in ("input_ids", *per_token):
        arrays[prefix + key] = np.array([t for s in samples for t in s[prefix + key]], dtype=np.int64)
    return arrays


def _unflat(arrays) -> list[dict]:
    if "label" in arrays:
        return [{**sample, "label": label} for sample, label in zip(_unflat_sequences(arrays, ""), arrays["label"].tolist())]
    samples = _unflat_sequences(arrays, "", "labels")
    if REJECTED + "lengths" in arrays:  # preference pairs: the rejected sequence beside the chosen one
        samples = [{**chosen, **rejected} for chosen, rejected in zip(samples, _unflat_sequences(arrays, REJECTED, "labels"))]
    return samples


def _unflat_sequences(arrays, prefix: str, *per_token: str) -> list[dict]:
    offsets = np.concatenate([[0], np.cumsum(arrays[f"{prefix}lengths"])]).tolist()
    values = {prefix + key: arrays[prefix + key].tolist() for key in ("input_ids", *per_token)}
    return [{key: tokens[a:b] for key, tokens in values.items()} for a, b in zip(offsets, offsets[1:])]


def write_cache(path: Path, done: Tokenized) -> bool:
    """Write tokenized samples beside and rename into place (readers never see half a file); False if not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
        np.savez(staging, **_flat(done.samples), groups=np.array(done.groups, dtype=np.int64), stats=done.stats)
        staging.replace(path)
        return True
    except OSError:
        return False


def read_cache(path: Path) -> Tokenized:
    """The tokenized samples, their groups and per-group counts of a cache file (or of one rank's part)."""
    with np.load(path, allow_pickle=False) as arrays:
        return Tokenized(_unflat(arrays), arrays["groups"].tolist(), arrays["stats"])


# --- batches ------------------------------------------------------------------------------------------------------


def masked(sample: dict) -> dict:
    """A copy of a sample that weighs nothing in a loss (eval filler)."""
    if "label" in sample:
        return {"input_ids": sample["input_ids"], "label": IGNORE_INDEX}
    return {key: [IGNORE_INDEX] * len(ids) if key.endswith("labels") else ids for key, ids in sample.items()}


def sequences(sample: dict) -> list[dict]:
    """The sequences a sample puts in a batch: itself, or a preference pair's chosen then rejected one."""
    if REJECTED + "input_ids" not in sample:
        return [sample]
    return [{"input_ids": sample["input_ids"], "labels": sample["labels"]}, {"input_ids": sample[REJECTED + "input_ids"], "labels": sample[REJECTED + "labels"]}]


@dataclass(frozen=True)
class Padding:
    """How wide a batch is padded: its longest row, at least `width` (a pipeline's fixed shapes), rounded up to a
    multiple of `multiple` (sequence parallelism splits the sequence evenly over its ranks)."""

    width: int = 0
    multiple: int = 1

    def __call__(self, longest: int) -> int:
        """The padded width of a batch whose longest row has `longest` tokens."""
        return -(-max(self.width, longest) // self.multiple) * self.multiple


def collate(samples: list[dict], pad_token_id: int, padding: Padding = Padding()) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sample (as `padding` widens it); padding is masked out of attention and labels.

    Classification samples give `labels` of shape [batch] (one class id each), LM samples [batch, tokens].
    A preference pair gives two rows, chosen then rejected, side by side: rows 2i and 2i+1 are pair i, so any
    split of the batch into an even number of rows (a pipeline's micro-batches) keeps each pair together.
    """
    reference = [value for s in samples for value in s[REFERENCE]] if REFERENCE in samples[0] else None  # pairs under full fine-tuning
    samples = [row for s in samples for row in sequences(s)]
    width = padding(max(len(s["input_ids"]) for s in samples))
    batch: dict[str, list] = {"input_ids": [], "labels": [], "attention_mask": []}
    for s in samples:
        pad = width - len(s["input_ids"])
        batch["input_ids"].append(s["input_ids"] + [pad_token_id] * pad)
        batch["labels"].append(s["label"] if "label" in s else s["labels"] + [IGNORE_INDEX] * pad)
        batch["attention_mask"].append([1] * len(s["input_ids"]) + [0] * pad)
    tensors = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
    if reference is not None:
        tensors[REFERENCE] = torch.tensor(reference, dtype=torch.float32)  # row by row, as the rows: chosen, rejected of each pair
    return tensors


def non_pad_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-pad) tokens of a batch, padded or packed."""
    if NON_PAD_TOKENS in batch:
        return int(batch[NON_PAD_TOKENS])
    return int(batch["attention_mask"].sum())


def max_label_tokens(samples: list[dict]) -> int:
    """The most tokens any one sequence of `samples` is scored on (labels shift left by one); 0 for samples without
    token labels (classification). Pairs: their chosen and rejected sequences alike."""
    scored = lambda labels: len(labels) - labels.count(IGNORE_INDEX) - (labels[0] != IGNORE_INDEX)  # noqa: E731 (C-speed count)
    return max((scored(s[key]) for s in samples for key in ("labels", REJECTED + "labels") if s.get(key)), default=0)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a batch the model takes."""
    return {k: v for k, v in batch.items() if k not in (NON_PAD_TOKENS, REFERENCE)}


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
