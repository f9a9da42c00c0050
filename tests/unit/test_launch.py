"""Launching, in process: hostfile checks, the commands built for one node / a hostfile / Slurm, what the
launcher forwards to the hosts and how it filters the ranks' output."""

from __future__ import annotations

import socket
import subprocess

import pytest

from finetune.errors import RANK_LOST
from finetune.launch import LaunchError, build_command, parse, read_hostfile, slurm_torchrun_command
from finetune.launch_output import Failure, OutputFilter, death_line, root_cause
from tests.conftest import REPO, free_port, hostfile, run_env


@pytest.fixture(autouse=True)
def venv_on_path(monkeypatch):
    """The launchers look for torchrun on PATH, as they would in an activated environment."""
    monkeypatch.setenv("PATH", run_env()["PATH"])


def test_torchrun_must_be_on_path(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(LaunchError, match="torchrun is not on PATH"):
        build_command(parse(["single"]), {})


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


# Runs a launch/ script: for the e2e and distributed tests (tests/e2e/test_launch.py, tests/distributed/test_launch.py).
def run_script(*args: str, port: int | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**run_env(), **(env or {})}
    env["MASTER_PORT"] = str(port or free_port())
    return subprocess.run(["bash", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=420)


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


def test_the_group_timeout_patch_is_tied_to_its_torch_version():
    from datetime import timedelta

    from finetune.fixes.guard import UnsupportedVersion
    from finetune.fixes.torch import set_group_timeout

    with pytest.raises(UnsupportedVersion, match="sub-group timeouts for torch 2.5.1, found 2.6.0"):
        set_group_timeout(timedelta(seconds=20), torch_version="2.6.0")


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_user_error_is_said_once_and_an_other_ranks_own_one_names_it(monkeypatch, capsys, rank):
    """Rank 0 says a user error at once; rank 1 first waits for rank 0 to say it (the launcher stops rank 1 if it
    does), and still running, says its own with its rank: an error only rank 1 met is never lost."""
    from finetune import train
    from finetune.errors import FinetuneError

    def refuse(argv):
        raise FinetuneError("output_dir: something only this rank saw")

    monkeypatch.setattr(train, "main", refuse)
    monkeypatch.setattr(train, "RANK_EXIT_GRACE_S", 0)
    monkeypatch.setenv("RANK", rank)
    assert train.run_main([]) == 2
    said = "error" if rank == "0" else "error (rank 1)"
    assert capsys.readouterr().err == f"{said}: output_dir: something only this rank saw\n"
