"""Launching: hostfile checks, the commands built for one node / a hostfile / Slurm, the launch/
scripts, the remote command's quoting, and real 2-rank runs: two "nodes" on this machine (one through
a stand-in ssh), a stop signal to the launcher, a killed rank."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from finetune.errors import RANK_LOST
from finetune.launch import LaunchError, build_command, parse, read_hostfile, remote_command, slurm_torchrun_command
from finetune.launch_output import REMOTE_PID, Failure, OutputFilter, death_line, root_cause
from tests.conftest import REPO, free_port, launch_command, read_summary, run_env

SCRIPTS = ["launch/single_node.sh", "launch/multi_node.sh", "launch/slurm.sbatch"]


@pytest.fixture(autouse=True)
def venv_on_path(monkeypatch):
    """The launchers look for torchrun on PATH, as they would in an activated environment."""
    monkeypatch.setenv("PATH", run_env()["PATH"])


def test_torchrun_must_be_on_path(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(LaunchError, match="torchrun is not on PATH"):
        build_command(parse(["single"]), {})


def hostfile(tmp_path, text: str) -> str:
    path = tmp_path / "hosts"
    path.write_text(text)
    return str(path)


def test_hostfile_is_read(tmp_path):
    assert read_hostfile(hostfile(tmp_path, "node-0\n\nnode-1\n")) == ["node-0", "node-1"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "lists no hosts"),
        ("node-0\nnode-0\n", "line 2: host 'node-0' is listed twice"),
        ("node-0:22\n", "carries a port"),
        ("# workers\nnode-0\n", "line 1: '# workers' is not a host"),
        ("node-0 slots=8\n", "is not a host"),
        ("-oProxyCommand=touch${IFS}/tmp/pwned\n", "line 1: '-oProxyCommand=.*' is not a host"),
    ],
)
def test_bad_hostfiles(tmp_path, text, message):
    with pytest.raises(LaunchError, match=message):
        read_hostfile(hostfile(tmp_path, text))
    with pytest.raises(LaunchError, match="hostfile not found"):
        read_hostfile(str(tmp_path / "missing"))


def test_single_node_command(tmp_path):
    # torchrun from an argument list, with the launcher's environment as it is: nothing goes on a command line.
    port = free_port()
    args = parse(["single", "--nproc_per_node", "2", "--master_port", str(port), "--", "model.name=tiny-gpt2", "train.max_steps=3"])
    launch = build_command(args, {"HF_TOKEN": "hf_secret", "PATH": "/usr/bin"})
    assert [node.command for node in launch.nodes] == [
        ["torchrun", "--nproc_per_node=2", "--nnodes=1", "--node_rank=0", "--master_addr=127.0.0.1", f"--master_port={port}", "finetune/train.py", "model.name=tiny-gpt2", "train.max_steps=3"]
    ]
    assert launch.env == {"HF_TOKEN": "hf_secret", "PATH": "/usr/bin"} and launch.held_back == [] and not launch.nodes[0].ssh


def test_busy_port_and_bad_config_fail_before_launch(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(LaunchError, match=f"port {port} is in use"):
            build_command(parse(["single", "--master_port", str(port)]), {})
    with pytest.raises(LaunchError, match="unknown config key 'train.max_step'"):
        build_command(parse(["single", "--master_port", str(free_port()), "--", "train.max_step=3"]), {})
    with pytest.raises(LaunchError, match="--config /missing.yaml: file not found"):
        build_command(parse(["single", "--master_port", str(free_port()), "--", "--config", "/missing.yaml"]), {})
    with pytest.raises(LaunchError, match="needs --hostfile FILE and --master_addr"):
        build_command(parse(["hostfile", "--nproc_per_node", "1"]), {})


def test_world_size_checks_use_every_node(tmp_path):
    hosts = hostfile(tmp_path, "node-0\nnode-1\nnode-2\n")
    args = parse(["hostfile", "--hostfile", hosts, "--master_addr", "10.0.0.1", "--nproc_per_node", "1", "--", "--config", str(REPO / "booster_configs" / "tp2.yaml"), "method=full", "model.name=tiny-gpt2"])
    with pytest.raises(LaunchError, match="world size 3 is not divisible by tp_size\\*pp_size=2"):
        build_command(args, {})


def test_slurm_torchrun_command():
    env = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "4", "MASTER_ADDR": "gpu-node-07", "MASTER_PORT": "29611"}
    assert slurm_torchrun_command(env, 8, ["--config", "run.yaml", "train.max_steps=10"]) == [
        "torchrun",
        "--nnodes=4",
        "--nproc_per_node=8",
        "--rdzv_id=4242",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=gpu-node-07:29611",
        "finetune/train.py",
        "--config",
        "run.yaml",
        "train.max_steps=10",
    ]
    with pytest.raises(LaunchError, match="SLURM_JOB_ID, SLURM_NNODES, MASTER_ADDR unset"):
        slurm_torchrun_command({}, 8, [])


@pytest.mark.e2e
@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_valid_bash(script):
    assert subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True).returncode == 0


def run_script(*args: str, port: int | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**run_env(), **(env or {})}
    env["MASTER_PORT"] = str(port or free_port())
    return subprocess.run(["bash", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=420)


@pytest.mark.e2e
def test_scripts_explain_bad_input(tmp_path):
    dup = run_script("launch/multi_node.sh", hostfile(tmp_path, "a\na\n"), "127.0.0.1", "1", "model.name=tiny-gpt2")
    assert dup.returncode != 0 and "error: hostfile" in dup.stderr and "listed twice" in dup.stderr
    missing = run_script("launch/single_node.sh", "2", "--config", "/missing.yaml")
    assert missing.returncode != 0 and missing.stderr.strip() == "error: --config /missing.yaml: file not found"
    usage = run_script("launch/multi_node.sh")
    assert usage.returncode == 2 and "usage:" in usage.stderr


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_a_user_error_on_the_ranks_is_the_last_line(tmp_path):
    # resume_from=latest in an empty output_dir passes the launcher's checks and fails on each rank at start.
    result = run_script("launch/single_node.sh", "2", "model.name=tiny-gpt2", "resume_from=latest", f"output_dir={tmp_path}", env={"HF_TOKEN": "hf_do_not_show"})
    error = f"error: resume_from=latest: no complete checkpoint in {tmp_path / 'checkpoints'}"
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    assert result.stderr.strip().splitlines()[-1] == error
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
    import psutil

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
    # Rank 0 itself said it in one line, no gloo traceback (what plain torchrun shows).
    rank_0 = (out / "logs" / "rank_0.log").read_text()
    assert f"error: {RANK_LOST} (Connection closed by peer)" in rank_0 and "Traceback" not in rank_0
    assert processes_of(out) == [] and not psutil.Process().children(recursive=True)


def test_secrets_are_not_forwarded_to_the_hosts(tmp_path):
    env = {"PATH": "/usr/bin", "HF_TOKEN": "hf_secret", "AWS_SECRET_ACCESS_KEY": "aws_secret", "NCCL_DEBUG": "INFO", "HF_HOME": "/cache", "CUDA_VISIBLE_DEVICES": "0,1"}
    hosts = hostfile(tmp_path, "localhost\nnode-1\n")

    def launch(*train_args: str):
        return build_command(parse(["hostfile", "--hostfile", hosts, "--master_addr", "10.0.0.1", "--", *train_args]), env)

    forwarded = launch()
    assert forwarded.env == {"PATH": "/usr/bin", "NCCL_DEBUG": "INFO", "HF_HOME": "/cache", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert forwarded.held_back == ["AWS_SECRET_ACCESS_KEY", "HF_TOKEN"]
    local, remote = forwarded.nodes
    assert local.command[:1] == ["torchrun"] and not local.ssh and remote.ssh == ["ssh", "-o", "BatchMode=yes", "node-1"]
    assert "--node_rank=1" in remote.command[-1] and "NCCL_DEBUG=INFO" in remote.command[-1] and "secret" not in remote.command[-1]
    # Forwarding a secret is a choice written in the config.
    chosen = launch("launch.forward_env=[PATH,HF_TOKEN]")
    assert chosen.env == {"PATH": "/usr/bin", "HF_TOKEN": "hf_secret"} and chosen.held_back == ["AWS_SECRET_ACCESS_KEY", "CUDA_VISIBLE_DEVICES", "HF_HOME", "NCCL_DEBUG"]
    with pytest.raises(LaunchError, match="launch.forward_env: 'HF TOKEN' is not a variable name or glob"):
        (tmp_path / "env.yaml").write_text("launch:\n  forward_env: [PATH, HF TOKEN]\n")
        launch("--config", str(tmp_path / "env.yaml"))


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


def test_output_filter_keeps_the_ranks_tracebacks_and_drops_the_launchers():
    log = OutputFilter(first_rank=4)  # the agent of the second node of 4 ranks each
    rank_traceback = ["Traceback (most recent call last):\n", '  File "finetune/train.py", line 9, in <module>\n', "RuntimeError: a bug\n"]
    torchrun_report = [
        "E1125 17:31:18.641000 20616 torch/distributed/elastic/multiprocessing/api.py:869] failed (exitcode: -9) local_rank: 1 (pid: 1) of binary: python\n",
        "Traceback (most recent call last):\n", '  File "/venv/bin/torchrun", line 6, in <module>\n', "    sys.exit(main())\n",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n", "=" * 60 + "\n", "Root Cause (first observed failure):\n",
        "  exitcode  : -9 (pid: 1)\n", "=" * 60 + "\n",
    ]
    lost = f"error: {RANK_LOST} (Connection closed by peer): ...\n"
    shown = [out for line in rank_traceback + torchrun_report + [lost, "after\n"] for out in log.feed(line)] + log.finish()
    assert shown == rank_traceback + ["after\n"]
    assert log.failure == Failure(rank=5, code=137, signal_name="SIGKILL")  # local rank 1 of that node; SIGKILL as a shell reports it
    assert log.rank_lost == [lost]  # held: the launcher names the dead rank instead
    # On another node a survivor's torchrun may report its rank's exit 2 (the lost connection) first.
    assert root_cause([Failure(0, 2), log.failure, Failure(3, 143, "SIGTERM")]) == log.failure
    assert root_cause([Failure(0, 2), Failure(1, 1)]) == Failure(0, 2) and root_cause([]) is None
    # NCCL's watchdog aborts a rank whose collective timed out (it raises nothing in Python): the line says so.
    assert "NCCL's watchdog aborts a rank whose collective waited past launch.timeout_s" in death_line(Failure(3, 134, "SIGABRT"))
    assert death_line(Failure(None, 143, "SIGTERM")).startswith("error: a rank died (SIGTERM); the other ranks were stopped")


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_a_rank_stalled_in_a_tensor_parallel_collective_fails_the_other_in_time(tmp_path, instruction_file):
    # Rank 1 stops before step 1; rank 0 then waits inside a TP all-reduce (ColossalAI's sub-group, which
    # got torch's 30-minute default before launch.timeout_s was made the default of every group).
    args = ["--config", "booster_configs/tp2.yaml", "model.name=tiny-gpt2", "method=full", f"data.train_path={instruction_file}", "data.eval_fraction=0.25",
            "train.max_steps=2", "eval.num_generation_prompts=0", "launch.timeout_s=20", f"output_dir={tmp_path / 'run'}"]
    started = time.monotonic()
    # A session of its own: if the timeout does not work, the hung ranks are stopped with their launcher.
    with subprocess.Popen(launch_command("torchrun", 2) + args, cwd=REPO, env={**run_env(), "FINETUNE_FAULT": "stall_in_tp:1"},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
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


def test_the_group_timeout_patch_is_tied_to_its_torch_version():
    from datetime import timedelta

    from finetune.fixes.guard import UnsupportedVersion
    from finetune.fixes.torch import set_group_timeout

    with pytest.raises(UnsupportedVersion, match="sub-group timeouts for torch 2.5.1, found 2.6.0"):
        set_group_timeout(timedelta(seconds=20), torch_version="2.6.0")
