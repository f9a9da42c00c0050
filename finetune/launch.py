"""Launch finetune/train.py on one node, on the hosts of a hostfile, or under Slurm, after checking inputs.

    python -m finetune.launch single   --nproc_per_node 2 -- --config my_run.yaml train.max_steps=10
    python -m finetune.launch hostfile --hostfile hosts.txt --master_addr 10.0.0.1 --nproc_per_node 8 -- --config my_run.yaml
    python -m finetune.launch slurm    --nproc_per_node 8 -- --config my_run.yaml     # inside an sbatch job

Each starts torchrun itself, from an argument list, never through a local shell: one agent here for
`single`, one per host for `hostfile` (a host named localhost or 127.0.0.1 here, any other over ssh, its
command quoted word by word for the remote shell), the c10d rendezvous every Slurm task runs for `slurm`.
So every argument reaches finetune/train.py verbatim, `$(...)` and `;` included (`colossalai run` joins
the arguments into a shell command line, where they run). Each checks what it can before anything
starts: the files exist, hosts are unique, the port is free, torchrun is on PATH, the config parses.
It prints the commands, runs them (a hostfile's hosts with only the environment `launch.forward_env`
allows), passes SIGTERM / SIGINT on to every rank, leaves no process behind, filters the output so
that the ranks' own lines come last, and exits with the ranks' exit code (finetune.launch_output).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shlex
import shutil
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import FinetuneError
from finetune.launch_output import REMOTE_PID, Node, run_nodes

if TYPE_CHECKING:
    from finetune.config import Config

REPO = Path(__file__).resolve().parents[1]
TRAIN = "finetune/train.py"


class LaunchError(FinetuneError):
    """A launch that cannot work, said in one line."""


def read_hostfile(path: str) -> list[str]:
    """Hosts of a hostfile, one per line, checked: present, non-empty, no comments, ports or duplicates.

    Every non-empty line is a host name (as for `colossalai run`), so anything else on a line would
    become a host to reach over SSH.
    """
    file = Path(path)
    if not file.is_file():
        raise LaunchError(f"hostfile not found: {path}")
    hosts = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        host = line.strip()
        if not host:
            continue
        if host.startswith(("#", "-")) or any(c.isspace() for c in host):  # "-": ssh would read it as an option
            raise LaunchError(f"hostfile {path} line {number}: '{host}' is not a host; one host name or address per line, no comments")
        if host.count(":") == 1:
            raise LaunchError(f"hostfile {path} line {number}: '{host}' carries a port; list hosts only (an SSH port goes into ~/.ssh/config)")
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


@dataclass
class Launch:
    """A checked launch: a torchrun agent per node, the environment they run with, the variables held back."""

    nodes: list[Node]
    env: dict[str, str]
    held_back: list[str] = field(default_factory=list)


def check_train_args(train_args: list[str], world_size: int) -> Config:
    """Parse and validate the training config now, so a typo fails here and not on every node; return it."""
    from finetune.config import ConfigError, load_config

    try:
        return load_config(train_args, world_size=world_size, has_cuda=_has_cuda())
    except ConfigError as err:
        raise LaunchError(str(err)) from None


def forwarded_environment(env: dict[str, str], patterns: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split env into what launch.forward_env lets the launcher pass to every host and the names held back."""
    allowed = {k: v for k, v in env.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    return allowed, sorted(k for k in env if k not in allowed)


def _has_cuda() -> bool:
    return shutil.which("nvidia-smi") is not None


def require_torchrun() -> None:
    """The launcher and Slurm tasks start `torchrun` by name."""
    if shutil.which("torchrun") is None:
        raise LaunchError("torchrun is not on PATH: activate the virtual environment (source .venv/bin/activate); remote hosts need it on their PATH too")


def torchrun_command(nproc_per_node: int, master_port: int, train_args: list[str], nnodes: int = 1, node_rank: int = 0, master_addr: str = "127.0.0.1") -> list[str]:
    """The torchrun command of one node (static rendezvous at master_addr:master_port)."""
    return [
        "torchrun",
        f"--nproc_per_node={nproc_per_node}",
        f"--nnodes={nnodes}",
        f"--node_rank={node_rank}",
        f"--master_addr={master_addr}",
        f"--master_port={master_port}",
        TRAIN,
        *train_args,
    ]


LOCAL_HOSTS = ("localhost", "127.0.0.1")  # started here without SSH, as colossalai run does


def ssh_prefix(host: str) -> list[str]:
    """How the launcher reaches a remote host: ssh without a password prompt (port, user: ~/.ssh/config)."""
    return ["ssh", "-o", "BatchMode=yes", host]


def remote_command(command: list[str], env: dict[str, str]) -> str:
    """The one string ssh hands to the remote host's shell: every word quoted, so it reaches torchrun verbatim.

    ssh always passes its command through the remote user's shell, so quoting each word is the only way
    to keep `$(...)`, `;`, spaces or quotes in an argument or a variable from being run or split there.
    The shell prints its pid (which `exec` gives to torchrun) first: the launcher stops its ranks by it.
    """
    settings = [f"{name}={value}" for name, value in env.items()]
    return f"cd {shlex.quote(str(REPO))} && echo {shlex.quote(REMOTE_PID)}$$ && exec {shlex.join(['env', *settings, *command])}"


def hostfile_nodes(hosts: list[str], nproc_per_node: int, master_addr: str, master_port: int, train_args: list[str], env: dict[str, str]) -> list[Node]:
    """One torchrun agent per host: started here for a local host, through ssh for the others."""
    nodes = []
    for rank, host in enumerate(hosts):
        command = torchrun_command(nproc_per_node, master_port, train_args, len(hosts), rank, master_addr)
        if host in LOCAL_HOSTS:
            nodes.append(Node(command, rank * nproc_per_node))
        else:
            nodes.append(Node([*ssh_prefix(host), remote_command(command, env)], rank * nproc_per_node, ssh_prefix(host)))
    return nodes


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


def build_command(args: argparse.Namespace, env: dict[str, str]) -> Launch:
    """Validate a launch request and return the torchrun agents that carry it out, with their environment."""
    if args.nproc_per_node < 1:
        raise LaunchError(f"--nproc_per_node must be at least 1, got {args.nproc_per_node}")
    require_torchrun()
    if args.mode == "slurm":
        command = slurm_torchrun_command(env, args.nproc_per_node, args.train_args)
        check_train_args(args.train_args, int(env["SLURM_NNODES"]) * args.nproc_per_node)
        return Launch([Node(command)], env)  # srun hands the environment over itself, not on a command line
    if args.mode == "single":
        if not port_is_free(args.master_port):
            raise LaunchError(f"port {args.master_port} is in use on this machine: pass another --master_port")
        check_train_args(args.train_args, args.nproc_per_node)
        return Launch([Node(torchrun_command(args.nproc_per_node, args.master_port, args.train_args))], env)  # a child's environment, on no command line
    if not args.hostfile or not args.master_addr:
        raise LaunchError("hostfile mode needs --hostfile FILE and --master_addr ADDRESS (an address of the first host that the others reach)")
    hosts = read_hostfile(args.hostfile)
    if args.master_addr in (*LOCAL_HOSTS, socket.gethostname()) and not port_is_free(args.master_port):
        raise LaunchError(f"port {args.master_port} is in use on this machine: pass another --master_port")
    cfg = check_train_args(args.train_args, len(hosts) * args.nproc_per_node)
    # The same environment on every host; a remote host gets it on its command line (visible in its process list).
    forwarded, held_back = forwarded_environment(env, cfg.launch.forward_env)
    return Launch(hostfile_nodes(hosts, args.nproc_per_node, args.master_addr, args.master_port, args.train_args, forwarded), forwarded, held_back)


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
    """Check the launch, print its commands, run them; exit with the ranks' code (2 for bad input)."""
    args = parse(argv)
    try:
        launch = build_command(args, dict(os.environ))
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)  # bad input, as for finetune/train.py
    for node in launch.nodes:
        print(shlex.join(node.command), flush=True)
    if launch.held_back:
        print(f"not forwarded to the hosts (not in launch.forward_env): {', '.join(launch.held_back)}", flush=True)
    if not args.dry_run:
        os.chdir(REPO)
        # Slurm's --signal reaches every process of the step: the launcher must outlive the ranks'
        # checkpoint, and an ignored signal stays ignored in the torchrun it starts. The ranks set
        # their own handler (finetune.preemption).
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        sys.exit(run_nodes(launch.nodes, launch.env))


if __name__ == "__main__":
    main(sys.argv[1:])
