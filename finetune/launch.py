"""Launch finetune/train.py on one node, on the hosts of a hostfile, or under Slurm, after checking inputs.

    python -m finetune.launch single   --nproc_per_node 2 -- --config my_run.yaml train.max_steps=10
    python -m finetune.launch hostfile --hostfile hosts.txt --master_addr 10.0.0.1 --nproc_per_node 8 -- --config my_run.yaml
    python -m finetune.launch slurm    --nproc_per_node 8 -- --config my_run.yaml     # inside an sbatch job

The first two run ColossalAI's own launcher (`colossalai run`, which starts torchrun on every host, over
SSH for remote ones); the third builds the torchrun rendezvous command every Slurm task runs. Each checks
what it can before anything starts: the files exist, hosts are unique, the port is free, torchrun is on
PATH, and the config parses. It prints the command, then replaces itself with it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

from finetune.errors import FinetuneError

REPO = Path(__file__).resolve().parents[1]
TRAIN = "finetune/train.py"


class LaunchError(FinetuneError):
    """A launch that cannot work, said in one line."""


def read_hostfile(path: str) -> list[str]:
    """Hosts of a hostfile, one per line, checked: present, non-empty, no comments, ports or duplicates.

    `colossalai run` reads every non-empty line as a host name, so anything else on a line would
    become a host it tries to reach over SSH.
    """
    file = Path(path)
    if not file.is_file():
        raise LaunchError(f"hostfile not found: {path}")
    hosts = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        host = line.strip()
        if not host:
            continue
        if host.startswith("#") or any(c.isspace() for c in host):
            raise LaunchError(f"hostfile {path} line {number}: '{host}' is not a host; one host name or address per line, no comments")
        if host.count(":") == 1:
            raise LaunchError(f"hostfile {path} line {number}: '{host}' carries a port; list hosts only (SSH port: colossalai run --ssh-port)")
        if host in hosts:
            raise LaunchError(f"hostfile {path} line {number}: host '{host}' is listed twice; list each node once (processes per node: --nproc_per_node)")
        hosts.append(host)
    if not hosts:
        raise LaunchError(f"hostfile {path} lists no hosts")
    return hosts


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on host:port here (only meaningful when this machine is the master)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_train_args(train_args: list[str], world_size: int) -> None:
    """Parse and validate the training config now, so a typo fails here and not on every node."""
    from finetune.config import ConfigError, load_config

    try:
        load_config(train_args, world_size=world_size, has_cuda=_has_cuda())
    except ConfigError as err:
        raise LaunchError(str(err)) from None


def _has_cuda() -> bool:
    return shutil.which("nvidia-smi") is not None


def require_torchrun() -> None:
    """colossalai run and Slurm tasks start `torchrun` by name."""
    if shutil.which("torchrun") is None:
        raise LaunchError("torchrun is not on PATH: activate the virtual environment (source .venv/bin/activate); remote hosts need it on their PATH too")


def unforwardable_environment(env: dict[str, str]) -> list[str]:
    """Variables colossalai run would break on: it re-exports every single-line variable inside double
    quotes of a shell command, where `$`, a backtick, `"` or `\\` change or end the value."""
    return sorted(k for k, v in env.items() if v and "\n" not in v and any(c in v for c in '$`"\\'))


def colossalai_run_command(nproc_per_node: int, master_port: int, train_args: list[str], hostfile: str = "", master_addr: str = "") -> list[str]:
    """`colossalai run` for one node, or for every host of a hostfile."""
    command = ["colossalai", "run", "--nproc_per_node", str(nproc_per_node), "--master_port", str(master_port)]
    if hostfile:
        command += ["--hostfile", hostfile, "--master_addr", master_addr]
    return command + [TRAIN, *train_args]


def slurm_torchrun_command(env: dict[str, str], nproc_per_node: int, train_args: list[str]) -> list[str]:
    """The torchrun command each Slurm task (one per node) runs: a c10d rendezvous at the first node."""
    missing = [k for k in ("SLURM_JOB_ID", "SLURM_NNODES", "MASTER_ADDR") if not env.get(k)]
    if missing:
        raise LaunchError(f"not inside a Slurm job set up by launch/slurm.sbatch: {', '.join(missing)} unset")
    port = env.get("MASTER_PORT", "29500")
    return [
        "torchrun",
        f"--nnodes={env['SLURM_NNODES']}",
        f"--nproc_per_node={nproc_per_node}",
        f"--rdzv_id={env['SLURM_JOB_ID']}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={env['MASTER_ADDR']}:{port}",
        TRAIN,
        *train_args,
    ]


def build_command(args: argparse.Namespace, env: dict[str, str]) -> list[str]:
    """Validate a launch request and return the command that carries it out."""
    if args.nproc_per_node < 1:
        raise LaunchError(f"--nproc_per_node must be at least 1, got {args.nproc_per_node}")
    require_torchrun()
    if args.mode == "slurm":
        command = slurm_torchrun_command(env, args.nproc_per_node, args.train_args)
        check_train_args(args.train_args, int(env["SLURM_NNODES"]) * args.nproc_per_node)
        return command
    nodes = 1
    if args.mode == "hostfile":
        if not args.hostfile or not args.master_addr:
            raise LaunchError("hostfile mode needs --hostfile FILE and --master_addr ADDRESS (an address of the first host that the others reach)")
        nodes = len(read_hostfile(args.hostfile))
    local_master = args.mode == "single" or args.master_addr in ("127.0.0.1", "localhost", socket.gethostname())
    if local_master and not port_is_free(args.master_port):
        raise LaunchError(f"port {args.master_port} is in use on this machine: pass another --master_port")
    check_train_args(args.train_args, nodes * args.nproc_per_node)
    bad = unforwardable_environment(env)
    if bad:
        raise LaunchError(f"colossalai run cannot forward the environment variable(s) {', '.join(bad)} (their values hold $, `, \" or \\); unset them for the launch")
    return colossalai_run_command(args.nproc_per_node, args.master_port, args.train_args, args.hostfile, args.master_addr)


def parse(argv: list[str]) -> argparse.Namespace:
    """Launcher options, then `--`, then the training script's own arguments."""
    ours, train_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m finetune.launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["single", "hostfile", "slurm"])
    parser.add_argument("--nproc_per_node", type=int, default=1, help="processes (GPUs) per node")
    parser.add_argument("--hostfile", default="", help="hostfile mode: one host per line")
    parser.add_argument("--master_addr", default="", help="hostfile mode: address of the first host, reachable from all")
    parser.add_argument("--master_port", type=int, default=29500)
    parser.add_argument("--dry_run", action="store_true", help="check and print the command, do not run it")
    args = parser.parse_args(ours)
    args.train_args = train_args
    return args


def main(argv: list[str]) -> None:
    args = parse(argv)
    try:
        command = build_command(args, dict(os.environ))
    except LaunchError as err:
        sys.exit(f"error: {err}")
    print(" ".join(command), flush=True)
    if not args.dry_run:
        os.chdir(REPO)
        # Slurm's --signal reaches every process of the step: the launcher (torchrun, after exec) must
        # outlive the ranks' checkpoint, and an ignored signal stays ignored across exec. The ranks set
        # their own handler (finetune.preemption).
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
