"""The launch/ scripts: valid bash, bad input explained, and the remote command's quoting run through a real shell."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from finetune.launch import remote_command
from tests.conftest import REPO, hostfile
from tests.unit.test_launch import run_script
from tests.unit.test_launch import venv_on_path  # noqa: F401 (autouse: torchrun on PATH)

SCRIPTS = ["launch/single_node.sh", "launch/multi_node.sh", "launch/slurm.sbatch"]


@pytest.mark.e2e
@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_valid_bash(script):
    assert subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True).returncode == 0


@pytest.mark.e2e
def test_scripts_explain_bad_input(tmp_path):
    dup = run_script("launch/multi_node.sh", hostfile(tmp_path, "a\na\n"), "127.0.0.1", "1", "model.name=tiny-gpt2")
    assert dup.returncode != 0 and "error: hostfile" in dup.stderr and "listed twice" in dup.stderr
    missing = run_script("launch/single_node.sh", "2", "--config", "/missing.yaml")
    assert missing.returncode != 0 and missing.stderr.strip() == "error: --config /missing.yaml: file not found"
    usage = run_script("launch/multi_node.sh")
    assert usage.returncode == 2 and "usage:" in usage.stderr


# Arguments and values a shell would run, split, expand or drop; colossalai run ran them on every host.
SHELL_WORDS = [
    "output_dir=/tmp/x$(touch {pwned})", "output_dir=/tmp/x;touch {pwned}", "output_dir=`touch {pwned}`", "lora.target_modules=[q_proj, v_proj]",
    "output_dir=/data/my runs", "model.name='a'", 'model.name="a"', "output_dir=~/runs", "output_dir=/tmp/*", "lora.target_modules={{q,v}}",
    "model.name=a|b&c>d<e", "x=\\$HOME", "", "multi\nline #not a comment",
]


@pytest.mark.e2e
def test_a_remote_host_gets_every_argument_and_variable_verbatim(tmp_path):
    # The string ssh hands to the remote shell, run by a real shell: each word arrives as it was, nothing runs.
    pwned = tmp_path / "PWNED"
    words = [word.format(pwned=pwned) for word in SHELL_WORDS]
    env = {"FINETUNE_X": words[0], "MULTI": "a\n$b \"c\" `d`", "EMPTY": ""}
    show = [sys.executable, "-c", "import json, os, sys; print(json.dumps([sys.argv[1:], {k: os.environ[k] for k in ('FINETUNE_X', 'MULTI', 'EMPTY')}]))"]
    result = subprocess.run(["sh", "-c", remote_command([*show, *words], env)], capture_output=True, text=True, timeout=60)
    pid_line, shown = result.stdout.splitlines()
    assert pid_line.startswith("finetune.launch: torchrun pid ") and json.loads(shown) == [words, env]
    assert not pwned.exists()
