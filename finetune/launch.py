"""Launch finetune/train.py on one node, on the hosts of a hostfile, or under Slurm, after checking inputs.

    python -m finetune.launch single   --nproc_per_node 2 -- --config my_run.yaml train.max_steps=10
    python -m finetune.launch hostfile --hostfile hosts.txt --master_addr 10.0.0.1 --nproc_per_node 8 -- --config my_run.yaml
    python -m finetune.launch slurm    --nproc_per_node 8 -- --config my_run.yaml     # inside an sbatch job

The first two run ColossalAI's own launcher (`colossalai run`, which starts torchrun on every host, over
SSH for remote ones); the third builds the torchrun rendezvous command every Slurm task runs. Each checks
what it can before anything starts: the files exist, hosts are unique, the port is free, torchrun is on
PATH, the config parses, and no argument would be changed by the shell `colossalai run` passes it through.
It prints the command, then runs it with only the environment `launch.forward_env` allows (colossalai run
writes every variable it gets into each host's command line), its output filtered so that the ranks' own
lines come last and the environment is never echoed, and exits with the ranks' exit code.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import FinetuneError
from finetune.launch_output import run_filtered

if TYPE_CHECKING:
    from finetune.config import Config

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


@dataclass
class Launch:
    """A checked launch: the command, the environment it runs with, and the variables held back from it."""

    command: list[str]
    env: dict[str, str]
    held_back: list[str] = field(default_factory=list)


def check_train_args(train_args: list[str], world_size: int) -> Config:
    """Parse and validate the training config now, so a typo fails here and not on every node; return it."""
    from finetune.config import ConfigError, load_config

    try:
        return load_config(train_args, world_size=world_size, has_cuda=_has_cuda())
    except ConfigError as err:
        raise LaunchError(str(err)) from None


# Characters a shell leaves alone in a word. `[` and `]` are glob characters, but a list such as
# [q_proj,v_proj] only changes if a file of a matching one-letter name exists: accepted, it is the list syntax.
_SHELL_SAFE = re.compile(r"^[A-Za-z0-9_@%+=:,./\[\]-]+$")


def check_shell_safe(train_args: list[str]) -> None:
    """Refuse arguments the shell on every host would change: `colossalai run` joins them with spaces."""
    for arg in train_args:
        if _SHELL_SAFE.match(arg):
            continue
        if not arg:
            raise LaunchError("an empty argument would vanish in the shell on every host (colossalai run joins the arguments with spaces); drop it, or write key= for an empty value")
        bad = sorted({c for c in arg if not _SHELL_SAFE.match(c)})
        key, sep, value = arg.partition("=")
        compact = re.sub(r"\s*,\s*", ",", value)
        if sep and value.startswith("[") and value.endswith("]") and _SHELL_SAFE.match(compact):
            fix = f"write the list without spaces: {key}={compact}"
        else:
            fix = "put such values (paths with spaces, ...) in a --config FILE, whose values reach the ranks unchanged"
        shown = ", ".join(repr(c) if c != " " else "a space" for c in bad)
        raise LaunchError(f"argument '{arg}' holds {shown}, which the shell on every host would change (colossalai run joins the arguments with spaces); {fix}")


def forwarded_environment(env: dict[str, str], patterns: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split env into what launch.forward_env lets colossalai run export to the hosts and the names held back."""
    allowed = {k: v for k, v in env.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    return allowed, sorted(k for k in env if k not in allowed)


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


def build_command(args: argparse.Namespace, env: dict[str, str]) -> Launch:
    """Validate a launch request and return the command that carries it out, with its environment."""
    if args.nproc_per_node < 1:
        raise LaunchError(f"--nproc_per_node must be at least 1, got {args.nproc_per_node}")
    require_torchrun()
    if args.mode == "slurm":
        command = slurm_torchrun_command(env, args.nproc_per_node, args.train_args)
        check_train_args(args.train_args, int(env["SLURM_NNODES"]) * args.nproc_per_node)
        return Launch(command, env)  # srun hands the environment over itself, not on a command line
    nodes = 1
    if args.mode == "hostfile":
        if not args.hostfile or not args.master_addr:
            raise LaunchError("hostfile mode needs --hostfile FILE and --master_addr ADDRESS (an address of the first host that the others reach)")
        nodes = len(read_hostfile(args.hostfile))
    local_master = args.mode == "single" or args.master_addr in ("127.0.0.1", "localhost", socket.gethostname())
    if local_master and not port_is_free(args.master_port):
        raise LaunchError(f"port {args.master_port} is in use on this machine: pass another --master_port")
    check_shell_safe(args.train_args)
    cfg = check_train_args(args.train_args, nodes * args.nproc_per_node)
    forwarded, held_back = forwarded_environment(env, cfg.launch.forward_env)
    bad = unforwardable_environment(forwarded)
    if bad:
        raise LaunchError(f"colossalai run cannot forward the environment variable(s) {', '.join(bad)} (their values hold $, `, \" or \\); unset them for the launch or leave them out of launch.forward_env")
    command = colossalai_run_command(args.nproc_per_node, args.master_port, args.train_args, args.hostfile, args.master_addr)
    return Launch(command, forwarded, held_back)


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
        launch = build_command(args, dict(os.environ))
    except LaunchError as err:
        sys.exit(f"error: {err}")
    print(" ".join(launch.command), flush=True)
    if launch.held_back:
        print(f"not forwarded to the hosts (not in launch.forward_env): {', '.join(launch.held_back)}", flush=True)
    if not args.dry_run:
        os.chdir(REPO)
        # Slurm's --signal reaches every process of the step: the launcher must outlive the ranks'
        # checkpoint, and an ignored signal stays ignored in the launcher it starts. The ranks set
        # their own handler (finetune.preemption).
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        sys.exit(run_filtered(launch.command, launch.env))


if __name__ == "__main__":
    main(sys.argv[1:])
