"""Reading a checkpoint, a final/ or a model/adapter dir never leaves it, never unpickles and never ends in a
traceback (Hardening II, items 4, 5, 9).

Three parts: the regression cases, each named; a Hypothesis fuzz that mutates real small checkpoints
(state.json, the weight and optimizer indexes, the manifest, adapter_config.json, links, safetensors headers)
and passes each through the entry points resume and export use (checkpoint.open_resume, export.locate, then
the readers a resume and an export call), asserting one error line or a clean read, and no file opened outside
the checkpoint; and three real CLI runs for the exit-code contract (2, one `error:` line).

FUZZ_EXAMPLES sets the fuzz's example count per checkpoint kind (full, LoRA; default 500: about a minute
in all on a loaded 2-core machine; `make fuzz` runs more).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune import checkpoint, export, sources
from finetune.config import load_config
from finetune.errors import FinetuneError
from finetune.methods import method_named
from finetune.outputs import RUN_MARKER
from tests.conftest import TRAIN, run_python, run_train, write_instruction_file

pytestmark = pytest.mark.e2e

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "500"))
STEP = "step_00000004"


def run_args(data: Path, out: Path, method: str) -> list[str]:
    return [f"data.train_path={data}", "data.eval_fraction=0.25", "model.name=tiny-gpt2", f"method={method}", "train.max_steps=4", "train.batch_size=4",
            "checkpoint.every_steps=2", "checkpoint.keep_last=0", "eval.every_steps=0", "eval.num_generation_prompts=0", f"output_dir={out}"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two finished tiny runs (full, LoRA) with checkpoints at steps 2 and 4, and a folder of files outside them."""
    root = tmp_path_factory.mktemp("reads")
    data = write_instruction_file(root / "train.jsonl", n=32)
    found = {"root": root, "data": data}
    for method in ("full", "lora"):
        result = run_train(run_args(data, root / method, method))
        assert result.returncode == 0, result.stderr[-3000:]
        found[method] = root / method
    outside = root / "outside"
    outside.mkdir()
    shutil.copy(root / "full" / "checkpoints" / STEP / "model" / "model.safetensors", outside / "evil.safetensors")
    shutil.copy(root / "lora" / "checkpoints" / STEP / "model" / "adapter_model.safetensors", outside / "adapter_model.safetensors")
    (outside / "secret.json").write_text('{"weight_map": {}}')
    found["outside"] = outside
    return found


def stage(runs: dict, method: str, where: Path) -> Path:
    """A copy of a run holding only its step-4 checkpoint, to damage (large files hard-linked: replace, never write, them)."""
    shutil.rmtree(where, ignore_errors=True)
    ckpt = where / "checkpoints" / STEP
    shutil.copytree(runs[method] / "checkpoints" / STEP, ckpt, copy_function=os.link)
    shutil.copy(runs[method] / RUN_MARKER, where / RUN_MARKER)  # a run of this tool: a resume may write there
    return ckpt


def replace(path: Path, data: bytes | str) -> None:
    """Write a new file in place of path (a hard link to the original run's file stays untouched)."""
    if path.is_symlink() or path.exists():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def edit_state(ckpt: Path, fields) -> None:
    """Set fields of state.json (a dict, or a function of the state giving one)."""
    state = json.loads((ckpt / "state.json").read_text())
    state.update(fields(state) if callable(fields) else fields)
    replace(ckpt / "state.json", json.dumps(state))


def rewrite_manifest(ckpt: Path) -> None:
    """Sizes and sha256 of what is there now, as an attacker who edits a checkpoint writes them."""
    state = json.loads((ckpt / "state.json").read_text())
    state["files"] = checkpoint.manifest(ckpt)
    state["sha256"] = {name: checkpoint.file_sha256(ckpt / name) for name in state["files"]}
    replace(ckpt / "state.json", json.dumps(state))


def resume_config(runs: dict, method: str, out: Path):
    return load_config([*run_args(runs["data"], out, method), f"resume_from={out / 'checkpoints' / STEP}"], world_size=1)


def resume_reads(cfg) -> None:
    """What a one-rank torch_ddp resume checks and reads: train.main's checks, then load_checkpoint's files."""
    path, state, _ = checkpoint.open_resume(cfg, world_size=1)
    checkpoint.layout_change_line(state, cfg, 1)
    if method_named(cfg.method).adapter:
        checkpoint.read_adapter(path / "model")
    else:
        checkpoint.read_safetensors_dir(path / "model")
    checkpoint.read_tree(checkpoint.full_optimizer_stem(path / "optimizer"))
    checkpoint.read_json(path / "scheduler.json")
    checkpoint.read_tree(checkpoint.rng_stem(path, 0))
    checkpoint.resume_position(state, cfg.train.batch_size * cfg.train.grad_accum_steps, state["steps_per_epoch"])


def export_reads(source: Path) -> None:
    """What finetune.export checks and reads of a checkpoint or run dir before it builds the base model."""
    cfg, weights = export.locate(source)
    if (weights / "adapter_config.json").is_file():
        checkpoint.read_adapter(weights, setting="export")
    else:
        checkpoint.read_safetensors_dir(weights, "export")


def one_line(err: BaseException) -> str:
    text = str(err)
    assert text and "\n" not in text, repr(text)
    return text


# --- item 4: files outside the checkpoint ------------------------------------------------------------


def test_a_weight_index_naming_a_file_outside_is_refused_by_resume_and_export(runs, tmp_path):
    for name in ["../../../../../outside/evil.safetensors", str(runs["outside"] / "evil.safetensors")]:
        ckpt = stage(runs, "full", tmp_path / "run")
        (ckpt / "model" / "model.safetensors").unlink()
        replace(ckpt / "model" / "model.safetensors.index.json", json.dumps({"weight_map": {"transformer.wte.weight": name}}))
        rewrite_manifest(ckpt)
        with pytest.raises(checkpoint.CheckpointError, match=f"names '{name}' as one of its files, which resolves outside it"):
            checkpoint.verify(ckpt)
        with pytest.raises(checkpoint.CheckpointError, match="resolves outside it"):  # and the reader itself, were it reached
            checkpoint.read_safetensors_dir(ckpt / "model")
        with pytest.raises(checkpoint.CheckpointError, match="resolves outside it"):
            export.locate(ckpt)


@pytest.mark.parametrize("method, name", [("full", "model/model.safetensors"), ("lora", "model/adapter_model.safetensors"), ("full", "optimizer/state.safetensors"), ("full", "state.json")])
def test_a_file_linked_to_outside_the_checkpoint_is_refused(runs, tmp_path, method, name):
    ckpt = stage(runs, method, tmp_path / "run")
    target = runs["outside"] / f"{method}-{name.replace('/', '_')}"
    shutil.copy(ckpt / name, target)
    (ckpt / name).unlink()
    (ckpt / name).symlink_to(target)
    if name != "state.json":
        rewrite_manifest(ckpt)
    with pytest.raises(checkpoint.CheckpointError, match=f"{name} links outside .*{STEP} \\(to {target}\\)"):
        checkpoint.verify(ckpt)
    with pytest.raises(checkpoint.CheckpointError, match="links outside"):
        resume_reads(resume_config(runs, method, tmp_path / "run"))


def test_final_dir_linking_outside_is_refused_by_export(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["lora"], run, copy_function=os.link, ignore=shutil.ignore_patterns("checkpoints"))
    (run / "final" / "adapter_model.safetensors").unlink()
    (run / "final" / "adapter_model.safetensors").symlink_to(runs["outside"] / "adapter_model.safetensors")
    with pytest.raises(export.ExportError, match="final/adapter_model.safetensors links outside"):
        export.locate(run)
    shutil.rmtree(run / "final")  # no final/: the newest checkpoint, verified as one given directly
    ckpt = run / "checkpoints" / STEP
    shutil.copytree(runs["lora"] / "checkpoints" / STEP, ckpt, copy_function=os.link)
    edit_state(ckpt, {"step": -5})
    with pytest.raises(checkpoint.CheckpointError, match="step=-5"):
        export.locate(run)


def test_an_optimizer_index_naming_a_file_outside_is_refused(runs, tmp_path):
    ckpt = stage(runs, "full", tmp_path / "run")
    (ckpt / "optimizer" / "state.safetensors").rename(ckpt / "optimizer" / "state-stage-00001.safetensors")
    replace(ckpt / "optimizer" / "state.safetensors.index.json", json.dumps({"weight_map": {"state/transformer.wte.weight/exp_avg": "../../../../outside/evil.safetensors"}}))
    rewrite_manifest(ckpt)
    with pytest.raises(checkpoint.CheckpointError, match="resolves outside it"):
        checkpoint.verify(ckpt)


def test_resume_from_latest_never_orders_or_picks_a_linked_checkpoint(runs, tmp_path):
    """Ordering the checkpoints reads each state.json: a linked step dir or state.json would be read outside output_dir."""
    ckpt = stage(runs, "full", tmp_path / "run")
    (ckpt.parent / "step_00000006").symlink_to(runs["full"] / "checkpoints" / STEP, target_is_directory=True)
    copy = ckpt.parent / "step_00000005"
    shutil.copytree(ckpt, copy, copy_function=os.link)
    (copy / "state.json").unlink()
    (copy / "state.json").symlink_to(runs["full"] / "checkpoints" / STEP / "state.json")
    assert checkpoint.complete_checkpoints(str(tmp_path / "run")) == [ckpt]


def test_a_hub_cache_snapshot_may_link_into_its_own_blobs_but_nowhere_else(runs, tmp_path):
    """The hub cache keeps a snapshot's files as links into the repo's blobs/: inside the repo, so allowed."""
    final = runs["full"] / "final"
    repo = tmp_path / "hub" / "models--acme--tiny"
    snapshot, blobs = repo / "snapshots" / ("a" * 40), repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in final.iterdir():
        shutil.copy(file, blobs / file.name)
        (snapshot / file.name).symlink_to(Path("../../blobs") / file.name)
    assert sources.weights_dir_problem(snapshot, False, "model.name") is None
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to(runs["outside"] / "secret.json")
    assert "config.json links outside" in sources.weights_dir_problem(snapshot, False, "model.name")


# --- item 9: tampered checkpoint metadata ---------------------------------------------------------------

STATE_CASES = {
    "negative_step": ({"step": -5}, "has step=-5, not a whole number >= 1"),
    # every field agreeing with the step, as a careful edit would leave them
    "far_step": (lambda s: {"step": 10**12, "epoch": 10**12 // s["steps_per_epoch"], "samples_seen": 10**12 * s["global_batch"]}, f"has step {10**12}, past the 4 steps of the run that wrote it"),
    "step_string": ({"step": "4"}, 'has step="4", not a whole number'),
    "step_float": ({"step": 4.5}, "has step=4.5, not a whole number"),
    "step_bool": ({"step": True}, "has step=true, not a whole number"),
    "zero_steps_per_epoch": ({"steps_per_epoch": 0}, "has steps_per_epoch=0, not a whole number >= 1"),
    "inconsistent_epoch": ({"epoch": 3}, "which do not agree"),
    "files_list": ({"files": ["model/model.safetensors"]}, "has files=[\"model/model.safetensors\"], not an object of file names and sizes"),
    "files_negative": ({"files": {"model/model.safetensors": -1}}, "not an object of file names and sizes"),
    "no_identity": ({"identity": None}, "has identity=null, not an object"),
    "identity_plugin": ({"identity": "x"}, "has identity=\"x\", not an object"),
    "format_string": ({"format": "2"}, 'checkpoint format "2", this version reads 2'),
}


@pytest.mark.parametrize("case", list(STATE_CASES))
def test_tampered_state_json_is_one_line(runs, tmp_path, case):
    fields, fragment = STATE_CASES[case]
    ckpt = stage(runs, "full", tmp_path / "run")
    edit_state(ckpt, fields)
    for entry in (lambda: resume_reads(resume_config(runs, "full", tmp_path / "run")), lambda: export.locate(ckpt)):
        with pytest.raises(checkpoint.CheckpointError) as err:
            entry()
        assert fragment in one_line(err.value)


def test_state_json_without_its_identity_is_one_line(runs, tmp_path):
    ckpt = stage(runs, "full", tmp_path / "run")
    state = json.loads((ckpt / "state.json").read_text())
    del state["identity"]
    replace(ckpt / "state.json", json.dumps(state))
    with pytest.raises(checkpoint.CheckpointError, match="has no identity, not an object"):
        resume_reads(resume_config(runs, "full", tmp_path / "run"))


def test_a_corrupt_safetensors_header_is_one_line_before_any_model_is_built(runs, tmp_path):
    ckpt = stage(runs, "full", tmp_path / "run")
    weights = bytearray((ckpt / "model" / "model.safetensors").read_bytes())
    weights[8:16] = b"garbage!"
    replace(ckpt / "model" / "model.safetensors", bytes(weights))
    rewrite_manifest(ckpt)
    with pytest.raises(checkpoint.CheckpointError, match=r"model holds no readable safetensors weights \(SafetensorError"):
        checkpoint.verify(ckpt)
    with pytest.raises(checkpoint.CheckpointError, match="holds no readable safetensors weights"):
        checkpoint.read_safetensors_dir(ckpt / "model")  # the reader too, were it reached


class _Payload:
    """Unpickling this creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("method, weights, pickled", [("full", "model.safetensors", "pytorch_model.bin"), ("lora", "adapter_model.safetensors", "adapter_model.bin")])
def test_a_pickle_only_checkpoint_is_one_line_and_never_unpickled(runs, tmp_path, method, weights, pickled):
    ckpt = stage(runs, method, tmp_path / "run")
    (ckpt / "model" / weights).unlink()
    replace(ckpt / "model" / pickled, pickle.dumps({"weight": _Payload(tmp_path / "pwned")}))
    rewrite_manifest(ckpt)
    for entry in (lambda: resume_reads(resume_config(runs, method, tmp_path / "run")), lambda: export.locate(ckpt)):
        with pytest.raises(checkpoint.CheckpointError, match=f"model holds only pickle weights \\({pickled}\\).*a checkpoint is never unpickled"):
            entry()
    assert not (tmp_path / "pwned").exists()


# --- the fuzz -----------------------------------------------------------------------------------------

class Reads:
    """Every file opened while active: Python's opens (an audit hook: open(), os.open, Path.read_*), and the
    safetensors and torch.load readers, which open files outside Python."""

    active: list | None = None

    @classmethod
    def audit(cls, event: str, args: tuple) -> None:
        if cls.active is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1] or "", args[2] or 0
            cls.active.append((os.fsdecode(args[0]), any(c in mode for c in "wax+") or bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))))

    @classmethod
    def wrap(cls, reader):
        def recorded(path, *args, **kwargs):
            if cls.active is not None:
                cls.active.append((os.fsdecode(path), False))
            return reader(path, *args, **kwargs)

        return recorded


sys.addaudithook(Reads.audit)  # audit hooks cannot be removed: it records nothing unless Reads.active is a list


@pytest.fixture
def recorded_reads(monkeypatch):
    for module in (checkpoint.files, checkpoint.resume, safetensors.torch, safetensors):
        monkeypatch.setattr(module, "safe_open", Reads.wrap(module.safe_open))
    monkeypatch.setattr(torch, "load", Reads.wrap(torch.load))
    # Speed only: a file hard-linked from the original run (same inode, size and times) is not hashed again.
    hashes, sha256 = {}, checkpoint.file_sha256

    def remembered(path: Path) -> str:
        info = os.stat(path)
        key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        if key not in hashes:
            hashes[key] = sha256(path)
        elif Reads.active is not None:
            Reads.active.append((str(path), False))  # counted as read, as the real hash would
        return hashes[key]

    for module in (checkpoint.files, checkpoint.resume):
        monkeypatch.setattr(module, "file_sha256", remembered)
    return Reads


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12)
    | st.sampled_from(["../../outside/evil.safetensors", "/etc/hostname", "model/model.safetensors", "x.bin", "", ".", "..", "model", "a\x00b"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
FILE_NAMES = st.sampled_from(
    ["model/model.safetensors", "model/adapter_model.safetensors", "model/adapter_config.json", "model/config.json", "optimizer/state.safetensors",
     "optimizer/state.json", "rng/rank_0.json", "rng/rank_0.safetensors", "scheduler.json", "state.json", "model/model.safetensors.index.json",
     "optimizer/state.safetensors.index.json"]  # fmt: skip
)
SHARD_NAMES = st.sampled_from(["model.safetensors", "../model/model.safetensors", "../../../outside/evil.safetensors", "OUTSIDE/evil.safetensors",
                               "pytorch_model.bin", "missing.safetensors", "", "/etc/hostname", "state.safetensors", "sub/../model.safetensors"]) | st.text(max_size=10)  # fmt: skip
STATE_PATHS = st.sampled_from(
    [("format",), ("step",), ("steps_per_epoch",), ("epoch",), ("global_batch",), ("samples_seen",), ("identity",), ("config",), ("files",), ("sha256",),
     ("identity", "plugin"), ("identity", "plugin", "name"), ("identity", "world_size"), ("identity", "method"), ("identity", "train.batch_size"),
     ("identity", "train.grad_accum_steps"), ("identity", "model"), ("config", "train"), ("config", "train", "max_steps"), ("config", "train", "epochs"),
     ("config", "model"), ("files", "model/model.safetensors"), ("files", "../../outside/evil.safetensors"), ("sha256", "scheduler.json"), ()]  # fmt: skip
)
DELETE = object()

MUTATIONS = st.one_of(
    st.tuples(st.just("state"), STATE_PATHS, JSON_VALUES | st.just(DELETE)),
    st.tuples(st.just("index"), st.sampled_from(["model", "optimizer"]), st.lists(SHARD_NAMES, min_size=0, max_size=3), st.booleans()),
    st.tuples(st.just("link"), FILE_NAMES, st.sampled_from(["outside", "inside", "dangling", "loop", "dir"])),
    st.tuples(st.just("adapter_config"), st.sampled_from(["r", "lora_alpha", "target_modules", "peft_type", "base_model_name_or_path", "task_type", None]), JSON_VALUES),
    st.tuples(st.just("header"), FILE_NAMES, st.integers(0, 120), st.integers(0, 255)),
    st.tuples(st.just("pickle"), FILE_NAMES),
    st.tuples(st.just("delete"), FILE_NAMES),
    st.tuples(st.just("json"), FILE_NAMES, JSON_VALUES),
)


def _json_or_none(path: Path):
    """A file's JSON, or None where an earlier mutation left none."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def mutate(ckpt: Path, outside: Path, mutation: tuple) -> None:
    """Apply one mutation to a staged checkpoint."""
    kind = mutation[0]
    if kind == "state":
        _, where, value = mutation
        state = _json_or_none(ckpt / "state.json")
        node = state
        for part in where[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not where:
            state = None if value is DELETE else value
        elif isinstance(node, dict):
            if value is DELETE:
                node.pop(where[-1], None)
            else:
                node[where[-1]] = value
        replace(ckpt / "state.json", json.dumps(state))
    elif kind == "index":
        _, folder, names, drop_single = mutation
        stem = {"model": "model.safetensors", "optimizer": "state.safetensors"}[folder]
        names = [n.replace("OUTSIDE", str(outside)) for n in names]
        replace(ckpt / folder / f"{stem.rsplit('.', 1)[0]}.safetensors.index.json", json.dumps({"weight_map": {f"t{i}": n for i, n in enumerate(names)}}))
        if drop_single and (ckpt / folder / stem).exists():
            (ckpt / folder / stem).unlink()
    elif kind == "link":
        _, name, target = mutation
        file = ckpt / name
        source = {"outside": outside / "evil.safetensors", "inside": ckpt / "scheduler.json", "dangling": ckpt / "nothing", "loop": file, "dir": outside}[target]
        if file.is_symlink() or file.exists():
            file.unlink()
        file.parent.mkdir(parents=True, exist_ok=True)
        file.symlink_to(source)
    elif kind == "adapter_config":
        _, key, value = mutation
        path = ckpt / "model" / "adapter_config.json"
        config = _json_or_none(path)
        replace(path, json.dumps(value if key is None else {**(config if isinstance(config, dict) else {}), key: value}))
    elif kind == "header":
        _, name, offset, byte = mutation
        if (ckpt / name).is_file():
            data = bytearray((ckpt / name).read_bytes())
            if offset < len(data):
                data[offset] = byte
            replace(ckpt / name, bytes(data))
    elif kind == "pickle":
        replace(ckpt / mutation[1], pickle.dumps({"weight": _Payload(outside / "pwned")}))
    elif kind == "delete":
        if (ckpt / mutation[1]).is_symlink() or (ckpt / mutation[1]).is_file():
            (ckpt / mutation[1]).unlink()
    elif kind == "json":
        replace(ckpt / mutation[1], json.dumps(mutation[2]))




@pytest.mark.timeout(1800)
@pytest.mark.parametrize("method", ["lora", "full"])
def test_fuzz_checkpoint_metadata(runs, tmp_path, recorded_reads, method):
    """Mutated checkpoints through resume's and export's entry points: a clean read or one error line, never a
    traceback, never a pickle run, never a file opened outside the checkpoint or anything written."""
    cfg = resume_config(runs, method, tmp_path / "run")
    work = tmp_path / "run"
    outcomes: dict[str, int] = {}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=not os.environ.get("FUZZ_RANDOM"))
    @given(st.lists(MUTATIONS, min_size=1, max_size=3), st.booleans(), st.sampled_from(["resume", "export"]))
    def case(mutations, manifest, entry):
        ckpt = stage(runs, method, work)
        for mutation in mutations:
            mutate(ckpt, runs["outside"], mutation)
        if manifest and (ckpt / "state.json").is_file() and not (ckpt / "state.json").is_symlink():
            try:
                rewrite_manifest(ckpt)
            except (OSError, ValueError, TypeError, AttributeError, RuntimeError):  # a state.json or tree this cannot rewrite: tested as it is
                pass
        Reads.active = []
        try:
            resume_reads(cfg) if entry == "resume" else export_reads(ckpt)
            outcome = "read"
        except FinetuneError as err:
            one_line(err)
            outcome = "refused"
        finally:
            opened, Reads.active = Reads.active, None
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        inside = work.resolve()
        for path, writes in opened:
            resolved = Path(os.path.realpath(path))
            assert not writes, f"{path} was opened for writing"
            if resolved.is_relative_to(runs["root"].resolve()) or resolved.is_relative_to(Path("/etc")):
                assert resolved.is_relative_to(inside), f"{path} was read: outside the checkpoint ({mutations})"
        assert not (runs["outside"] / "pwned").exists(), f"a planted pickle ran ({mutations})"

    case()
    print(f"\nfuzz {method}: {sum(outcomes.values())} cases: {outcomes.get('refused', 0)} refused in one line, {outcomes.get('read', 0)} read cleanly")
    if FUZZ_EXAMPLES >= 100:  # the mutations reach both outcomes
        assert outcomes.get("refused", 0) > 0 and outcomes.get("read", 0) > 0


@pytest.mark.parametrize("field, value, fragment", [("r", "8", 'r=\'8\', not a whole number >= 1'), ("lora_alpha", None, "lora_alpha=None, not a positive number"),
                                                     ("target_modules", [1], "target_modules=[1], not module names"), ("peft_type", "IA3", "peft_type='IA3', not LORA")])  # fmt: skip
def test_export_of_an_adapter_with_a_tampered_config_is_one_line(runs, tmp_path, capsys, field, value, fragment):
    """finetune.export's main, in-process: refused before the base model is built (peft would fail in it with a traceback)."""
    ckpt = stage(runs, "lora", tmp_path / "run")
    config = json.loads((ckpt / "model" / "adapter_config.json").read_text())
    replace(ckpt / "model" / "adapter_config.json", json.dumps({**config, field: value}))
    rewrite_manifest(ckpt)
    assert export.main([str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: export: ") and fragment in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


# --- the exit-code contract: real CLI runs ------------------------------------------------------------


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_cli_resume_of_an_index_naming_a_file_outside_exits_2(runs, tmp_path):
    ckpt = stage(runs, "full", tmp_path / "run")
    (ckpt / "model" / "model.safetensors").unlink()
    replace(ckpt / "model" / "model.safetensors.index.json", json.dumps({"weight_map": {"transformer.wte.weight": "../../../../../outside/evil.safetensors"}}))
    rewrite_manifest(ckpt)
    result = run_train([*run_args(runs["data"], tmp_path / "run", "full"), "train.max_steps=6", "resume_from=latest"])
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: resume_from: ") and "resolves outside it" in lines[0], result.stderr[-2000:]
    assert "model_loaded" not in result.stdout


def test_cli_resume_of_a_tampered_step_exits_2(runs, tmp_path):
    ckpt = stage(runs, "lora", tmp_path / "run")
    edit_state(ckpt, {"step": -5})
    result = run_train([*run_args(runs["data"], tmp_path / "run", "lora"), "train.max_steps=6", "resume_from=latest"])
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1 and "has step=-5, not a whole number >= 1" in lines[0], result.stderr[-2000:]
    assert "model_loaded" not in result.stdout


def test_cli_export_of_a_linked_weights_file_exits_2(runs, tmp_path):
    ckpt = stage(runs, "full", tmp_path / "run")
    (ckpt / "model" / "model.safetensors").unlink()
    (ckpt / "model" / "model.safetensors").symlink_to(runs["outside"] / "evil.safetensors")
    rewrite_manifest(ckpt)
    result = run_python(["-m", "finetune.export", str(ckpt), str(tmp_path / "out")], timeout=300)
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1 and "model/model.safetensors links outside" in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "out").exists()
