"""Launching: hostfile checks, the commands built for one node / a hostfile / Slurm, the launch/
scripts, and a real 2-"node" run through `colossalai run --hostfile` on this machine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from finetune.launch import LaunchError, build_command, parse, read_hostfile, slurm_torchrun_command
from finetune.launch_output import OutputFilter
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
    ],
)
def test_bad_hostfiles(tmp_path, text, message):
    with pytest.raises(LaunchError, match=message):
        read_hostfile(hostfile(tmp_path, text))
    with pytest.raises(LaunchError, match="hostfile not found"):
        read_hostfile(str(tmp_path / "missing"))


def test_single_node_command(tmp_path):
    port = free_port()
    args = parse(["single", "--nproc_per_node", "2", "--master_port", str(port), "--", "model.name=tiny-gpt2", "train.max_steps=3"])
    assert build_command(args, {}).command == ["colossalai", "run", "--nproc_per_node", "2", "--master_port", str(port), "finetune/train.py", "model.name=tiny-gpt2", "train.max_steps=3"]


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


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_valid_bash(script):
    assert subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True).returncode == 0


def run_script(*args: str, port: int | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**run_env(), **(env or {})}
    env["MASTER_PORT"] = str(port or free_port())
    return subprocess.run(["bash", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=420)


def test_scripts_explain_bad_input(tmp_path):
    dup = run_script("launch/multi_node.sh", hostfile(tmp_path, "a\na\n"), "127.0.0.1", "1", "model.name=tiny-gpt2")
    assert dup.returncode != 0 and "error: hostfile" in dup.stderr and "listed twice" in dup.stderr
    missing = run_script("launch/single_node.sh", "2", "--config", "/missing.yaml")
    assert missing.returncode != 0 and missing.stderr.strip() == "error: --config /missing.yaml: file not found"
    usage = run_script("launch/multi_node.sh")
    assert usage.returncode == 2 and "usage:" in usage.stderr


@pytest.mark.timeout(300)
def test_a_user_error_on_the_ranks_is_the_last_line(tmp_path):
    # resume_from=latest in an empty output_dir passes the launcher's checks and fails on each rank at start.
    result = run_script("launch/single_node.sh", "2", "model.name=tiny-gpt2", "resume_from=latest", f"output_dir={tmp_path}", env={"HF_TOKEN": "hf_do_not_show"})
    error = f"error: resume_from=latest: no complete checkpoint in {tmp_path / 'checkpoints'}"
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    assert result.stderr.strip().splitlines()[-1] == error
    output = result.stdout + result.stderr
    assert "export " not in output and "hf_do_not_show" not in output and "ChildFailedError" not in output
    assert "not forwarded to the hosts (not in launch.forward_env): " in result.stdout and "HF_TOKEN" in result.stdout


@pytest.mark.timeout(600)
def test_two_node_launch_through_a_hostfile(tmp_path, instruction_file):
    # Two "nodes" on this machine: colossalai run starts hosts named localhost / 127.0.0.1 without SSH.
    hosts = hostfile(tmp_path, "localhost\n127.0.0.1\n")
    out = tmp_path / "run"
    result = run_script(
        "launch/multi_node.sh", hosts, "127.0.0.1", "1",
        "model.name=tiny-gpt2", "method=full", f"data.train_path={instruction_file}", "data.eval_fraction=0.25",
        "train.max_steps=3", "eval.num_generation_prompts=0", f"output_dir={out}",
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "localhost: success" in result.stdout and "127.0.0.1: success" in result.stdout
    summary = read_summary(out)
    assert summary["world_size"] == 2
    assert summary["checks"]["replicas_identical"] and len(summary["checks"]["replica_digests"]) == 2
    assert (out / "logs" / "rank_0.log").is_file() and (out / "logs" / "rank_1.log").is_file()
    assert "eval before training" in (out / "logs" / "rank_0.log").read_text()


def test_environment_colossalai_run_cannot_forward():
    # make exports MAKEOVERRIDES='${-*-command-variables-*-}'; colossalai run's shell export then fails.
    env = {"MAKEOVERRIDES": "${-*-command-variables-*-}", "PATH": "/usr/bin", "EMPTY": "", "MULTI": "a\n$b"}
    with pytest.raises(LaunchError, match="cannot forward the environment variable\\(s\\) MAKEOVERRIDES "):
        build_command(parse(["single", "--master_port", str(free_port()), "--", "launch.forward_env=[PATH,MAKEOVERRIDES]"]), env)
    # Not in launch.forward_env (the default): held back, so it cannot break the export.
    assert "MAKEOVERRIDES" in build_command(parse(["single", "--master_port", str(free_port())]), env).held_back


def test_secrets_are_not_forwarded_to_the_hosts(tmp_path):
    env = {"PATH": "/usr/bin", "HF_TOKEN": "hf_secret", "AWS_SECRET_ACCESS_KEY": "aws_secret", "NCCL_DEBUG": "INFO", "HF_HOME": "/cache", "CUDA_VISIBLE_DEVICES": "0,1"}
    launch = build_command(parse(["single", "--master_port", str(free_port())]), env)
    assert launch.env == {"PATH": "/usr/bin", "NCCL_DEBUG": "INFO", "HF_HOME": "/cache", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert launch.held_back == ["AWS_SECRET_ACCESS_KEY", "HF_TOKEN"]
    assert "hf_secret" not in " ".join(launch.command)
    # Forwarding a secret is a choice written in the config.
    chosen = build_command(parse(["single", "--master_port", str(free_port()), "--", "launch.forward_env=[PATH,HF_TOKEN]"]), env)
    assert chosen.env == {"PATH": "/usr/bin", "HF_TOKEN": "hf_secret"} and chosen.held_back == ["AWS_SECRET_ACCESS_KEY", "CUDA_VISIBLE_DEVICES", "HF_HOME", "NCCL_DEBUG"]
    with pytest.raises(LaunchError, match="launch.forward_env: 'HF TOKEN' is not a variable name or glob"):
        (tmp_path / "env.yaml").write_text("launch:\n  forward_env: [PATH, HF TOKEN]\n")
        build_command(parse(["single", "--master_port", str(free_port()), "--", "--config", str(tmp_path / "env.yaml")]), env)


CONFIG_FILE = "put such values .* in a --config FILE"


@pytest.mark.parametrize(
    "arg, named, fix",
    [
        ("lora.target_modules=[q_proj, v_proj]", "a space", "write the list without spaces: lora.target_modules=\\[q_proj,v_proj\\]"),
        ("output_dir=/data/my runs", "a space", CONFIG_FILE),
        ("output_dir=/tmp/x;touch /tmp/pwned", "a space, ';'", CONFIG_FILE),
        ("output_dir=$(id)", "'\\$', '\\(', '\\)'", CONFIG_FILE),
        ("output_dir=`id`", "'`'", CONFIG_FILE),
        ("output_dir=/tmp/*", "'\\*'", CONFIG_FILE),
        ("model.name=a|b", "'\\|'", CONFIG_FILE),
        ("model.name=a&", "'&'", CONFIG_FILE),
        ("model.name=a>b", "'>'", CONFIG_FILE),
        ("model.name='a'", "\"'\"", CONFIG_FILE),
        ("output_dir=~/runs", "'~'", CONFIG_FILE),
        ("lora.target_modules={q,v}", "'\\{', '\\}'", CONFIG_FILE),
        ("launch.forward_env=[PATH, HF HOME]", "a space", CONFIG_FILE),
    ],
)
def test_arguments_a_shell_would_change_are_refused(arg, named, fix):
    with pytest.raises(LaunchError, match=f"^argument '.*' holds {named}, which the shell on every host would change .*; {fix}"):
        build_command(parse(["single", "--master_port", str(free_port()), "--", "model.name=tiny-gpt2", arg]), {})
    with pytest.raises(LaunchError, match="an empty argument would vanish .*; drop it, or write key= for an empty value"):
        build_command(parse(["single", "--master_port", str(free_port()), "--", "model.name=tiny-gpt2", ""]), {})
    # The spelling that works passes.
    build_command(parse(["single", "--master_port", str(free_port()), "--", "lora.target_modules=[c_attn]", "output_dir=/tmp/a_b-1.x", "model.name=tiny-gpt2"]), {})


def test_output_filter_keeps_the_ranks_tracebacks_and_drops_the_launchers():
    log = OutputFilter()
    rank_traceback = ["Traceback (most recent call last):\n", '  File "finetune/train.py", line 9, in <module>\n', "RuntimeError: a bug\n"]
    torchrun_report = [
        "E1125 17:31:18.641000 20616 torch/distributed/elastic/multiprocessing/api.py:869] failed (exitcode: -9) local_rank: 1 (pid: 1) of binary: python\n",
        "Traceback (most recent call last):\n", '  File "/venv/bin/torchrun", line 6, in <module>\n', "    sys.exit(main())\n",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n", "=" * 60 + "\n", "Root Cause (first observed failure):\n",
        "  exitcode  : -9 (pid: 1)\n", "=" * 60 + "\n",
    ]
    shown = [out for line in rank_traceback + torchrun_report + ["after\n"] for out in log.feed(line)] + log.finish()
    assert shown == rank_traceback + ["after\n"]
    assert log.exit_code == 137  # SIGKILL, as a shell reports it


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

    from finetune.patches import PatchError, set_group_timeout

    with pytest.raises(PatchError, match="sub-group timeouts for torch 2.5.1, found 2.6.0"):
        set_group_timeout(timedelta(seconds=20), torch_version="2.6.0")
