"""Real 2-rank launches: two "nodes" on this machine (one through a stand-in ssh), a stop signal to the
launcher, a killed or stalled rank, a user error on the ranks, nodes that do not share output_dir."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from finetune.errors import RANK_LOST
from finetune.launch_output import REMOTE_PID
from tests.conftest import REPO, free_port, hostfile, leftover_children, read_summary, run_env, run_train
from tests.unit.test_launch import run_script
from tests.unit.test_launch import venv_on_path  # noqa: F401 (autouse: torchrun on PATH)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_a_user_error_on_the_ranks_is_the_last_line(tmp_path):
    # resume_from=latest in an empty output_dir passes the launcher's checks and fails on each rank at start.
    result = run_script("launch/single_node.sh", "2", "model.name=tiny-gpt2", "resume_from=latest", f"output_dir={tmp_path}", env={"HF_TOKEN": "hf_do_not_show"})
    cause = f"resume_from=latest: no complete checkpoint in {tmp_path / 'checkpoints'}"
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    # Rank 0 says it; a rank that got there RANK_EXIT_GRACE_S before rank 0 (the ranks import the stack side by side, and
    # on a loaded machine one can lag by more) says it naming itself. Either way the cause is the last line, alone.
    assert result.stderr.strip().splitlines()[-1] in (f"error: {cause}", f"error (rank 1): {cause}"), result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "export " not in output and "hf_do_not_show" not in output and "ChildFailedError" not in output


def fake_ssh(tmp_path) -> dict[str, str]:
    """PATH with an `ssh` that runs its command on this machine through a shell, as sshd does on the host."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text('#!/bin/sh\n# ssh -o BatchMode=yes HOST COMMAND\nshift 3\nexec sh -c "$*"\n')
    (bin_dir / "ssh").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{run_env()['PATH']}"}


def training_args(instruction_file, output_dir, steps: int) -> list[str]:
    return ["model.name=tiny-gpt2", "method=full", f"data.train_path={instruction_file}", "data.eval_fraction=0.25",
            f"train.max_steps={steps}", "eval.num_generation_prompts=0", f"output_dir={output_dir}"]


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_two_node_launch_through_a_hostfile(tmp_path, instruction_file):
    # Two "nodes" on this machine: localhost is started directly, node-1 through an ssh that runs the
    # quoted remote command in a shell here. output_dir holds what colossalai run's shell would run.
    hosts = hostfile(tmp_path, "localhost\nnode-1\n")
    pwned = tmp_path / "PWNED"
    out = tmp_path / f"run $(touch {pwned}); `touch {pwned}`"
    result = run_script("launch/multi_node.sh", hosts, "127.0.0.1", "1", *training_args(instruction_file, out, 3), env=fake_ssh(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert not pwned.exists()
    summary = read_summary(out)  # the argument reached both ranks verbatim: they wrote into that very dir
    assert summary["world_size"] == 2
    assert summary["checks"]["replicas_identical"] and len(summary["checks"]["replica_digests"]) == 2
    assert (out / "logs" / "rank_0.log").is_file() and (out / "logs" / "rank_1.log").is_file()
    assert "eval before training" in (out / "logs" / "rank_0.log").read_text()
    assert not [line for line in result.stdout.splitlines() if line.startswith(REMOTE_PID)]  # the remote pid line is the launcher's


def started(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """A launcher started as a shell would start it (its own process group, so the test can signal it alone)."""
    return subprocess.Popen(command, cwd=REPO, env={**run_env(), **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_training(output_dir, process: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until rank 0 has started training (its eval before training is done); kill the run if it does not."""
    log, deadline = output_dir / "logs" / "rank_0.log", time.monotonic() + timeout
    while not (log.is_file() and "eval before training" in log.read_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            for leftover in processes_of(output_dir):
                leftover.kill()
            raise AssertionError(f"training did not start: {log}")
        time.sleep(0.2)


def finished(process: subprocess.Popen, timeout: float = 150) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def processes_of(output_dir) -> list:
    """Processes still running with output_dir on their command line (the ranks, torchrun, ssh)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(output_dir) in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


# A stand-in for torchrun: starts one "rank" that ignores SIGTERM (a rank stuck in C code) and prints its
# pid, then exits at once (leaving the rank orphaned) or waits for it.
FAKE_TORCHRUN = """
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"], start_new_session=True)
print("rank", rank.pid, flush=True)
if sys.argv[1] == "wait":
    rank.wait()
"""


@pytest.mark.distributed
@pytest.mark.parametrize("torchrun", ["exits", "wait"])
def test_no_process_outlives_the_launcher(torchrun):
    # "exits": torchrun ends and its rank, holding the output pipe, would keep the launcher waiting forever.
    # "wait": the rank ignores the SIGTERM passed on; a second signal kills everything at once.
    import psutil

    code = f"import sys; from finetune.launch_output import Node, run_nodes; sys.exit(run_nodes([Node([sys.executable, '-c', {FAKE_TORCHRUN!r}, {torchrun!r}])], {{}}))"
    launcher = started([sys.executable, "-c", code])
    rank = int(launcher.stdout.readline().split()[1])
    if torchrun == "wait":
        launcher.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert launcher.poll() is None and psutil.pid_exists(rank)  # the grace period: nothing killed yet
        launcher.send_signal(signal.SIGINT)
    result = finished(launcher, timeout=30)
    assert result.returncode == (137 if torchrun == "wait" else 0), result.stderr
    assert not psutil.pid_exists(rank) or psutil.Process(rank).status() == psutil.STATUS_ZOMBIE


@pytest.mark.distributed
@pytest.mark.timeout(400)
@pytest.mark.parametrize("script, stop", [("launch/single_node.sh", signal.SIGTERM), ("launch/multi_node.sh", signal.SIGINT)])
def test_a_stopped_launcher_stops_every_rank_with_a_checkpoint(tmp_path, instruction_file, script, stop):
    # SIGTERM (a scheduler) or SIGINT (Ctrl-C) to the launcher: every rank, the remote one too, finishes its
    # step, checkpoints and exits 3; the launcher exits 3 and leaves nothing running.
    out = tmp_path / "run"
    hosts = ["2"] if script.endswith("single_node.sh") else [hostfile(tmp_path, "localhost\nnode-1\n"), "127.0.0.1", "1"]
    launcher = started(["bash", script, *hosts, *training_args(instruction_file, out, 100000), "checkpoint.every_steps=0"], {**fake_ssh(tmp_path), "MASTER_PORT": str(free_port())})
    wait_for_training(out, launcher)
    launcher.send_signal(stop)
    result = finished(launcher)
    assert result.returncode == 3, (result.stdout + result.stderr)[-3000:]
    from finetune.checkpoint import complete_checkpoints

    stopped = [line for line in result.stdout.splitlines() if line.startswith("preempted: stopped after step")]
    assert len(stopped) == 1 and str(complete_checkpoints(out)[-1]) in stopped[0] and "Traceback" not in result.stderr
    assert processes_of(out) == []


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_a_killed_rank_is_one_line_naming_it(tmp_path, instruction_file):
    out = tmp_path / "run"
    launcher = started([sys.executable, "-m", "finetune.launch", "single", "--nproc_per_node", "2", "--master_port", str(free_port()), "--",
                        *training_args(instruction_file, out, 100000)])
    wait_for_training(out, launcher)
    rank_1 = [p for p in processes_of(out) if "finetune/train.py" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
    assert len(rank_1) == 1
    rank_1[0].send_signal(signal.SIGKILL)
    result = finished(launcher)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: rank 1 died (SIGKILL, killed by hand or by the out-of-memory killer); the other ranks were stopped: resume_from=latest continues from the last complete checkpoint"], result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in result.stderr
    assert result.returncode == 137
    # Rank 0 itself said it in one line, no gloo traceback (what plain torchrun shows). gloo's words for the lost
    # peer depend on what rank 0 was doing when rank 1 died: reading ("closed"), or writing ("reset", "Broken pipe").
    rank_0 = (out / "logs" / "rank_0.log").read_text()
    assert re.search(rf"^error: {RANK_LOST} \((Connection closed by peer|Connection reset by peer|Broken pipe)\): ", rank_0, re.MULTILINE), rank_0[-2000:]
    assert "Traceback" not in rank_0
    assert processes_of(out) == [] and not leftover_children()


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_a_rank_stalled_in_a_tensor_parallel_collective_fails_the_other_in_time(tmp_path, instruction_file):
    # Rank 1 stops before step 1; rank 0 then waits inside a TP all-reduce (ColossalAI's sub-group, which
    # got torch's 30-minute default before launch.timeout_s was made the default of every group).
    args = ["--config", "booster_configs/tp2.yaml", "model.name=tiny-gpt2", "method=full", f"data.train_path={instruction_file}", "data.eval_fraction=0.25",
            "train.max_steps=2", "eval.num_generation_prompts=0", "launch.timeout_s=20", f"output_dir={tmp_path / 'run'}"]
    started = time.monotonic()
    result = run_train(args, launcher="torchrun", nproc=2, env={"FINETUNE_FAULT": "stall_in_tp:1"}, timeout=240)  # past it, every rank is stopped
    wall = time.monotonic() - started
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and errors, result.stderr[-3000:]
    assert errors == ["error: collective timed out after 20s (launch.timeout_s): another rank stopped responding; its log in output_dir/logs/ "
                      "says why (stalled, killed, out of memory, network); raise launch.timeout_s only if a step is that slow"]
    # Rank 1's log last changed when it stalled, rank 0's when it gave up: timeout_s apart, plus a margin.
    logs = tmp_path / "run" / "logs"
    assert "fault: rank 1 stalls before step 1" in (logs / "rank_1.log").read_text()
    waited = (logs / "rank_0.log").stat().st_mtime - (logs / "rank_1.log").stat().st_mtime
    assert 15 <= waited < 45, f"rank 0 waited {waited:.0f}s"
    # Once rank 0 gave up, the launcher's SIGTERM ends the stalled rank: nothing waits out the grace before its SIGKILL.
    assert time.time() - (logs / "rank_0.log").stat().st_mtime < 15
    assert wall < 200, f"took {wall:.0f}s"


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_nodes_that_do_not_share_output_dir_are_told_at_start(tmp_path, instruction_file):
    # Two "nodes" on this machine (two torchrun agents, node_rank 0 and 1); node 1 gets its own output_dir,
    # as a node without the shared filesystem would see an output_dir path that is not rank 0's.
    port = free_port()
    common = ["model.name=tiny-gpt2", "method=full", f"data.train_path={instruction_file}", "data.eval_fraction=0.25", "train.max_steps=1", "eval.num_generation_prompts=0"]
    nodes = [
        subprocess.Popen(
            ["torchrun", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
             "finetune/train.py", *common, f"output_dir={tmp_path / f'node{node}' / 'run'}"],
            cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        for node in (0, 1)
    ]
    try:
        results = [node.communicate(timeout=200) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert all(node.returncode != 0 for node in nodes)
    errors = [line for line in results[0][1].splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: node 1 ({socket.gethostname()}) does not see the files rank 0 writes into output_dir {tmp_path / 'node0' / 'run'}: "
        "a multi-node run needs output_dir and the cache $FINETUNE_CACHE on a filesystem every node mounts at the same path (NFS, Lustre, ...)"
    ], results[0][1][-3000:]
    assert not list((tmp_path / "node0" / "run").glob(".shared_check_*"))  # the token is cleaned up
