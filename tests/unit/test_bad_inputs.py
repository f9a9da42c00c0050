"""Bad input in process (config values, data files, GGUF files, output and checkpoint dirs): each is one clear
error before any model is built or trained; rank logs and a torn metrics line do not lose an earlier run's output."""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

import pytest

from finetune.assets import AssetError, gpt2_tokenizer
from finetune.config import ConfigError, DataConfig, load_config
from finetune.data import DataError, load_records, load_splits, tokenize_records
from finetune.outputs import RunOutputs, output_problems, tee_rank_output
from finetune.tasks import build_task
from tests.conftest import write_instruction_file


# --- in-process checks (issue 17): values, data files, model files, output dir --------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Small files that break one rule each."""
    data = write_instruction_file(tmp_path / "train.jsonl", n=8)
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 64, "n_embd": 32}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8, "lora_alpha": ')  # torn mid-write
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    return {"data": data, "no_tokenizer": no_tokenizer, "adapter": adapter}


# (arguments as a function of the files, expected fragment of the ConfigError)
CONFIG_CASES = {
    "lr_nan": (lambda f: ["train.lr=nan"], "train.lr: must be a finite number"),
    "lr_inf": (lambda f: ["train.lr=.inf"], "train.lr: must be a finite number"),
    "max_steps_inf": (lambda f: ["train.max_steps=inf"], "train.max_steps: expected a whole number"),
    "max_steps_nan": (lambda f: ["train.max_steps=nan"], "train.max_steps: expected a whole number"),
    "grad_norm_negative": (lambda f: ["train.max_grad_norm=-1"], "train.max_grad_norm: must not be negative"),
    "grad_norm_nan": (lambda f: ["train.max_grad_norm=nan"], "train.max_grad_norm: must be a finite number"),
    "weight_decay_negative": (lambda f: ["train.weight_decay=-0.1"], "train.weight_decay: must not be negative"),
    "alpha_zero": (lambda f: ["lora.alpha=0"], "lora.alpha: must be positive"),
    "max_new_tokens_negative": (lambda f: ["eval.max_new_tokens=-1"], "eval.max_new_tokens: must not be negative"),
    "seed_negative": (lambda f: ["train.seed=-1"], "train.seed: must not be negative"),
    "rank_absurd": (lambda f: ["lora.r=100000"], "lora.r=100000: above"),
    "rank_above_hidden": (lambda f: ["model.name=tiny-gpt2", "lora.r=128"], "above tiny-gpt2's hidden size (64)"),
    "output_dir_empty": (lambda f: ["output_dir="], "output_dir: is empty"),
    "eval_is_train": (lambda f: [f"data.train_path={f['data']}", f"data.eval_path={f['data']}"], "data.eval_path: is data.train_path"),
    "max_length_above_positions": (lambda f: ["model.name=tiny-gpt2", "data.max_length=300"], "above the 256 positions of tiny-gpt2; set data.max_length=256"),
    "no_tokenizer": (lambda f: [f"model.name={f['no_tokenizer']}", "method=full"], "has no tokenizer files"),
    "malformed_adapter_config": (lambda f: [f"lora.init_from={f['adapter']}"], "adapter_config.json is not valid JSON"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_value_is_one_config_error(case, files):
    make_args, fragment = CONFIG_CASES[case]
    with pytest.raises(ConfigError) as err:
        load_config(make_args(files), world_size=1)
    assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_rotary_models_may_go_past_their_position_count():
    # Llama's positions are computed, not looked up: tiny-llama runs at 512 tokens (bench/packing.py does)
    assert load_config(["model.name=tiny-llama", "data.max_length=512"], world_size=1).data.max_length == 512


BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize(
    "name, content",
    [
        ("bom.jsonl", BOM + b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n'),
        ("bom.json", BOM + b'[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]'),
        ("bom.csv", BOM + b"instruction,output\r\na,b\r\nc,d\r\n"),
        ("crlf.csv", b"instruction,output\r\na,b\r\nc,d\r\n"),
        ("blank_lines.jsonl", b'{"instruction": "a", "output": "b"}\n\n   \n{"instruction": "c", "output": "d"}\n\n'),
    ],
)
def test_bom_crlf_and_blank_lines_are_read_as_plain_rows(tmp_path, name, content):
    """Regression guard (these already worked through `datasets`): no BOM in the first key, no CR in the last value."""
    (tmp_path / name).write_bytes(content)
    records = load_records(str(tmp_path / name), build_task("instruction", DataConfig()))
    assert [(r["instruction"], r["output"], r["_row"]) for r in records] == [("a", "b", 1), ("c", "d", 2)]


@pytest.mark.parametrize("name", ["latin1.jsonl", "latin1.csv"])
def test_non_utf8_bytes_name_the_file_and_line(tmp_path, name):
    body = b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "d"}\n' if name.endswith("jsonl") else b"instruction,output\na,b\ncaf\xe9,d\n"
    (tmp_path / name).write_bytes(body)
    line = 2 if name.endswith("jsonl") else 3
    with pytest.raises(DataError, match=rf"{name} line {line}: not UTF-8 \(byte 0xe9"):
        load_records(str(tmp_path / name), build_task("instruction", DataConfig()))


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("trailing_comma.jsonl", b'{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": "d",}\n', "line 3: not valid JSON (Expecting property name enclosed in double quotes; column 36)"),
        ("torn.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "outp', "line 2: not valid JSON (Unterminated string starting at; column 22)"),
        ("array_row.jsonl", b'{"instruction": "a", "output": "b"}\n["c", "d"]\n', "line 2: a JSON array, not an object with the task's fields"),
        ("null_row.jsonl", b'{"instruction": "a", "output": "b"}\nnull\n', "line 2: a JSON null, not an object"),  # datasets' reader died of SIGSEGV on it
        ("numbers.json", b'[1, 2]', "row 1: a JSON number, not an object"),  # datasets read it as a `text` column
        ("missing_comma.json", b'[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]', "line 2: not valid JSON (Expecting ',' delimiter; column 22)"),
    ],
)
def test_invalid_json_names_the_file_and_line(tmp_path, name, content, fragment):
    """A JSONL line that is not JSON read "cannot be read as JSON (DatasetGenerationError)": named like every other bad row."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as err:
        load_records(str(tmp_path / name), build_task("instruction", DataConfig()))
    assert str(err.value).startswith(f"{tmp_path / name} {fragment}"), str(err.value)


@pytest.mark.parametrize("which, content", [("train", b""), ("train", b"\n  \n"), ("eval", BOM), ("eval", b"instruction,output\n")])
def test_empty_train_or_eval_file_is_one_data_error(tmp_path, which, content):
    paths = {"train": write_instruction_file(tmp_path / "train.jsonl", n=8), "eval": write_instruction_file(tmp_path / "eval.jsonl", n=4)}
    paths[which] = tmp_path / f"empty_{which}.{'csv' if content.startswith(b'instruction') else 'jsonl'}"
    paths[which].write_bytes(content)
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(train_path=str(paths["train"]), eval_path=str(paths["eval"])), seed=0)
    assert str(err.value).startswith(f"{paths[which]}: ") and "no records" in str(err.value), str(err.value)


def test_label_column_mixing_int_and_str_names_the_row(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"text": "a b", "label": 1}, {"text": "c d", "label": 2}, {"text": "e f", "label": "spam"}, {"text": "g h", "label": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"mixed.jsonl row 3: label 'spam' is a str but row 1's label 1 is a int"):
        load_splits(DataConfig(train_path=str(path), eval_path=str(path)), seed=0, task="classification")


def test_huge_row_is_not_tokenized_in_full(tmp_path):
    from finetune.data import MAX_CHARS_PER_TOKEN

    tokenizer = gpt2_tokenizer()
    seen: list[int] = []

    class Spy(type(tokenizer)):  # records how much text each tokenizer call is given
        def __call__(self, text, *args, **kwargs):
            seen.append(len(text))
            return super().__call__(text, *args, **kwargs)

    tokenizer.__class__ = Spy
    task = build_task("instruction", DataConfig())
    records = [{"instruction": "Say it.", "input": "", "output": "word " * 400_000, "_row": 1}, {"instruction": "Hi.", "input": "", "output": "ok", "_row": 2}]
    samples, truncated, dropped = tokenize_records(task, tokenizer, records, DataConfig(max_length=64), "big.jsonl", "training")
    assert max(seen) <= 64 * MAX_CHARS_PER_TOKEN, f"tokenized {max(seen)} characters for a 64-token sample"
    assert (truncated, dropped) == (1, 0) and len(samples[0]["input_ids"]) == 64 and len(samples[1]["input_ids"]) < 64


def _gguf(path: Path, architecture: str, tokenizer_model: str) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("architecture, tokenizer_model, fragment", [("rwkv6", "gpt2", "GGUF architecture 'rwkv6' cannot be converted"), ("llama", "llama", "only byte-level BPE ('gpt2') GGUF tokenizers")])
def test_unreadable_gguf_is_refused_before_dequantizing(tmp_path, monkeypatch, architecture, tokenizer_model, fragment):
    import transformers

    from finetune.model import resolve_source

    def dequantize(*args, **kwargs):
        raise AssertionError("the GGUF weights were dequantized before the file was checked")

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", dequantize)
    with pytest.raises(AssetError, match=re.escape(fragment)):
        resolve_source(str(_gguf(tmp_path / f"{architecture}.gguf", architecture, tokenizer_model)))


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "run").write_text("")
    assert output_problems(load_config([f"output_dir={tmp_path / 'run'}"], world_size=1)) == [f"output_dir: {tmp_path / 'run'} is a file, not a directory; choose another output_dir"]


def test_read_only_checkpoints_dir_is_refused_at_start(tmp_path, monkeypatch):
    """Simulated with os.access: chmod does not stop root, who runs CI."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "checkpoints" and real_access(path, mode))
    problems = output_problems(load_config([f"output_dir={tmp_path / 'run'}"], world_size=1))
    assert problems[:1] == [f"output_dir: {tmp_path / 'run' / 'checkpoints'} is not writable; fix its permissions or choose another output_dir"]


def test_rank_log_is_appended_per_launch(tmp_path, monkeypatch):
    for launch in ("first", "second"):
        monkeypatch.setattr(sys, "stdout", io.StringIO())
        monkeypatch.setattr(sys, "stderr", io.StringIO())
        path = tee_rank_output(str(tmp_path), rank=0)
        print(f"{launch} launch crashed here")
    log = path.read_text()
    assert "first launch crashed here" in log and "second launch crashed here" in log
    assert log.count("===== launch ") == 2


def test_torn_metrics_line_does_not_block_resume(tmp_path, capsys):
    records = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 3, "lo')
    outputs = RunOutputs(str(tmp_path), resume_step=2)
    assert outputs.read_metrics() == records
    assert "ignored a torn last line" in capsys.readouterr().out
