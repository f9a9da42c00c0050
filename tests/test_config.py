"""Config: YAML files, key=value overrides, precedence, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from finetune.config import Config, ConfigError, build_config, load_config, parse_args, to_dict
from tests.conftest import REPO, TRAIN, run_env


def test_defaults_are_the_quickstart():
    cfg = load_config([], world_size=2)
    assert (cfg.model.name, cfg.method, cfg.plugin.name, cfg.data.train_path) == (
        "smollm2-135m-instruct",
        "lora",
        "torch_ddp",
        "chatterbot-corpus",
    )


def test_overrides_are_typed():
    cfg = load_config(["train.max_steps=7", "train.lr=1e-3", "lora.target_modules=[q_proj,v_proj]", "train.gradient_checkpointing=true", "output_dir=/tmp/x"], world_size=1)
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.lr == pytest.approx(1e-3)  # YAML reads '1e-3' as a string; we take it as a number
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.gradient_checkpointing is True
    assert cfg.output_dir == "/tmp/x"


def test_comma_list_override():
    assert load_config(["lora.target_modules=q_proj,v_proj"], world_size=1).lora.target_modules == ["q_proj", "v_proj"]


def test_later_config_files_and_overrides_win(tmp_path):
    first = tmp_path / "a.yaml"
    first.write_text("train:\n  max_steps: 3\n  lr: 0.5\nplugin:\n  name: torch_ddp\n  bucket_cap_mb: 10\n")
    second = tmp_path / "b.yaml"
    second.write_text("train:\n  max_steps: 4\n")
    cfg = load_config(["--config", str(first), f"--config={second}", "train.lr=0.25"], world_size=1)
    assert cfg.train.max_steps == 4
    assert cfg.train.lr == 0.25
    assert cfg.plugin.options == {"bucket_cap_mb": 10}
    assert to_dict(cfg)["plugin"]["bucket_cap_mb"] == 10


def test_every_booster_config_file_parses():
    files = sorted((REPO / "booster_configs").glob("*.yaml"))
    assert files, "booster_configs/ is empty"
    for path in files:
        assert isinstance(load_config(["--config", str(path)], world_size=2), Config)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train.max_step=5"], "unknown config key 'train.max_step' (did you mean 'train.max_steps'?)"),
        (["plugin.name=zero9"], "plugin.name: unknown value 'zero9'"),
        (["train.max_steps=ten"], "train.max_steps: expected a number, got 'ten'"),
        (["train.max_steps=2.5"], "train.max_steps: expected a whole number"),
        (["method=prefix"], "method: unknown value 'prefix'"),
        (["train.precision=fp16"], "train.precision=fp16: needs a CUDA GPU"),
        (["plugin.stage=2"], "plugin.stage"),
        (["model.name=/nonexistent/model"], "model.name: '/nonexistent/model' is not a named model"),
        (["data.train_path=/nonexistent.jsonl"], "data.train_path: file not found"),
        (["lora.dropout=1.5"], "lora.dropout: must be in [0, 1)"),
        (["train.batch_size=0"], "train.batch_size: must be at least 1"),
        (["--lr", "3"], "unknown option '--lr'"),
        (["max_steps"], "expected key=value"),
        (["--config", "/nonexistent.yaml"], "--config /nonexistent.yaml: file not found"),
    ],
)
def test_bad_input_names_the_problem(argv, message):
    with pytest.raises(ConfigError) as err:
        load_config(argv, world_size=1)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_args(["--config", str(bad)])


def test_non_mapping_yaml_file(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        build_config(parse_args(["--config", str(bad)]))


def test_fp16_is_accepted_where_cuda_is():
    assert load_config(["train.precision=fp16"], world_size=1, has_cuda=True).train.precision == "fp16"


@pytest.mark.parametrize("argv", [["plugin.name=zero9"], ["train.max_step=3"]])
def test_cli_fails_fast_with_one_line(argv):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, TRAIN, *argv], cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - started
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert elapsed < 10, f"bad config took {elapsed:.1f} s to reject"
