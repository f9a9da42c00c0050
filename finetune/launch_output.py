"""Run the torchrun agents of a launch (one per node), pass stop signals on to every rank, filter their output.

No shell is involved here: each agent is started from an argument list (a remote one through ssh, whose
command finetune.launch quotes word by word), in a session of its own, so a terminal's Ctrl-C reaches
only this launcher, which decides what the ranks get:

- SIGTERM or SIGINT: SIGTERM to every rank (torchrun's children), which finish their step, checkpoint and
  exit 3 (finetune.preemption); torchrun reports that code, and this launcher exits with it. Whatever is
  still running STOP_GRACE_S later, or at a second signal, is killed. An agent that fails stops the
  others the same way.
- Whatever is left when the agents have exited (a rank its torchrun left behind) is killed: this
  process is the child subreaper of everything it started, so orphans stay its descendants.

Output: the ranks' own lines pass through unchanged and so come last; torchrun's ChildFailedError
traceback and report are dropped. When a rank died of a signal (killed, out of memory), the survivors'
"lost the connection" lines are replaced by one line naming the dead rank; the exit code is the failing
rank's (as a shell reports it: 128 + signal), not torchrun's 1.
"""

from __future__ import annotations

import ctypes
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

import psutil

from finetune.errors import RANK_LOST

# From the stop signal to the kill: the step in flight and a checkpoint, which for a large model's optimizer
# state takes minutes. (Once the first rank has exited, torchrun gives the others 30 s: they write the
# checkpoint together, so by then they are done too.) A second signal kills at once.
STOP_GRACE_S = 300.0
REMOTE_PID = "finetune.launch: torchrun pid "  # the first line a remote agent prints (finetune.launch.remote_command)

_ELASTIC_LOG = re.compile(r"^[IWE]\d{4} [\d:.]+ \d+ \S*torch/distributed/elastic/")
_ROOT_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
_FAILED_EXIT = re.compile(r"failed \(exitcode: (-?\d+)\)(?: local_rank: (\d+))?")


@dataclass
class Node:
    """One torchrun agent: its command and, for a remote host, the ssh command prefix that reaches the host."""

    command: list[str]
    first_rank: int = 0  # global rank of its local rank 0
    ssh: list[str] = field(default_factory=list)  # empty: runs on this machine


@dataclass
class Failure:
    """A rank failure torchrun reported: global rank (when known), exit code as a shell gives it, the signal's name."""

    rank: int | None
    code: int
    signal_name: str = ""
    at: float = field(default_factory=time.monotonic, compare=False)  # when this launcher read it


class OutputFilter:
    """Line by line: drops torchrun's failure report, keeps everything else, remembers the first failure."""

    def __init__(self, first_rank: int = 0) -> None:
        self.first_rank = first_rank
        self.failure: Failure | None = None
        self.remote_pid: int | None = None
        self.rank_lost: list[str] = []  # the survivors' "lost the connection" lines, held back
        self._held: list[str] = []  # a traceback whose origin is not known yet
        self._rulers_left = 0

    def feed(self, line: str) -> list[str]:
        """The lines to show for one line of launcher output."""
        body = line.rstrip("\n")
        if self._rulers_left:  # inside torchrun's ChildFailedError report
            if match := _ROOT_EXIT.match(body):
                self._note_failure(int(match.group(1)), None)
            self._rulers_left -= bool(body) and set(body) == {"="}
            return []
        if self._held:
            self._held.append(line)
            if "bin/torchrun" in body or "torch/distributed/run.py" in body:
                self._held, self._rulers_left = [], 2
                return []
            held, self._held = self._held, []
            return held
        if body.startswith("Traceback (most recent call last):"):
            self._held = [line]
            return []
        if _ELASTIC_LOG.match(body):
            if match := _FAILED_EXIT.search(body):
                self._note_failure(int(match.group(1)), match.group(2))
            return []
        if body.startswith(REMOTE_PID) and self.remote_pid is None:
            self.remote_pid = int(body[len(REMOTE_PID) :])
            return []
        if body.startswith(f"error: {RANK_LOST}"):
            self.rank_lost.append(line)
            return []
        return [line]

    def finish(self) -> list[str]:
        """Lines still held at the end of the stream."""
        held, self._held = self._held, []
        return held

    def _note_failure(self, code: int, local_rank: str | None) -> None:
        if self.failure is not None:
            return
        name = signal.Signals(-code).name if code < 0 and -code in signal.valid_signals() else ""
        rank = self.first_rank + int(local_rank) if local_rank is not None else None
        self.failure = Failure(rank, 128 - code if code < 0 else code, name)


# What a signal that ended a rank usually means, where it says more than its name.
SIGNAL_CAUSES = {
    "SIGKILL": "killed by hand or by the out-of-memory killer",
    # torch 2.5's NCCL watchdog (TORCH_NCCL_ASYNC_ERROR_HANDLING) aborts the process instead of raising in Python.
    "SIGABRT": "aborted; on GPUs NCCL's watchdog aborts a rank whose collective waited past launch.timeout_s, its log says which",
}


def death_line(failure: Failure) -> str:
    """The one line for a rank that died of a signal."""
    rank = f"rank {failure.rank}" if failure.rank is not None else "a rank"
    cause = SIGNAL_CAUSES.get(failure.signal_name)
    return (f"error: {rank} died ({failure.signal_name}{', ' + cause if cause else ''}); the other ranks were stopped: "
            "resume_from=latest continues from the last complete checkpoint")


def root_cause(failures: list[Failure]) -> Failure | None:
    """The failure to report: the first rank that died of a signal (the others then failed on the lost
    connection, on other nodes perhaps before its torchrun said so), else the first to fail."""
    return min(failures, key=lambda f: (not f.signal_name, f.at), default=None)


class _Stop:
    """The stop signals this launcher received (SIGTERM, SIGINT), counted by its handler."""

    def __init__(self) -> None:
        self.count = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._request)

    def _request(self, signum, frame) -> None:
        self.count += 1


def _become_subreaper() -> None:
    """Make orphaned descendants (ranks whose torchrun died) children of this process, so it can end them."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


class Agent:
    """One started Node: its process, its output filters, and the ranks signalled so far."""

    def __init__(self, node: Node, env: dict[str, str]) -> None:
        self.node = node
        self.process = subprocess.Popen(
            node.command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True
        )  # no stdin: ssh would read the terminal's
        self.filters = OutputFilter(node.first_rank), OutputFilter(node.first_rank)
        self._signalled: set[int] = set()

    def running(self) -> bool:
        """Whether its torchrun (or the ssh that carries it) is still running."""
        return self.process.poll() is None

    def stop_ranks(self) -> None:
        """SIGTERM to its ranks not signalled yet (to torchrun itself while it has none, which then ends them)."""
        if not self.running():  # its pid may be another process's by now
            return
        if self.node.ssh:
            if not self._signalled and self.filters[0].remote_pid:
                pid = self.filters[0].remote_pid
                self._signalled.add(pid)
                self._ssh(f"pkill -TERM -P {pid} || kill -TERM {pid}")
            return
        try:
            torchrun = psutil.Process(self.process.pid)
            ranks = torchrun.children()
        except psutil.NoSuchProcess:
            return
        for process in ranks if ranks or self._signalled else [torchrun]:
            if process.pid not in self._signalled:
                self._signalled.add(process.pid)
                _signal(process, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to a remote host's torchrun and ranks (the local ones end with the launcher's descendants)."""
        pid = self.filters[0].remote_pid
        if self.node.ssh and pid and self.running():
            self._ssh(f"pkill -KILL -P {pid}; kill -KILL {pid}")

    def _ssh(self, command: str) -> None:
        try:
            subprocess.run([*self.node.ssh, command], stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        except subprocess.TimeoutExpired:
            pass  # the host does not answer: its agent ends when the connection does


def _signal(process: psutil.Process, sig: int) -> None:
    try:
        process.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


def _kill_descendants() -> None:
    """SIGKILL every process this launcher started, and theirs (orphans included: it is their subreaper)."""
    for process in psutil.Process().children(recursive=True):
        _signal(process, signal.SIGKILL)


def _pump(stream: TextIO, out: TextIO, log: OutputFilter, lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            shown = log.feed(line)
        out.writelines(shown)
        out.flush()
    with lock:
        out.writelines(log.finish())
    out.flush()


def run_nodes(nodes: list[Node], env: dict[str, str], stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run every node's agent with env until all have ended; return the failing rank's exit code (0 on success)."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    _become_subreaper()
    stop = _Stop()
    agents = [Agent(node, env) for node in nodes]
    lock = threading.Lock()
    pumps = [
        threading.Thread(target=_pump, args=(pipe, out, log, lock), daemon=True)
        for agent in agents
        for pipe, out, log in zip((agent.process.stdout, agent.process.stderr), (stdout, stderr), agent.filters)
    ]
    for pump in pumps:
        pump.start()
    stopped_at, killed = None, False
    while any(agent.running() for agent in agents):
        failed = any(agent.process.returncode not in (None, 0) for agent in agents)
        if stop.count or failed:
            stopped_at = stopped_at or time.monotonic()
            for agent in agents:
                agent.stop_ranks()  # again each round: ranks torchrun started after the first round
        if stopped_at and not killed and (stop.count > 1 or time.monotonic() - stopped_at > STOP_GRACE_S):
            killed = True
            for agent in agents:
                agent.kill()
            _kill_descendants()
        time.sleep(0.2)
    _kill_descendants()  # ranks their torchrun left behind: they would hold the output pipes open
    for pump in pumps:
        pump.join(timeout=10)
    codes = [agent.process.returncode for agent in agents]
    if not any(codes):
        return 0
    filters = [log for agent in agents for log in agent.filters]
    failure = root_cause([log.failure for log in filters if log.failure])
    if failure and failure.signal_name and not stop.count:
        print(death_line(failure), file=stderr, flush=True)
    elif not failure:
        lost = [line for log in filters for line in log.rank_lost]
        stderr.writelines(lost[:1])  # the survivors say the same: one line
    code = next(code for code in codes if code)
    return failure.code if failure else 128 - code if code < 0 else code  # a signal, as a shell reports it
