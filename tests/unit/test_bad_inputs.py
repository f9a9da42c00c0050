"""Bad input across config, data, model, output dir, resume and launch: each case must end with exactly
one `error:` line and a non-zero exit before any model is built or trained, and must leave the outputs of
an earlier run byte-for-byte intact."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from finetune.assets import AssetError, gpt2_tokenizer
from finetune.config import ConfigError, DataConfig, load_config
from finetune.data import DataError, load_records, load_splits, tokenize_records
from finetune.outputs import RunOutputs, output_problems, tee_rank_output
from finetune.tasks import build_task
from tests.conftest import TRAIN, run_python, write_instruction_file


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A finished single-process run with checkpoints (the 'existing outputs'), data files, odd paths."""
    root = tmp_path_factory.mktemp("bad")
    data = write_instruction_file(root / "train.jsonl")
    run = root / "run"
    args = [f"data.train_path={data}", "data.eval_fraction=0.25", f"output_dir={run}", "model.name=tiny-gpt2", "method=full", "train.max_steps=4"]
    args += ["checkpoint.every_steps=2", "eval.every_steps=0", "eval.num_generation_prompts=1", "eval.max_new_tokens=2"]
    result = run_python([TRAIN, *args], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (root / "bad_row.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    (root / "wrong_type.jsonl").write_text('{"instruction": "a", "output": 3}\n')
    (root / "not_json.json").write_text("{this is not json")
    (root / "data.txt").write_text("instruction,output\n")
    (root / "no_config").mkdir()
    (root / "weights.bin").write_bytes(b"\0" * 10)
    (root / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    (root / "a_file").write_text("")
    (root / "bad.yaml").write_text("train: [unclosed\n")
    (root / "hosts").write_text("node1\nnode1\n")
    return {"root": root, "data": data, "run": run}


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def copy_checkpoint(world: dict, name: str) -> Path:
    """A copy of the run's newest checkpoint, to damage."""
    target = world["root"] / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(world["run"] / "checkpoints" / "step_00000004", target)
    return target


def damaged(world: dict, case: str) -> Path:
    """Checkpoints broken in one way each."""
    ckpt = copy_checkpoint(world, case)
    if case == "truncated":
        weights = ckpt / "model" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif case == "missing_file":
        (ckpt / "scheduler.json").unlink()
    elif case == "corrupt_state":
        (ckpt / "state.json").write_text("{not json")
    elif case == "other_model":
        state = json.loads((ckpt / "state.json").read_text())
        state["identity"]["model"]["name"] = "tiny-llama"
        (ckpt / "state.json").write_text(json.dumps(state))
    elif case == "other_world":
        state = json.loads((ckpt / "state.json").read_text())
        state["identity"]["world_size"] = 2
        (ckpt / "state.json").write_text(json.dumps(state))
    elif case == "other_layout":
        state = json.loads((ckpt / "state.json").read_text())
        state["identity"]["plugin"] = {**state["identity"]["plugin"], "name": "gemini"}  # the one plugin still bound to its layout
        (ckpt / "state.json").write_text(json.dumps(state))
    return ckpt


# (arguments as a function of the world, expected fragment of the error line)
TRAIN_CASES = {
    # config
    "unknown_key": (lambda w: ["train.max_step=3"], "unknown config key 'train.max_step' (did you mean 'train.max_steps'?)"),
    "wrong_type": (lambda w: ["train.lr=fast"], "train.lr: expected a number"),
    "unknown_plugin": (lambda w: ["plugin.name=zero9"], "plugin.name: unknown value 'zero9'"),
    "lora_on_gemini": (lambda w: ["--config", "booster_configs/gemini.yaml", "method=lora"], "cannot hold LoRA adapters"),
    "world_not_divisible": (lambda w: ["--config", "booster_configs/tp2.yaml", "method=full", "model.name=tiny-gpt2"], "world size 1 is not divisible by tp_size*pp_size=2"),
    "qlora_on_fsdp": (lambda w: ["--config", "booster_configs/fsdp.yaml", "method=qlora"], "cannot hold quantized weights"),
    "bad_bits": (lambda w: ["method=qlora", "quantization.bits=3"], "quantization.bits: unknown value '3'"),
    "quantization_without_qlora": (lambda w: ["quantization.bits=8"], "does not quantize"),
    "fp16_on_cpu": (lambda w: ["train.precision=fp16"], "needs a CUDA GPU"),
    "missing_yaml": (lambda w: ["--config", str(w["root"] / "nope.yaml")], "file not found"),
    "malformed_yaml": (lambda w: ["--config", str(w["root"] / "bad.yaml")], "not valid YAML"),
    "on_nan_value": (lambda w: ["train.on_nan=ignore"], "train.on_nan: unknown value 'ignore'"),
    # data
    "missing_data": (lambda w: ["data.train_path=/nonexistent/train.jsonl"], "data.train_path: file not found"),
    "missing_field": (lambda w: [f"data.train_path={w['root'] / 'bad_row.jsonl'}"], "row 2: missing field 'output'"),
    "wrong_field_type": (lambda w: [f"data.train_path={w['root'] / 'wrong_type.jsonl'}"], "row 1: field 'output' must be a string"),
    "not_json": (lambda w: [f"data.train_path={w['root'] / 'not_json.json'}"], "not_json.json line 1: not valid JSON ("),
    # model
    "missing_model": (lambda w: ["model.name=/nonexistent/model"], "is not a named model"),
    "dir_without_config": (lambda w: [f"model.name={w['root'] / 'no_config'}"], "has no config.json"),
    "not_gguf": (lambda w: [f"model.name={w['root'] / 'weights.bin'}"], "is a file but not a .gguf"),
    "broken_gguf": (lambda w: [f"model.name={w['root'] / 'broken.gguf'}"], "broken.gguf"),
    # output dir
    "output_holds_a_run": (lambda w: [f"output_dir={w['run']}"], "holds another run"),
    "output_under_a_file": (lambda w: [f"output_dir={w['root'] / 'a_file' / 'out'}"], "is a file"),
    "resume_and_overwrite": (lambda w: [f"output_dir={w['run']}", "resume_from=latest", "overwrite_output_dir=true"], "contradict each other"),
    # resume
    "resume_nothing": (lambda w: [f"output_dir={w['root'] / 'fresh'}", "resume_from=latest"], "no complete checkpoint"),
    "resume_missing_dir": (lambda w: [f"output_dir={w['root'] / 'fresh2'}", f"resume_from={w['root'] / 'nope'}"], "no such checkpoint directory"),
    "resume_truncated": (lambda w: [f"output_dir={w['root'] / 'fresh3'}", f"resume_from={damaged(w, 'truncated')}"], "truncated or corrupt"),
    "resume_missing_file": (lambda w: [f"output_dir={w['root'] / 'fresh4'}", f"resume_from={damaged(w, 'missing_file')}"], "scheduler.json is missing"),
    "resume_corrupt_state": (lambda w: [f"output_dir={w['root'] / 'fresh5'}", f"resume_from={damaged(w, 'corrupt_state')}"], "state.json is corrupt"),
    "resume_partial": (lambda w: [f"output_dir={w['root'] / 'fresh6'}", f"resume_from={w['run'] / 'checkpoints'}"], "not a complete checkpoint"),
    "resume_other_model": (lambda w: [f"output_dir={w['root'] / 'fresh7'}", f"resume_from={damaged(w, 'other_model')}"], "written with model.name=\"tiny-llama\""),
    # another world size is no refusal (checkpoints are resharded): this copy then fails only as another run's
    "resume_other_world": (lambda w: [f"output_dir={w['root'] / 'fresh8'}", f"resume_from={damaged(w, 'other_world')}"], "the checkpoint belongs to another run"),
    "resume_other_layout": (lambda w: [f"output_dir={w['root'] / 'fresh9'}", f"resume_from={damaged(w, 'other_layout')}"], "written with plugin.name=\"gemini\", this run has plugin.name=\"torch_ddp\"; gemini checkpoints are not resharded"),
}


def base_args(world: dict) -> list[str]:
    # the world's run settings, so that resume cases differ from it only in what they break
    return [f"data.train_path={world['data']}", "data.eval_fraction=0.25", "model.name=tiny-gpt2", "method=full", "train.max_steps=4", f"output_dir={world['root'] / 'out'}"]


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_bad_training_input(case, world):
    make_args, fragment = TRAIN_CASES[case]
    before = tree_digest(world["run"])
    result = run_python([TRAIN, *base_args(world), *make_args(world)], timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert fragment in lines[0], lines[0]
    assert "model_loaded" not in result.stdout, "the model was built before the input was refused"
    assert tree_digest(world["run"]) == before, "the earlier run's outputs changed"


LAUNCH_CASES = {
    "missing_hostfile": (lambda w: ["hostfile", "--hostfile", str(w["root"] / "nohosts"), "--master_addr", "127.0.0.1", "--nproc_per_node", "2"], "hostfile"),
    "duplicate_hosts": (lambda w: ["hostfile", "--hostfile", str(w["root"] / "hosts"), "--master_addr", "127.0.0.1", "--nproc_per_node", "2"], "node1"),
    "bad_training_config": (lambda w: ["single", "--nproc_per_node", "2", "--", "train.max_step=3"], "unknown config key"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(LAUNCH_CASES))
def test_bad_launch_input(case, world):
    make_args, fragment = LAUNCH_CASES[case]
    result = run_python(["-m", "finetune.launch", *make_args(world)], timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr[-2000:]


@pytest.mark.e2e
def test_overwrite_replaces_an_earlier_run(world):
    copy = world["root"] / "overwritten"
    shutil.copytree(world["run"], copy)
    args = [*base_args(world), f"output_dir={copy}", "overwrite_output_dir=true", "eval.every_steps=0", "eval.num_generation_prompts=0"]
    result = run_python([TRAIN, *args], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (copy / "checkpoints").exists()  # the earlier run's checkpoints went with it
    assert (copy / "final" / "model.safetensors").is_file()


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


@pytest.mark.e2e
def test_bad_data_through_the_cli_is_one_line(tmp_path):
    """One real launch: a data file error reaches the user as one line and exit 2, before the model is built."""
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "d"}\n')
    args = [f"data.train_path={data}", "data.eval_fraction=0.5", "model.name=tiny-gpt2", "method=full", f"output_dir={tmp_path / 'out'}"]
    result = run_python([TRAIN, *args], timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and lines == [f"error: {data} line 2: not UTF-8 (byte 0xe9 at column 21); re-save the file as UTF-8"], result.stderr[-2000:]
    assert "model_loaded" not in result.stdout
