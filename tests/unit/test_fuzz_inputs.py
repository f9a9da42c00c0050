"""Fuzzing the inputs a user supplies: generated key=value overrides, YAML config files and data rows/files go,
in-process, through the entry points the CLI uses (parse_args/load_config, load_records/load_splits,
tokenize_records). Each is either accepted or refused with exactly one FinetuneError whose message is one
line of bounded length; any other exception is a defect (tests/e2e/test_fuzz_inputs.py: the CLI's exit codes).

FUZZ_EXAMPLES sets the examples per property (default sized for about a minute in CI; data files, which
go through `datasets`, get a tenth of them); `make fuzz` runs many more.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from finetune.parallel import PLUGINS  # noqa: E402
from finetune.config import DataConfig, choices, config_keys, load_config  # noqa: E402
from finetune.data import load_records, load_splits, tokenize_records  # noqa: E402
from finetune.errors import FinetuneError  # noqa: E402
from finetune.tasks import TASKS, build_task  # noqa: E402
from tests.conftest import REPO  # noqa: E402

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1000"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the checkout
    derandomize=not os.environ.get("FUZZ_RANDOM"),  # CI: the same cases every run; `make fuzz`: new ones
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
FILE_FUZZ = settings(FUZZ, max_examples=max(20, EXAMPLES // 10))
MAX_LINE = 600  # an error line may name a file (tmp paths: ~100 characters) and quote a value (errors.SHOWN_CHARS)


def refused_in_one_line(call) -> object:
    """Run call(); return its result, or None when it raised one FinetuneError of one bounded line (anything else fails)."""
    try:
        return call()
    except FinetuneError as err:
        text = str(err)
        assert text and "\n" not in text and "\r" not in text, repr(text[:300])
        assert len(text) <= MAX_LINE, f"{len(text)} characters: {text[:300]}..."
        return None


# --- configs ---------------------------------------------------------------------------------------------------

KEYS = sorted(config_keys()) + sorted({f"plugin.{opt}" for spec in PLUGINS.values() for opt in spec.options})
NAMES = sorted({name for names in choices().values() for name in names} | {n for spec in PLUGINS.values() for names in spec.choices.values() for n in names})
# What YAML and the shell make of text: YAML 1.1 booleans and nulls, number forms, structures, aliases, tags, odd characters.
TRICKY = [
    "", "off", "on", "yes", "no", "y", "n", "true", "False", "~", "null", "0", "-1", "1e-3", "1e400", "-1e400", ".inf", "-.inf", ".nan", "nan",
    "0x10", "0o17", "017", "1_000", "1:20", "9" * 40, "[]", "{}", "[a, b]", "[1, [2]]", "{a: 1}", "{path: x.jsonl, weight: 2}", "&a [1, *a]", "*a",
    "!!python/object:os.system x", "!!binary aGk=", "'quoted'", '"dq"', "a\nb", "a: b", "- a", "#c", "a #c", "\x00", "\t", "é", "日本", "\u202e", "x" * 5000,
    "=", "<<", "[" * 200, "{" * 200, "/nonexistent/file.jsonl", "tiny-gpt2", "tiny-llama", "/" + "d" * 300, "org/name",
]
# Paths the OS refuses or that are not what a key wants: too long, NUL, a directory, a device, a suffix of another kind.
PATHS = ["/" + "d" * 300, "/" + "/".join(["e" * 200] * 30), "a\x00b.jsonl", "x.jsonl\n", "/", ".", "..", "/dev/null", "/etc/hostname", str(REPO), str(REPO / "README.md"),
         str(REPO / "booster_configs"), str(REPO / "booster_configs" / "zero2.yaml"), "chatterbot-corpus", "chatterbot-corpus:chat", "latest", "a/b/c", "org/name-" + "x" * 90]
values = st.one_of(st.sampled_from(TRICKY), st.sampled_from(NAMES), st.sampled_from(PATHS), st.text(max_size=40), st.integers().map(str), st.floats().map(str))
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS), st.sampled_from(KEYS), st.text(max_size=20))


@FUZZ
@given(st.lists(st.tuples(keys, values), min_size=1, max_size=4))
def test_fuzz_overrides(pairs):
    """key=value overrides as the shell passes them, validated for a one-process run."""
    argv = ["model.name=tiny-gpt2", *(f"{key}={value}" for key, value in pairs)]
    refused_in_one_line(lambda: load_config(argv, world_size=1))


def yaml_trees():
    """Mappings shaped like configs (sections of real keys, with generated values) and arbitrary nested YAML data."""
    leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), st.sampled_from(NAMES))
    data = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
    real = st.dictionaries(st.sampled_from(KEYS), st.one_of(data, st.sampled_from(TRICKY)), max_size=5)
    return st.one_of(real.map(_nest), data)


def _nest(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        section, _, name = key.rpartition(".")
        (tree.setdefault(section, {}) if section else tree)[name] = value
    return tree


def yaml_texts():
    """Valid YAML of generated trees, raw text built from YAML's syntax, and both with lines spliced in."""
    dumped = yaml_trees().map(lambda tree: yaml.safe_dump(tree, allow_unicode=True) if not isinstance(tree, str) else tree)
    lines = st.lists(st.one_of(st.sampled_from(KEYS).map(lambda k: f"{k.rpartition('.')[0] or k}:"), st.sampled_from(TRICKY).map(lambda v: f"  {v}"),
                               st.builds(lambda k, v: f"{k}: {v}", st.sampled_from(KEYS), st.sampled_from(TRICKY)), st.text(max_size=30)), max_size=8).map("\n".join)
    spliced = st.tuples(dumped, lines).map(lambda parts: parts[0] + "\n" + parts[1])
    return st.one_of(dumped, lines, spliced)


@FUZZ
@given(text=yaml_texts())
def test_fuzz_yaml_config_files(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "run.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass") if "\ud800" not in text else path.write_bytes(text.encode("utf-8", "replace"))
    refused_in_one_line(lambda: load_config(["model.name=tiny-gpt2", "--config", str(path)], world_size=1))


# --- data ------------------------------------------------------------------------------------------------------

FIELDS = ["instruction", "input", "output", "dialogue", "summary", "messages", "role", "content", "text", "text_pair", "label", "id"]
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30), st.sampled_from(["user", "assistant", "system", "", " ", "x" * 5000])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS), inner, max_size=4)),
    max_leaves=10,
)
rows = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=10)), json_values, max_size=5)


@FUZZ
@given(task=st.sampled_from(sorted(TASKS)), row=rows)
def test_fuzz_rows(task, row):
    """One row through its task's check, as load_records does it for every row of a file."""
    refused_in_one_line(lambda: build_task(task, DataConfig()).check(row, "train.jsonl row 1"))


def _as_jsonl(records: list, corrupt: int) -> bytes:
    lines = [json.dumps(r, allow_nan=True) for r in records]
    if corrupt and lines:  # a torn, doubled or garbage line at some position
        i = corrupt % len(lines)
        lines[i] = [lines[i][: len(lines[i]) // 2], lines[i] + lines[i], "not json", "[1, 2]", "\ufeff" + lines[i]][corrupt % 5]
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")


def _as_csv(records: list, corrupt: int) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    columns = sorted({str(k) for r in records if isinstance(r, dict) for k in r}) or ["text"]
    writer.writerow(columns)
    for r in records:
        writer.writerow([json.dumps(r.get(c)) if isinstance(r, dict) and isinstance(r.get(c), (list, dict)) else (r.get(c, "") if isinstance(r, dict) else r) for c in columns])
    text = out.getvalue()
    return (text + ("a,b,c,d,e,f\n" * (corrupt % 2))).encode("utf-8", "surrogatepass")


def _write(path: Path, records: list, corrupt: int) -> None:
    if path.suffix == ".jsonl":
        path.write_bytes(_as_jsonl(records, corrupt))
    elif path.suffix == ".json":
        path.write_bytes(json.dumps(records).encode("utf-8", "surrogatepass")[: None if not corrupt else -(corrupt % 7) or None])
    else:
        path.write_bytes(_as_csv(records, corrupt))


@pytest.fixture(scope="module")
def tokenizer():
    from finetune.assets import gpt2_tokenizer

    return gpt2_tokenizer()


@FILE_FUZZ
@given(task=st.sampled_from(sorted(TASKS)), suffix=st.sampled_from([".jsonl", ".json", ".csv"]), records=st.lists(st.one_of(rows, json_values), min_size=0, max_size=6), corrupt=st.integers(0, 20))
def test_fuzz_data_files(tmp_path_factory, tokenizer, task, suffix, records, corrupt):
    """A generated data file through load_records and, when accepted, tokenization at a short max_length."""
    path = tmp_path_factory.mktemp("data") / f"train{suffix}"
    _write(path, records, corrupt)
    checker = build_task(task, DataConfig())
    loaded = refused_in_one_line(lambda: load_records(str(path), checker))
    if loaded:
        cfg = DataConfig(max_length=16)
        refused_in_one_line(lambda: tokenize_records(checker.with_records(loaded, str(path)), tokenizer, loaded, cfg, str(path), "training"))
        refused_in_one_line(lambda: load_splits(DataConfig(train_path=str(path)), seed=0, task=task))
