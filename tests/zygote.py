"""A launcher for the tests' training runs that imports torch, transformers, peft and ColossalAI once.

    python tests/zygote.py SOCKET      # tests/conftest.py starts it, one per pytest process

Starting a run costs 7-10 s before its first line of our code runs (torchrun and every rank import the
stack), more than a tiny run's training. This server imports the stack once, then serves each request by
forking: a launcher process that does what torchrun does (a rank process each, with torchrun's rank
variables, rank 0 hosting the rendezvous store; when one rank fails the others get SIGTERM, then SIGKILL
30 s later; exit 1 if any rank failed), or what `python SCRIPT` does for one process. Each rank then runs
the script as __main__ with the request's arguments, environment, working directory and output files. The
ranks are real processes with their own gloo process group; only the import is shared.

What it cannot stand in for, tests run for real: the launchers themselves (torchrun's and ColossalAI's
command lines, our launcher, signals sent to a launcher), and anything that changes a library's
import-time settings (conftest sends such runs to a real launch; see zygote_can_run there).

Protocol, one connection a request: the client sends one JSON line {"argv", "nproc", "torchrun", "env",
"cwd", "stdout", "stderr"}; the server answers {"pid": the launcher's pid (its own session: killpg stops
every rank)} and, when the run has ended, {"returncode": ...}.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import signal
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STARTUP_PATH = list(sys.path)  # sys.path as the interpreter set it, before preload() added the repository
STOP_GRACE_S = 30  # torchrun's: SIGTERM to the other ranks, SIGKILL after this long


def preload() -> None:
    """Import what every run imports (finetune first: its fixes package must precede ColossalAI's import)."""
    sys.path.insert(0, str(REPO))
    import finetune.train  # noqa: F401
    import colossalai.booster  # noqa: F401
    import peft  # noqa: F401
    from transformers import GPT2LMHeadModel, LlamaForCausalLM, RobertaForSequenceClassification  # noqa: F401
    import matplotlib

    matplotlib.use("Agg")  # as finetune/outputs.py does before it plots
    import matplotlib.pyplot  # noqa: F401

    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:  # a fork copies only the calling thread: a lock another thread held would stay taken
        raise SystemExit(f"zygote: {threads} threads after the imports; forking would not be safe")


def run_script(argv: list[str]) -> int:
    """Run `python ARGV...` in this process (ARGV[0] a script, or -m MODULE); its exit code."""
    code = 0
    # sys.path[0] as the interpreter sets it: the script's folder, or for -m the working directory
    sys.path[:] = [os.getcwd() if argv[0] == "-m" else str(Path(argv[0]).resolve().parent), *STARTUP_PATH[1:]]
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback on stderr, exit 1
        import traceback

        traceback.print_exc()
        code = 1
    return code


def start_rank(request: dict, rank_env: dict[str, str], out: int, err: int, connection: socket.socket) -> int:
    """Fork one rank: the request's environment and files, then the script; the child's pid."""
    pid = os.fork()
    if pid:
        return pid
    connection.close()  # the client's connection is the launcher's: it ends when the launcher does
    os.dup2(out, 1), os.dup2(err, 2)
    os.close(out), os.close(err)
    os.environ.clear()
    os.environ.update(request["env"], **rank_env)
    os.chdir(request["cwd"])
    code = run_script(request["argv"])
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)


def torchrun_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    """The variables torchrun gives each rank of a one-node run."""
    return {
        "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank), "ROLE_NAME": "default",
        "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "ROLE_WORLD_SIZE": str(nproc), "GROUP_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "zygote",
        "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_all(pids: set[int]) -> bool:
    """Wait for every rank; when one fails, stop the others as torchrun does. Whether all succeeded."""
    failed_at = None
    while pids:
        pid, status = os.waitpid(-1, os.WNOHANG if failed_at else 0)
        if pid:
            pids.discard(pid)
            if os.waitstatus_to_exitcode(status) != 0 and failed_at is None:
                failed_at = time.monotonic()
                for other in pids:
                    os.kill(other, signal.SIGTERM)
        elif time.monotonic() - failed_at > STOP_GRACE_S:
            for other in pids:
                os.kill(other, signal.SIGKILL)
        else:
            time.sleep(0.05)
    return failed_at is None


def serve_one(request: dict, connection: socket.socket) -> None:
    """The launcher process: its own session, the ranks, then the run's exit code to the client."""
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the server ignores it; this process waits for its ranks
    connection.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    out, err = os.open(request["stdout"], flags), os.open(request["stderr"], flags)
    if request["torchrun"]:
        port = free_port()
        ranks = {start_rank(request, torchrun_env(rank, request["nproc"], port), out, err, connection) for rank in range(request["nproc"])}
        returncode = 0 if wait_all(ranks) else 1
    else:
        _, status = os.waitpid(start_rank(request, {}, out, err, connection), 0)
        returncode = os.waitstatus_to_exitcode(status)
    connection.sendall(json.dumps({"returncode": returncode}).encode() + b"\n")


def main(path: str) -> None:
    preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # launchers are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    server.listen(16)
    os.rename(path + ".tmp", path)  # the client waits for this name: it appears when the server listens
    while True:
        connection, _ = server.accept()
        request = json.loads(connection.makefile().readline())
        if os.fork() == 0:
            server.close()
            try:
                serve_one(request, connection)
            finally:
                os._exit(0)
        connection.close()


if __name__ == "__main__":
    main(sys.argv[1])
