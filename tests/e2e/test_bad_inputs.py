"""Bad input through the CLI (training, resume, launch): exactly one `error:` line and a non-zero exit before any
model is built, and an earlier run's outputs left byte-for-byte intact."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

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
    (root / "same_replies.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "x", "rejected": "x"}\n')
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
    "qlora_8bit_on_fsdp": (lambda w: ["--config", "booster_configs/fsdp.yaml", "method=qlora", "quantization.bits=8"], "8-bit weights only as int8 tensors"),
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
    # preference pairs
    "pair_with_same_replies": (lambda w: ["task=preference", f"data.train_path={w['root'] / 'same_replies.jsonl'}"], "same_replies.jsonl row 2: fields 'chosen' and 'rejected' are the same text"),
    "setting_the_objective_ignores": (lambda w: ["task=preference", "preference.loss=simpo", "preference.label_smoothing=0.1"], "preference.label_smoothing: preference.loss=simpo does not use it"),
    "reward_with_a_preference_setting": (lambda w: ["task=reward", "preference.beta=0.5"], "preference.beta: task=reward trains with the Bradley-Terry loss, which reads no preference setting"),
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
