"""The docs cannot drift: every command shown in README.md and docs/*.md is checked against the code.

Fenced shell blocks and inline code spans that start with one of this project's commands are parsed the
way the command would parse them, and nothing heavy runs: `python finetune/train.py`, `launch/*.sh` and
`sbatch launch/slurm.sbatch` lines go through the config parser and validation for the world size they
would get (finetune.config, as the launcher's own pre-flight check does), `python -m finetune.estimate`
through the estimator's request parser, every other `python -m finetune.X` / `python bench/X.py` through
its own argparse parser only, `make X` against the Makefile. YAML config blocks are read like a
`--config` file. Repository paths named anywhere must exist, relative links must resolve (anchors
included), and the configuration table must list exactly the config keys there are.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import inspect
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

from finetune import config, launch
from finetune.errors import FinetuneError
from finetune.parallel import PLUGINS
from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")
PROJECT_PROGRAMS = ("python", "python3", "make", "sbatch")
REPO_DIRS = ("finetune", "tests", "bench", "launch", "booster_configs", "docs")

# Doc commands this test cannot check by parsing, with the reason. Matched on the command's first word(s).
UNCHECKED = {
    "torchrun": "torchrun's own command line, shown as what the launcher builds (tests/unit/test_launch.py checks those lines)",
    "colossalai run": "shown as what not to use",
    "tensorboard": "a third-party tool reading the run's output",
    "huggingface-cli": "a third-party tool (hub login)",
    "rm": "a plain shell command on the user's own run directory",
}
# A usage synopsis (`python -m finetune.report RUN_DIR [RUN_DIR ...] [--out DIR]`) has placeholders
# instead of values: only its program and its --flags are checked, not its values.
SYNOPSIS = re.compile(r"\b[A-Z][A-Z_]*(\.\w+)?\b(?!=)|(?<![=\w])\[-|\.\.\.|<[^>]+>|\|")
PLACEHOLDER_WORLD = {"N": 2}  # `launch/single_node.sh N ...` in a synopsis
HOSTFILE_HOSTS = 2  # a hostfile a doc names but the repository does not hold counts as this many hosts
# The reader's own `--config my_run.yaml` (model and data) is not in the repository; it stands in as a
# random-init Llama, whose heads the docs' layouts (tp2, tp2_pp2) divide, as a real Llama's do.
READER_CONFIG = ["model.name=tiny-llama"]


class DocError(AssertionError):
    """A doc command or link that does not match the code."""


@dataclass(frozen=True)
class Command:
    """One command as a doc shows it."""

    doc: str
    line: int
    text: str
    synopsis: bool = False
    inline: bool = False  # an inline code span in prose: the program alone only names it

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


# --------------------------------------------------------------------- extraction


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of every fenced block."""
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        fence = re.match(r"^\s*```(\w*)\s*$", line)
        if fence and lang is None:
            lang, start, body = fence.group(1), number + 1, []
        elif fence:
            blocks.append((lang, start, body))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def _is_project_command(text: str) -> bool:
    """python/make/sbatch or a launch script first (`launch/` alone, in a file tree, is a directory)."""
    program = text.split(" ", 1)[0]
    return program in PROJECT_PROGRAMS or (program.startswith("launch/") and program.endswith((".sh", ".sbatch")))


def _unchecked_reason(text: str) -> str | None:
    return next((reason for prefix, reason in UNCHECKED.items() if text == prefix or text.startswith(prefix + " ")), None)


def shell_commands(doc: Path) -> list[Command]:
    """Every command in the doc's fenced shell blocks (a `$ ` prompt or a project command; `\\` lines joined)."""
    name, commands = doc.relative_to(REPO).as_posix(), []
    for lang, start, body in fenced_blocks(doc.read_text()):
        if lang not in SHELL_BLOCKS:
            continue
        joined, first = "", 0
        for offset, line in enumerate(body):
            prompted, text = line.strip().startswith("$ "), line.strip().removeprefix("$ ")
            if joined:
                text = f"{joined} {text}"
            elif prompted or _is_project_command(text) or (lang and text and not text.startswith("#")):
                first = start + offset  # in a block marked bash/sh every line but a comment is a command
            else:
                continue  # output shown after a command, or a comment
            joined = text[:-1].strip() if text.endswith("\\") else ""
            if not joined:
                commands.append(Command(name, first, text))
    return commands


def inline_commands(doc: Path) -> list[Command]:
    """Inline code spans in prose that are a project command with arguments (`python ...`, `make X`, `launch/x.sh ...`).

    A span may wrap onto the next line of its paragraph; fenced blocks are blanked out first (their lines kept).
    """
    name, commands = doc.relative_to(REPO).as_posix(), []
    prose = re.sub(r"```.*?```", lambda block: "\n" * block.group(0).count("\n"), doc.read_text(), flags=re.S)
    for match in re.finditer(r"`([^`]+)`", prose):
        span = " ".join(match.group(1).split())
        if " " in span and (_is_project_command(span) or _unchecked_reason(span)):
            number = prose.count("\n", 0, match.start()) + 1
            commands.append(Command(name, number, span, synopsis=bool(SYNOPSIS.search(span)), inline=True))
    return commands


def all_commands() -> list[Command]:
    """Every command the docs show, fenced and inline."""
    return [c for doc in DOCS for c in (*shell_commands(doc), *inline_commands(doc))]


# --------------------------------------------------------------------- checks per command


def _words(command: Command) -> list[str]:
    try:
        return shlex.split(command.text, comments=True)
    except ValueError as err:
        raise DocError(f"{command.where}: not a valid shell line ({err})") from None


def _repo_path_missing(word: str) -> bool:
    """A word that names a path inside this repository (booster_configs/x.yaml, bench/run.py) that is not there."""
    path = word.split("=", 1)[1] if "=" in word and not word.startswith("-") else word
    if not path.startswith(tuple(d + "/" for d in REPO_DIRS)):
        return False
    return not any(REPO.glob(path)) if "*" in path else not (REPO / path).exists()


def _user_paths(args: list[str]) -> set[str]:
    """Values of key=value settings that are paths the reader supplies (/data/train.jsonl, alpaca.jsonl): absent here by design."""
    paths = set()
    for arg in args:
        value = arg.partition("=")[2]
        for item in re.split(r"[\[\],]", value):
            if item and ("/" in item or item.endswith((".jsonl", ".json", ".csv", ".parquet", ".gguf"))) and not (REPO / item).exists():
                paths.add(item)
    return paths


def check_train_args(command: Command, args: list[str], world_size: int) -> config.Config:
    """Parse and validate train.py arguments as a run of this world size would, on CPU or on a GPU machine.

    A `--config` file the repository does not hold is the reader's own (`my_run.yaml`): READER_CONFIG
    stands in for it; a problem that names a path the reader supplies (`model.name=/models/...`) is not the doc's.
    """
    kept, args_iter = [], iter(args)
    for arg in args_iter:
        if arg == "--config":
            path = next(args_iter, "")
            if (REPO / path).is_file():  # a repository path that is missing failed before (check_command)
                kept += ["--config", str(REPO / path)]
            else:
                kept += READER_CONFIG
        else:
            kept.append(arg)
    try:
        cfg = config.build_config(config.parse_args(kept))
    except config.ConfigError as err:
        raise DocError(f"{command.where}: {err}") from None
    user = _user_paths(args)
    outcomes = [[p for p in config.validate(cfg, world_size, has_cuda) if not any(u in p for u in user)] for has_cuda in (False, True)]
    if all(outcomes):
        raise DocError(f"{command.where}: {outcomes[0][0]}")
    return cfg


class _Parsed(BaseException):
    """Raised from inside a CLI's parse_args: the arguments parsed, stop before any work."""

    def __init__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace | None):
        super().__init__()
        self.parser, self.namespace = parser, namespace


class _Rejected(BaseException):
    """argparse refused the arguments (a BaseException other than SystemExit, which some mains catch)."""


def parse_only(entry, argv: list[str], parse: bool = True) -> _Parsed:
    """Run a CLI entry point until its ArgumentParser.parse_args, then stop: (parser, namespace); parse=False stops before parsing."""
    original = argparse.ArgumentParser.parse_args

    def intercept(self, args=None, namespace=None):
        if not parse:
            raise _Parsed(self, None)
        try:
            parsed = original(self, args, namespace)
        except SystemExit as exit:
            raise _Rejected(exit.code) from None
        raise _Parsed(self, parsed)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", intercept), mock.patch.object(sys, "argv", ["prog", *argv]), mock.patch.object(argparse.ArgumentParser, "print_usage"), mock.patch.object(argparse.ArgumentParser, "print_help"):
        try:
            entry(argv) if inspect.signature(entry).parameters else entry()
        except _Parsed as parsed:
            return parsed
    raise AssertionError(f"{entry} returned without parsing its arguments")


@functools.cache
def _script(path: str):
    """A bench/ script imported as a module (its main() not run)."""
    spec = importlib.util.spec_from_file_location(f"docs_check_{Path(path).stem}", REPO / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


def check_cli(command: Command, entry, args: list[str]) -> argparse.Namespace | None:
    """The CLI's own argparse parser accepts args (a synopsis: it knows every --flag named)."""
    if command.synopsis:
        parser = parse_only(entry, [], parse=False).parser
        flags = [w.strip("[]").split("=")[0] for w in args if w.strip("[]").startswith("-") and w != "--"]
        unknown = [f for f in flags if f not in parser._option_string_actions]
        if unknown:
            raise DocError(f"{command.where}: {', '.join(unknown)} not an option of its parser")
        return None
    try:
        return parse_only(entry, args).namespace
    except _Rejected:
        raise DocError(f"{command.where}: rejected by its argument parser") from None


def check_make(command: Command, words: list[str]) -> None:
    """`make TARGET [VAR=value]`: the target exists and every variable is one the Makefile reads."""
    text = (REPO / "Makefile").read_text()
    for word in words[1:]:
        var, eq, _ = word.partition("=")
        if eq and not re.search(rf"^{re.escape(var)}\s*\??=", text, re.M):
            raise DocError(f"{command.where}: the Makefile has no variable {var}")
        if not eq and not re.search(rf"^{re.escape(word)}:", text, re.M):
            raise DocError(f"{command.where}: the Makefile has no target {word}")


def _slurm_gpus_per_node() -> int:
    return int(re.search(r"GPUS_PER_NODE:-(\d+)", (REPO / "launch" / "slurm.sbatch").read_text()).group(1))


def _world(command: Command, word: str) -> int:
    if word in PLACEHOLDER_WORLD and command.synopsis:
        return PLACEHOLDER_WORLD[word]
    if not word.isdigit():
        raise DocError(f"{command.where}: {word!r} is not a process count")
    return int(word)


def check_launch_script(command: Command, words: list[str]) -> None:
    """launch/single_node.sh N ..., launch/multi_node.sh HOSTFILE ADDR N ...: the launcher's options, then the training args for that world."""
    script, rest = words[0], words[1:]
    if not rest:
        return  # the script named alone
    if script == "launch/single_node.sh":
        nproc, train_args = _world(command, rest[0]), rest[1:]
        call_parser(command, launch.parse, ["single", "--nproc_per_node", str(nproc), "--", *train_args])
        world = nproc
    elif script == "launch/multi_node.sh":
        hostfile, addr, nproc, train_args = rest[0], rest[1], _world(command, rest[2]), rest[3:]
        call_parser(command, launch.parse, ["hostfile", "--hostfile", hostfile, "--master_addr", addr, "--nproc_per_node", str(nproc), "--", *train_args])
        hosts = len(launch.read_hostfile(str(REPO / hostfile))) if (REPO / hostfile).is_file() else HOSTFILE_HOSTS
        world = hosts * nproc
    else:
        raise DocError(f"{command.where}: no such launch script")
    if not SYNOPSIS.search(" ".join(train_args)):
        check_train_args(command, train_args, world)


def check_sbatch(command: Command, words: list[str]) -> None:
    """sbatch [--nodes=K ...] launch/slurm.sbatch ARGS: the training args for K nodes x the script's GPUS_PER_NODE."""
    script = next((i for i, w in enumerate(words) if not w.startswith("-") and i > 0), None)
    if script is None or words[script] != "launch/slurm.sbatch":
        raise DocError(f"{command.where}: sbatch of something other than launch/slurm.sbatch")
    nodes = next((int(w.split("=")[1]) for w in words[1:script] if w.startswith("--nodes=")), 1)
    check_train_args(command, words[script + 1 :], nodes * _slurm_gpus_per_node())


# The CLIs whose argument checks go beyond parse_args (export: OUT_DIR or --gguf): their own parse function, called whole.
PARSE_FUNCTIONS = {"finetune.export": "parse_cli", "finetune.launch": "parse"}


def call_parser(command: Command, parse, argv: list[str]) -> argparse.Namespace:
    """A CLI's own parse function (parsing only, by its contract) on argv; its usage error is the doc's error."""
    try:
        return parse(argv)
    except SystemExit:
        raise DocError(f"{command.where}: rejected by its argument parser") from None


def check_python(command: Command, words: list[str]) -> None:
    """python finetune/train.py ..., python -m finetune.X ..., python bench/X.py ..."""
    if words[1] == "-m":
        module_name, args = words[2], words[3:]
        if not module_name.startswith("finetune."):
            raise DocError(f"{command.where}: not a module of this project")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            raise DocError(f"{command.where}: no module {module_name}") from None
        if command.inline and not args:
            return  # the program named in prose
        if module_name == "finetune.estimate":
            check_estimate(command, importlib.import_module("finetune.estimate.cli"), args)
        elif module_name in PARSE_FUNCTIONS and not command.synopsis:
            call_parser(command, getattr(module, PARSE_FUNCTIONS[module_name]), args)
        else:
            namespace = check_cli(command, module.main, args)
            for name in (getattr(namespace, "only", "") or "").split(",") if module_name == "finetune.gpu_check" else []:
                if name and not (REPO / "booster_configs" / name).is_file():
                    raise DocError(f"{command.where}: no booster_configs/{name}")
        return
    script, args = words[1], words[2:]
    if not (REPO / script).is_file():
        raise DocError(f"{command.where}: no file {script}")
    if script == "finetune/train.py":
        if "--help" in args or "-h" in args:
            assert config.help_text()  # train.py prints it
        elif not command.synopsis:
            check_train_args(command, args, world_size=1)
    elif script.startswith("bench/"):
        namespace = check_cli(command, _script(script).main, args)
        if script == "bench/run.py" and namespace is not None:
            bench = _script(script)
            cases = {case.name for case in (*bench.plugin_cases([], 2), *bench.method_cases([], 2))}
            unknown = sorted(set(filter(None, namespace.only.split(","))) - cases)
            if unknown:
                raise DocError(f"{command.where}: bench/run.py has no case {', '.join(unknown)}")
    else:
        raise DocError(f"{command.where}: not a command this test knows how to check: add it")


def check_estimate(command: Command, module, args: list[str]) -> None:
    """python -m finetune.estimate ARGS [--fit GiB] [--json]: the estimator's own request parser and checks."""
    if command.synopsis or not args:
        return
    try:
        rest, _ = module._fit_flag([a for a in args if a != "--json"])
        module.parse_request(rest)
    except FinetuneError as err:
        raise DocError(f"{command.where}: {err}") from None


def check_command(command: Command) -> None:
    """Check one doc command against the code; raise DocError naming the doc line when it does not match."""
    if _unchecked_reason(command.text):
        return
    words = _words(command)
    missing = [w for w in words if _repo_path_missing(w)]
    if missing:
        raise DocError(f"{command.where}: no {', '.join(missing)} in the repository")
    if words[0] in ("python", "python3"):
        check_python(command, words)
    elif words[0] == "make":
        check_make(command, words)
    elif words[0] == "sbatch":
        check_sbatch(command, words)
    elif words[0].startswith("launch/"):
        check_launch_script(command, words)
    else:
        raise DocError(f"{command.where}: not a command this test knows how to check: check it or list it in UNCHECKED")


def check_yaml_block(doc: str, line: int, text: str, tmp_path: Path) -> None:
    """A YAML block that sets config keys is read like a --config file (keys and values checked)."""
    file = tmp_path / "block.yaml"
    file.write_text(text)
    try:
        config.build_config(config.parse_args(["--config", str(file)]))
    except config.ConfigError as err:
        raise DocError(f"{doc}:{line}: {err}") from None


# --------------------------------------------------------------------- links and paths


def heading_anchors(doc: Path) -> set[str]:
    """GitHub's anchors for the doc's headings (lower case, punctuation dropped, spaces to hyphens)."""
    anchors, in_fence = set(), False
    for line in doc.read_text().splitlines():
        if line.strip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and (heading := re.match(r"^#{1,6}\s+(.*)$", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def broken_links(doc: Path) -> list[str]:
    """Relative links of the doc whose file or heading does not exist."""
    broken, text = [], re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{doc.name}: {target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file):
            broken.append(f"{doc.name}: {target} (no such heading)")
    return broken


# Repository paths the docs name that a command writes, not the repository (`make clean` removes them).
WRITTEN_BY_COMMANDS = {"bench/results/results.md": "written by `make bench` (bench/run.py)"}


def missing_repo_paths(doc: Path) -> list[str]:
    """Repository paths the doc names anywhere (tests/test_x.py, finetune/x.py, booster_configs/x.yaml) that do not exist.

    A path with a placeholder in it (`booster_configs/NAME.yaml`) names a kind of file, not a file.
    """
    found = re.findall(rf"(?<![\w/.$-])((?:{'|'.join(REPO_DIRS)})/[\w./*-]*[\w*/])", doc.read_text())
    named = {p for p in found if not re.search(r"\b[A-Z]+\b", p) and p not in WRITTEN_BY_COMMANDS}
    return sorted(p for p in named if _repo_path_missing(p))


# --------------------------------------------------------------------- tests


COMMANDS = all_commands()


def test_the_docs_show_commands():
    fenced = [c for doc in DOCS for c in shell_commands(doc)]
    assert len(fenced) >= 25 and len(COMMANDS) >= 60, (len(fenced), len(COMMANDS))
    assert {"make demo", "make test"} <= {c.text.split("#")[0].strip() for c in fenced}  # the two commands, as written


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.doc}:{c.line}")
def test_doc_command_matches_the_code(command):
    check_command(command)


def test_doc_yaml_blocks_are_valid_configs(tmp_path):
    blocks = [(doc.relative_to(REPO).as_posix(), line, "\n".join(body)) for doc in DOCS for lang, line, body in fenced_blocks(doc.read_text()) if lang in ("yaml", "yml")]
    assert blocks
    for block in blocks:
        check_yaml_block(*block, tmp_path)


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_links_resolve(doc):
    assert broken_links(doc) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_named_repository_paths_exist(doc):
    assert missing_repo_paths(doc) == []


def test_the_readme_is_a_landing_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", readme))
    assert linked == {p.name for p in REPO.glob("docs/*.md")}  # every docs page is reachable from the landing page


def test_the_configuration_table_lists_every_key():
    table = (REPO / "docs" / "configuration.md").read_text()
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    documented = {key for row in rows for key in re.findall(r"`([\w.]+)`", row)}
    keys = set(config.config_keys()) - {"plugin.options"}
    assert documented - keys == set(), "the table names keys that do not exist"
    assert keys - documented == set(), "config keys missing from docs/configuration.md"


def test_the_plugin_table_lists_every_option_with_its_default():
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| (`.*) \|$", (REPO / "docs" / "parallel.md").read_text(), re.M)}
    assert set(rows) == set(PLUGINS)
    for name, spec in PLUGINS.items():
        shown = dict(re.findall(r"`(\w+)` \(([^)]*)\)", rows[name]))
        assert shown == {k: "empty" if v == "" else str(v).lower() if isinstance(v, bool) else str(v) for k, v in spec.options.items()}, name


# The checks catch what they are for: each deliberately wrong example fails with the reason.
WRONG = [
    ("launch/single_node.sh 2 train.max_step=200", "unknown config key 'train.max_step'"),
    ("python finetune/train.py --config booster_configs/zero3.yaml", "no booster_configs/zero3.yaml"),
    ("launch/single_node.sh 3 --config booster_configs/tp2_pp2.yaml", "world size"),
    ("python -m finetune.export outputs/run1 --gguf-typo x.gguf", "rejected by its argument parser"),
    ("python -m finetune.export outputs/run1", "rejected by its argument parser"),  # neither OUT_DIR nor --gguf: parse_cli's own check
    ("launch/multi_node.sh hosts.txt 10.0.0.1 8 --nproc 8", "unknown option '--nproc'"),
    ("python -m finetune.estimate model=llama2-7b plugin=zero3", "zero3"),
    ("python -m finetune.gpu_check --only nope.yaml", "no booster_configs/nope.yaml"),
    ("python -m finetune.nope", "no module finetune.nope"),
    ("python bench/run.py --onli lora", "rejected by its argument parser"),
    ("python bench/run.py --only lora,lora_tp4", "no case lora_tp4"),
    ("make deploy", "no target deploy"),
    ("sbatch --nodes=2 launch/slurm.sbatch lora.rr=8", "unknown config key 'lora.rr'"),
    ("python -m finetune.report RUN_DIR [--outdir DIR]", "--outdir not an option"),
]


@pytest.mark.parametrize("text, reason", WRONG)
def test_a_wrong_doc_command_fails(text, reason):
    command = Command("wrong.md", 1, text, synopsis=bool(SYNOPSIS.search(text)))
    with pytest.raises(DocError, match=re.escape(reason)):
        check_command(command)


def test_a_wrong_link_or_yaml_block_fails(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](nowhere.md) [bad anchor](#no-such-heading)\n")
    assert broken_links(page) == ["page.md: nowhere.md (no such file)", "page.md: #no-such-heading (no such heading)"]
    with pytest.raises(DocError, match="unknown config key 'train.max_step'"):
        check_yaml_block("wrong.md", 1, "train:\n  max_step: 3\n", tmp_path)
