"""The tests' launcher (tests/zygote.py) does what torchrun and python do for a run: rank variables, a
rendezvous of its own, the first failure stopping the other ranks, exit codes, output and timeouts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_env, stop_session, zygote

pytestmark = pytest.mark.e2e


RANK_SCRIPT = """
import json, os, sys, time
import torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
open(os.path.join(sys.argv[2], str(rank)), "w").write(str(os.getpid()))
# One write a line: the ranks share the output file, and a print() that writes the newline apart can interleave
sys.stdout.write(json.dumps({k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "FINETUNE_FAULT")} | {"argv": sys.argv[1:2], "cwd": os.getcwd(), "path0": sys.path[0]}) + "\\n")
sys.stderr.write(f"stderr of rank {rank}\\n")
sys.stdout.flush(), sys.stderr.flush()
dist.barrier()
mode = sys.argv[1]
if mode == "fail" and rank == 1:
    sys.exit(3)
if mode in ("fail", "hang"):
    time.sleep(600)
"""


@pytest.fixture
def rank_script(tmp_path: Path) -> str:
    path = tmp_path / "ranks.py"
    path.write_text(RANK_SCRIPT)
    return str(path)


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie waiting for its parent's wait() has ended)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_ranks_get_torchruns_variables_and_meet_in_their_own_group(rank_script, tmp_path):
    result = zygote().run([rank_script, "ok", str(tmp_path)], 2, True, {**run_env(), "FINETUNE_FAULT": "x"}, timeout=120)
    assert result.returncode == 0, result.stderr
    ranks = sorted((json.loads(line) for line in result.stdout.splitlines()), key=lambda r: r["RANK"])
    assert [(r["RANK"], r["LOCAL_RANK"], r["WORLD_SIZE"], r["LOCAL_WORLD_SIZE"]) for r in ranks] == [("0", "0", "2", "2"), ("1", "1", "2", "2")]
    assert all(r["FINETUNE_FAULT"] == "x" and r["argv"] == ["ok"] and r["path0"] == str(Path(rank_script).parent) for r in ranks)
    assert sorted(line for line in result.stderr.splitlines() if line.startswith("stderr of")) == ["stderr of rank 0", "stderr of rank 1"]


def test_the_first_failure_stops_the_other_rank_and_the_run_fails(rank_script, tmp_path):
    started = time.monotonic()
    result = zygote().run([rank_script, "fail", str(tmp_path)], 2, True, run_env(), timeout=120)
    assert result.returncode == 1  # torchrun's exit code when a rank failed
    assert time.monotonic() - started < 60  # rank 0 was stopped (SIGTERM), not left sleeping 600 s


def test_one_process_runs_as_python_would_with_its_exit_code(tmp_path):
    script = tmp_path / "one.py"
    script.write_text("import os, sys\nprint('RANK' in os.environ, sys.argv[1:])\nsys.exit(2)\n")
    result = zygote().run([str(script), "a", "b"], 1, False, run_env(), timeout=60)
    assert (result.returncode, result.stdout) == (2, "False ['a', 'b']\n")


def test_past_the_timeout_every_rank_is_stopped(rank_script, tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        zygote().run([rank_script, "hang", str(tmp_path)], 2, True, run_env(), timeout=20)
    pids = [int((tmp_path / str(rank)).read_text()) for rank in range(2)]
    assert not any(alive(pid) for pid in pids)


def test_stopping_a_session_takes_no_grace_once_its_processes_ended():
    """Our own child, not yet waited for, is a zombie once SIGTERM ended it: stop_session returns then, not 30 s later."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    started = time.monotonic()
    stop_session(process.pid)
    assert time.monotonic() - started < 10
    assert process.wait() == -signal.SIGTERM  # the SIGTERM ended it, no SIGKILL was needed
