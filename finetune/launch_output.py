"""Run a launcher (`colossalai run`, torchrun) with its own reports filtered out of the output.

When a rank fails, torchrun prints its ChildFailedError traceback and report, and `colossalai run`
then prints "failed to run torchrun ... Command: 'cd ... && export K="v" ...'" (every environment
variable it forwarded, tokens included) and its node status lines. The ranks' own output, one `error:`
line for a user error, is what matters: it passes through unchanged and so comes last, and the exit
code is the failing rank's (torchrun's report names it), not the launcher's 1.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from typing import TextIO

_ELASTIC_LOG = re.compile(r"^[IWE]\d{4} [\d:.]+ \d+ \S*torch/distributed/elastic/")
_ROOT_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
_FAILED_EXIT = re.compile(r"failed \(exitcode: (-?\d+)\)")
_ENV_ECHO = re.compile(r"export \w+=.*")


class OutputFilter:
    """Line by line: drops the launchers' failure reports, keeps everything else, remembers the rank's exit code."""

    def __init__(self) -> None:
        self.exit_code: int | None = None
        self.node_status: list[str] = []  # colossalai run's closing status block: shown only on success
        self._held: list[str] = []  # a traceback whose origin is not known yet
        self._skip_until: str = ""  # what ends the report being dropped
        self._eat_blanks = False  # the blank lines that close it
        self._rulers_left = 0

    def feed(self, line: str) -> list[str]:
        """The lines to show for one line of launcher output."""
        body = line.rstrip("\n")
        if self.node_status or body.startswith("====== Training on All Nodes"):
            self.node_status.append(line)
            return []
        if self._rulers_left:  # inside torchrun's ChildFailedError report
            self._note_exit(_ROOT_EXIT.match(body))
            self._rulers_left -= bool(body) and set(body) == {"="}
            return []
        if self._skip_until:  # inside colossalai run's "failed to run" block
            if body.startswith(self._skip_until):
                self._skip_until, self._eat_blanks = "", True
            return []
        if self._eat_blanks and not body.strip():
            return []
        self._eat_blanks = False
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
            self._note_exit(_FAILED_EXIT.search(body))
            return []
        if "Error: failed to run" in body and "Encountered a bad command exit code" in body:
            self._skip_until = "Stderr:"  # the rest of that message: Command (the environment), Exit code, Stdout, Stderr
            return []
        return [_ENV_ECHO.sub("export ... (environment not shown)", line)]

    def finish(self) -> list[str]:
        """Lines still held at the end of the stream."""
        held, self._held = self._held, []
        return held

    def _note_exit(self, match: re.Match | None) -> None:
        if match and self.exit_code is None:
            code = int(match.group(1))
            self.exit_code = 128 - code if code < 0 else code  # a signal, as a shell reports it


def _pump(stream: TextIO, out: TextIO, log: OutputFilter, lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            shown = log.feed(line)
        out.writelines(shown)
        out.flush()
    with lock:
        out.writelines(log.finish())
    out.flush()


def run_filtered(command: list[str], env: dict[str, str], stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run command with env, its output filtered; return the failing rank's exit code (0 on success)."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    # Ctrl-C reaches the launcher through the terminal's process group; a scheduler's SIGTERM is passed on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: process.terminate())
    filters = OutputFilter(), OutputFilter()
    lock = threading.Lock()
    pumps = [threading.Thread(target=_pump, args=(pipe, out, f, lock)) for pipe, out, f in zip((process.stdout, process.stderr), (stdout, stderr), filters)]
    for pump in pumps:
        pump.start()
    for pump in pumps:
        pump.join()
    code = process.wait()
    if code == 0:
        stdout.writelines(filters[0].node_status)
        return 0
    ranks = [f.exit_code for f in filters if f.exit_code is not None]
    return ranks[0] if ranks else code
