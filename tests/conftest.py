"""Shared test helpers: small instruction fixtures and a runner for real (multi-process) training runs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Generator, Hashable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "finetune" / "train.py")
RUN_TIMEOUT_S = 420  # a hung collective must fail the test, not the whole CI run
SHARED_RUN_S = 150  # what one tiny run in a shared launch may take, on a loaded 2-core machine
# What a launcher tells a rank; left in this process's environment, every plain-python child run would join it.
RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def write_instruction_file(path: Path, n: int = 64) -> Path:
    """A small Alpaca-style JSONL file with a learnable pattern."""
    words = ["apple", "river", "stone", "cloud", "green", "seven", "table", "light"]
    with path.open("w") as f:
        for i in range(n):
            word = words[i % len(words)]
            record = {"instruction": f"Repeat the word {word} {i % 3 + 2} times.", "input": "", "output": " ".join([word] * (i % 3 + 2))}
            if i % 4 == 0:
                record["input"] = f"Example {i}"
            f.write(json.dumps(record) + "\n")
    return path


def write_fixed_length_file(path: Path, n: int = 64, words_per_output: int = 300) -> Path:
    """Instruction records longer than any data.max_length used in tests and benchmarks: truncation makes
    every sample exactly max_length tokens, so every batch has the same shape and no padding."""
    words = ["apple", "river", "stone", "cloud", "green", "seven", "table", "light"]
    with path.open("w") as f:
        for i in range(n):
            word = words[i % len(words)]
            f.write(json.dumps({"instruction": f"Repeat {word} {i}.", "input": "", "output": " ".join([word] * words_per_output)}) + "\n")
    return path


@pytest.fixture
def instruction_file(tmp_path: Path) -> Path:
    return write_instruction_file(tmp_path / "train.jsonl")


@pytest.fixture(scope="session")
def shared_instruction_file(tmp_path_factory) -> Path:
    """write_instruction_file's records at one path for the whole session, so that shared_runs can match runs on it."""
    return write_instruction_file(tmp_path_factory.mktemp("shared-data") / "train.jsonl")


def write_summarization_file(path: Path, n: int = 64) -> Path:
    """A small SAMSum-style JSON array (id, dialogue, summary) with a learnable pattern."""
    items = ["cake", "salad", "juice", "bread", "cheese", "fruit", "soup", "tea"]
    people = ["Anna", "Ben", "Carl", "Dora"]
    rows = []
    for i in range(n):
        a, b, item, hour = people[i % 4], people[(i + 1) % 4], items[i % 8], i % 5 + 3
        rows.append({"id": f"d{i}", "dialogue": f"{a}: I will bring the {item}.\n{b}: Great, see you at {hour}.", "summary": f"{a} brings the {item} at {hour}."})
    path.write_text(json.dumps(rows))
    return path


def write_classification_file(path: Path, n: int = 96) -> Path:
    """A small separable CSV (text, label): each text holds three words of its class and two shared fillers."""
    import csv
    import random

    words = {
        "sports": ["football", "tennis", "goal", "match", "team", "coach"],
        "food": ["pizza", "pasta", "bread", "cheese", "soup", "salad"],
        "weather": ["rain", "sunny", "cloud", "storm", "snow", "wind"],
    }
    filler = ["today", "really", "the", "was", "my", "friend", "said", "about", "again"]
    rng = random.Random(0)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(n):
            label = list(words)[i % 3]
            tokens = rng.sample(words[label], 3) + rng.sample(filler, 2)
            rng.shuffle(tokens)
            writer.writerow([" ".join(tokens), label])
    return path


PAIR_WORDS = ["the", "cat", "dog", "red", "blue", "sun", "one", "two"]


def write_pairs(path: Path, n: int = 40) -> Path:
    """Pairs whose chosen reply repeats the prompt's words and whose rejected one does not; plain and chat records alternate."""
    with path.open("w") as f:
        for i in range(n):
            a, b, c = PAIR_WORDS[i % 8], PAIR_WORDS[(i // 8 + i + 1) % 8], PAIR_WORDS[(3 * i + 2) % 8]
            prompt = {"prompt": f"Repeat: {a} {b} {c} ({i})\n"} if i % 2 else {"messages": [{"role": "user", "content": f"Repeat: {a} {b} {c} ({i})"}]}
            f.write(json.dumps({**prompt, "chosen": f"{a} {b} {c}", "rejected": " ".join([c] * (1 + i % 4))}) + "\n")
    return path


def write_fixed_length_pairs(path: Path, n: int = 64, reply_words: int = 24, prompt_words: int = 300) -> Path:
    """Preference pairs whose prompt is longer than any data.max_length used in tests: the prompt keeps its end, so every
    chosen and rejected row is exactly max_length tokens with reply_words label tokens (GPT-2's BPE: a word a token)."""
    words = ["apple", "river", "stone", "cloud", "green", "seven", "table", "light"]
    with path.open("w") as f:
        for i in range(n):
            a, b = words[i % len(words)], words[(i + 3) % len(words)]
            f.write(json.dumps({"prompt": " ".join([b] * prompt_words) + f" {i}\n", "chosen": " ".join([a] * reply_words), "rejected": " ".join([b] * reply_words)}) + "\n")
    return path


def hostfile(tmp_path, text: str) -> str:
    path = tmp_path / "hosts"
    path.write_text(text)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env() -> dict[str, str]:
    """Environment for child runs: the venv's launchers on PATH, one thread per rank, offline."""
    # make's own variables (MAKEOVERRIDES holds a literal '${...}') cannot pass through colossalai run; a
    # rendezvous left in this process's environment would make every plain-python child join it (one port).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES", *RENDEZVOUS)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def launch_command(launcher: str, nproc: int) -> list[str]:
    """The command line prefix for a launcher: python (one process), torchrun or colossalai run."""
    if launcher == "python":
        return [sys.executable, TRAIN]
    if launcher == "torchrun":
        return ["torchrun", f"--nproc_per_node={nproc}", f"--master_port={free_port()}", TRAIN]
    if launcher == "colossalai":
        return ["colossalai", "run", f"--nproc_per_node={nproc}", "--master_port", str(free_port()), TRAIN]
    raise ValueError(launcher)


def run_train(args: list[str], launcher: str = "python", nproc: int = 1, timeout: int = RUN_TIMEOUT_S, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run finetune/train.py for real and return the finished process (output captured); `env` adds variables.

    Runs by python or torchrun start from the session's zygote where they can (run_python)."""
    if launcher == "colossalai":
        return subprocess.run(launch_command(launcher, nproc) + args, cwd=REPO, env={**run_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout)
    return run_python([TRAIN, *args], env, timeout, ranks=nproc if launcher == "torchrun" else 0)


def run_python(argv: list[str], env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT_S, ranks: int = 0) -> subprocess.CompletedProcess:
    """`python ARGV...` (a script or -m MODULE), or with `ranks` its torchrun launch, in the repository with run_env()
    and `env`, stdin empty, output captured. From the session's zygote (tests/zygote.py: the same processes and
    process group, the stack imported once) unless the environment rules it out or FINETUNE_TEST_LAUNCH=real.
    Past `timeout` the launch's whole session is stopped (no rank left running) and TimeoutExpired raised."""
    environment = {**run_env(), **(env or {})}
    if zygote_can_run(environment):
        return zygote().run(argv, ranks or 1, bool(ranks), environment, timeout)
    launcher = ["torchrun", f"--nproc_per_node={ranks}", f"--master_port={free_port()}"] if ranks else [sys.executable]
    with subprocess.Popen([*launcher, *argv], cwd=REPO, env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_session(process.pid)
            stdout, stderr = process.communicate()
            raise subprocess.TimeoutExpired(process.args, timeout, stdout, stderr) from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


# Read by the stack when it is imported (huggingface_hub's offline switch, transformers' verbosity, torch's
# thread and allocator settings): a run that sets them differently cannot start from the zygote's imports.
IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE", "TRANSFORMERS_", "TORCH", "PYTORCH", "OMP_", "MKL_", "TOKENIZERS_", "CUDA", "PYTHON", "LD_", "MALLOC")


def zygote_can_run(environment: dict[str, str]) -> bool:
    """Whether a run with this environment may start from the zygote (and FINETUNE_TEST_LAUNCH is not `real`)."""
    if environment.get("FINETUNE_TEST_LAUNCH") == "real":
        return False
    reference = zygote().environment  # what the server imported the stack under
    return all(environment.get(key) == reference.get(key) for key in {*environment, *reference} if key.startswith(IMPORT_TIME_ENV))


class Zygote:
    """The client of tests/zygote.py: runs `python ARGV` or its torchrun equivalent from the pre-imported server."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.socket_path, self.count, self.environment = workdir, str(workdir / "zygote.sock"), 0, run_env()
        self.server = subprocess.Popen([sys.executable, str(REPO / "tests" / "zygote.py"), self.socket_path], cwd=REPO, env=self.environment, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while not os.path.exists(self.socket_path):
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tests/zygote.py did not start (exit code {self.server.poll()})")
            time.sleep(0.1)

    def run(self, argv: list[str], nproc: int, torchrun: bool, environment: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        """One run; its output captured; past `timeout` every rank is stopped and TimeoutExpired raised, as subprocess.run does."""
        self.count += 1
        stdout, stderr = (self.workdir / f"run_{self.count}.{kind}" for kind in ("out", "err"))
        request = {"argv": argv, "nproc": nproc, "torchrun": torchrun, "env": environment, "cwd": str(REPO), "stdout": str(stdout), "stderr": str(stderr)}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.connect(self.socket_path)
            connection.sendall(json.dumps(request).encode() + b"\n")
            replies = connection.makefile()
            launcher = json.loads(replies.readline())["pid"]
            connection.settimeout(timeout)
            try:
                returncode = json.loads(replies.readline())["returncode"]
            except (TimeoutError, socket.timeout):
                stop_session(launcher)
                raise subprocess.TimeoutExpired(argv, timeout, stdout.read_text(), stderr.read_text()) from None
        return subprocess.CompletedProcess(argv, returncode, stdout.read_text(), stderr.read_text())

    def close(self) -> None:
        self.server.kill()
        self.server.wait()


_zygote: Zygote | None = None


def zygote() -> Zygote:
    """This pytest process's zygote, started at first use (about 10 s) and stopped when the session ends."""
    global _zygote
    if _zygote is None:
        import tempfile

        _zygote = Zygote(Path(tempfile.mkdtemp(prefix="zygote-")))
    return _zygote


def leftover_children() -> list:
    """This process's descendants that a test left running: all but the zygote server and the runs it serves."""
    import psutil

    served = set()
    if _zygote is not None:
        server = psutil.Process(_zygote.server.pid)
        served = {server.pid, *(process.pid for process in server.children(recursive=True))}
    return [process for process in psutil.Process().children(recursive=True) if process.pid not in served]


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _zygote is not None:
        _zygote.close()


def stop_session(pid: int) -> None:
    """SIGTERM to a launcher's whole session (each rank prints its stacks), SIGKILL to what is left 30 s later."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and session_running(pid):
            time.sleep(0.2)
        os.killpg(pid, signal.SIGKILL)


def session_running(pid: int) -> bool:
    """Whether a process of session `pid` still runs. A zombie has ended: the caller's own child (a Popen not yet
    waited for) stays one until the caller waits, and still counts for killpg(pid, 0)."""
    import psutil

    for process in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == pid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
    return False


def run_many(runs: list[list[str]], nproc: int, workdir: Path, env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """Run finetune/train.py once per argument list, all of them in as few torchrun launches as can be
    (tests/run_many.py): each result as run_train's would be, its ranks' output in stdout and stderr (each rank's
    in workdir: run_I.rankR.out, .err and .rc, its exit code); `env` adds variables.

    A launch starts processes and imports ColossalAI once for all its runs. After a failed run the launch
    ends (its ranks may disagree on where they are), that run gets the failure, and a new launch takes the rest.
    """
    results: dict[int, subprocess.CompletedProcess] = {}
    pending = list(range(len(runs)))
    while pending:
        launch = workdir / f"launch_{pending[0]}"
        plan = [{"args": runs[i], "stem": str(workdir / f"run_{i}")} for i in pending]
        launch.with_suffix(".json").write_text(json.dumps(plan))
        code, output = torchrun_script([str(REPO / "tests" / "run_many.py"), str(launch.with_suffix(".json"))], nproc, RUN_TIMEOUT_S + SHARED_RUN_S * len(plan), env)
        for i in list(pending):
            stem = workdir / f"run_{i}"
            codes = [read_or_none(Path(f"{stem}.rank{rank}.rc")) for rank in range(nproc)]
            finished = None not in codes
            failed = [int(c) for c in codes if c not in (None, "0")]
            returncode = max(failed) if failed else 0 if finished else (code or 1)  # or how the launch ended
            out, err = ("".join(read_or_none(Path(f"{stem}.rank{rank}.{kind}")) or "" for rank in range(nproc)) for kind in ("out", "err"))
            results[i] = subprocess.CompletedProcess(runs[i], returncode, out, err if finished and not failed else err + output)
            pending.remove(i)
            if not finished or failed:
                break  # the runs after it go to a new launch
    return [results[i] for i in range(len(runs))]


def run_grouped(runs: dict[Hashable, tuple[int, list[str]]], workdir: Path) -> dict[Hashable, subprocess.CompletedProcess]:
    """run_many for runs of several process counts, {name: (nproc, args)}: one group of launches per count."""
    results = {}
    for nproc in sorted({n for n, _ in runs.values()}):
        names = [name for name, (n, _) in runs.items() if n == nproc]
        group = workdir / f"nproc_{nproc}"
        group.mkdir(parents=True, exist_ok=True)
        results.update(zip(names, run_many([runs[name][1] for name in names], nproc, group)))
    return results


# Uninterrupted runs shared by the session (shared_runs): (process count, arguments but output_dir) -> (output dir, result)
_shared: dict[tuple[int, tuple[str, ...]], tuple[Path, subprocess.CompletedProcess]] = {}


def shared_runs(runs: dict[str, tuple[int, list[str]]], workdir: Path) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """run_grouped for the uninterrupted runs that tests compare against, {name: (nproc, args)}: each name's (output
    dir, result). A run that the session ran before (same process count, same arguments but output_dir) is not run
    again: its first output dir serves, so callers only read it (a resume works on a copy). Data files must be the
    same path to match (the session's `shared_instruction_file`)."""

    def key(nproc: int, args: list[str]) -> tuple[int, tuple[str, ...]]:
        return nproc, tuple(arg for arg in args if not arg.startswith("output_dir="))

    missing = {key(*run): run for run in runs.values() if key(*run) not in _shared}
    for run_key, result in run_grouped(missing, workdir).items():
        _shared[run_key] = Path(next(arg for arg in missing[run_key][1] if arg.startswith("output_dir=")).split("=", 1)[1]), result
    return {name: _shared[key(*run)] for name, run in runs.items()}


def selected_params(request: pytest.FixtureRequest, test: str, param: str | None = "case") -> list:
    """The values of `param` (or the ids, for None) of the selected items of `test`, in order: what a module's shared launches must run."""
    return [item.callspec.params[param] if param else item.nodeid for item in request.session.items if item.originalname == test]


def read_or_none(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def torchrun_script(argv: list[str], nproc: int, timeout: int, env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """`torchrun --nproc_per_node=NPROC ARGV...` (run_python, `env` added): its exit code (None past `timeout`) and its output."""
    try:
        result = run_python(argv, env, timeout=timeout, ranks=nproc)
        return result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as stopped:
        return None, f"{stopped.stdout}{stopped.stderr}\nkilled after {timeout}s"


def read_summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "summary.json").read_text())


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def run_fresh_python(code: str, timeout: int = 120) -> str:
    """Run code in a new interpreter and return its stdout. Memory tests need this: after other tests
    have freed models, the allocator can serve a new block from memory it already holds, so RSS
    would not move."""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


TIERS = ("unit", "e2e", "distributed")  # each a marker (pytest.ini) and a folder, tests/<tier>/


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test not marked e2e (it launches the CLI or a subprocess) or distributed (several ranks) is a unit test."""
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(pytest.mark.unit)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """A file holding a test outside its tier's folder fails to collect, naming the test and its folder: `pytest
    tests/unit` must run exactly the unit tier (a collection error, so that pytest-xdist's workers report it too)."""
    report = yield
    if report.passed:
        misplaced = [problem for item in report.result if isinstance(item, pytest.Item) and (problem := tier_problem(item))]
        if misplaced:
            report.outcome, report.longrepr, report.result = "failed", "\n".join(misplaced), []
    return report


def tier_problem(item: pytest.Item) -> str | None:
    """Why this test is in the wrong folder for its tier marker (tests/unit, tests/e2e, tests/distributed), or None."""
    marked = [tier for tier in TIERS if item.get_closest_marker(tier)]
    if len(marked) > 1:
        return f"{item.nodeid} is marked {' and '.join(marked)}: a test belongs to one tier"
    tier = marked[0] if marked else "unit"
    if tier_folder(item.path) != tier:
        why = f"marked {tier}" if marked else "a unit test (not marked e2e or distributed)"
        return f"{item.nodeid} is {why}: it belongs in tests/{tier}/"
    return None


def tier_folder(path: Path) -> str | None:
    """The tier whose folder holds this test file (tests/<tier>/...), or None."""
    tests = REPO / "tests"
    parts = path.resolve().relative_to(tests).parts if path.resolve().is_relative_to(tests) else ()
    return parts[0] if len(parts) > 1 and parts[0] in TIERS else None


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker gets one core: torch's own threads would make two workers fight over both."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
