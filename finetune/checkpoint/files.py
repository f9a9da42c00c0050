"""The checkpoint file format: tensors in safetensors files, everything else in JSON (never pickle), and ONE
reader of weights directories (checkpoints, final/ and pretrained model directories alike)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from finetune import sources
from finetune.errors import CheckpointError


def error_reason(err: BaseException) -> str:
    """An exception in a few words for an error line: its type and the first line of its message."""
    text = str(err).splitlines()[0][:120] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


TREE_ERRORS = (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError, KeyError, TypeError, AttributeError, ValueError)


def split_tensors(tree, prefix: str = "") -> tuple[object, dict[str, torch.Tensor]]:
    """A nested dict/list with tensors -> (JSON-able tree with {"tensor": key} in their place, tensors by key)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node, key: str):
        if isinstance(node, torch.Tensor):
            tensors[key] = node.detach().cpu().contiguous()
            return {"tensor": key}
        if isinstance(node, dict):
            if not all(isinstance(k, str) for k in node):
                raise TypeError(f"{key or 'tree'}: only string keys survive JSON, got {sorted(map(repr, node))[:3]}")
            return {"dict": {k: walk(v, f"{key}/{k}" if key else k) for k, v in node.items()}}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{key}/{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"{key}: {type(node).__name__} is not plain data")

    return walk(tree, prefix), tensors


def join_tensors(tree, tensors: dict[str, torch.Tensor]):
    """The inverse of split_tensors (tuples come back as lists)."""
    if isinstance(tree, list):
        return [join_tensors(v, tensors) for v in tree]
    if isinstance(tree, dict) and "tensor" in tree:
        return tensors[tree["tensor"]]
    if isinstance(tree, dict):
        return {k: join_tensors(v, tensors) for k, v in tree["dict"].items()}
    return tree


def write_tree(tree, stem: Path) -> None:
    """`stem`.safetensors (its tensors) and `stem`.json (the rest)."""
    plain, tensors = split_tensors(tree)
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_file(unshared(tensors), stem.with_name(stem.name + ".safetensors"))
    stem.with_name(stem.name + ".json").write_text(json.dumps(plain) + "\n")


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: copy all but the first of each (FSDP's unflattened
    optimizer state shares one `step` counter among a unit's parameters)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        out[name] = tensor.clone() if key in seen else tensor.contiguous()
        seen.add(key)
    return out


def read_json(file: Path):
    """A checkpoint's JSON file; anything else (a pickle, say) is a CheckpointError, never unpickled."""
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"resume_from: {file} is not a JSON file of this checkpoint format ({type(err).__name__})") from None


def read_tree(stem: Path):
    """What write_tree (or save_split_optimizer) wrote; an unreadable or malformed file is a CheckpointError (nothing is unpickled)."""
    with tree_errors(stem):
        plain = json.loads(stem.with_name(stem.name + ".json").read_text())
        tensors: dict[str, torch.Tensor] = {}
        for file in sorted(set(tensor_files(stem).values())):
            tensors.update(load_file(file))
        return join_tensors(plain, tensors)


@contextlib.contextmanager
def tree_errors(stem: Path):
    """A file set of write_tree's format that cannot be read becomes one CheckpointError line."""
    try:
        yield
    except CheckpointError:  # said already (a FinetuneError is a ValueError too)
        raise
    except TREE_ERRORS as err:
        raise CheckpointError(f"resume_from: {stem}.json/.safetensors is not a checkpoint file of this format ({error_reason(err)})") from None


def tensor_files(stem: Path) -> dict[str, Path]:
    """Where each tensor of a write_tree file set lives: `stem`.safetensors, or the files of its index
    (`stem`.safetensors.index.json, one file per pipeline stage), which may name only safetensors files beside it."""
    single, index = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".safetensors.index.json")
    if not single.is_file() and index.is_file():
        problem = sources.outside_problem(stem.parent, "resume_from") or sources.index_problem(index, "resume_from")
        if problem:
            raise CheckpointError(problem)
        return {key: stem.parent / name for key, name in json.loads(index.read_text())["weight_map"].items()}
    inside(stem.parent)
    with safe_open(single, "pt") as f:
        return {key: single for key in f.keys()}


class OpenFiles:
    """The safetensors files of a {tensor key: file} map, each opened once on first use and closed together."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files, self.handles, self.stack = files, {}, contextlib.ExitStack()

    def __enter__(self) -> "OpenFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def __getitem__(self, key: str):
        """The open file that holds tensor `key`."""
        path = self.files[key]
        if path not in self.handles:
            self.handles[path] = self.stack.enter_context(safe_open(path, "pt"))
        return self.handles[path]


class TensorKey(str):
    """A tensor's key in a file set, standing in for the tensor until it is read."""


class KeyStandIns(dict):
    """join_tensors' tensors: each key stands for its tensor (read later, only where needed)."""

    def __missing__(self, key: str) -> TensorKey:
        return TensorKey(key)


def rng_state() -> dict:
    """Every RNG a training step can draw from (dropout, shuffling in user code), as plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss): JSON
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state returned (tuples may come back as lists from JSON)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def sync_tree(path: Path, hash_files: bool = True) -> dict[str, str]:
    """fsync every file and directory under path (and path); returns each file's sha256 (hash_files), read while syncing."""
    hashes = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        if hash_files:
            hashes[str(file.relative_to(path))] = file_sha256(file)
        fsync(file)
    for directory in [*sorted(p for p in path.rglob("*") if p.is_dir()), path]:
        fsync(directory)
    return hashes


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def inside(path: Path, names=(), recursive: bool = False, setting: str = "resume_from") -> None:
    """Refuse a directory one of whose `names` (relative to it) or entries (every level with `recursive`) resolves outside it (sources.outside_problem)."""
    problem = sources.outside_problem(path, setting, names, recursive)
    if problem:
        raise CheckpointError(problem)


def check_weight_files(path: Path, key: str = "resume_from") -> None:
    """Before any reader (ours, ColossalAI's) reads a weights directory: no entry of it links outside it, and its
    indexes name only safetensors files inside it (ColossalAI's loader would torch.load any other file an edited
    index names, and read any path); `key` names the setting in errors."""
    inside(path, setting=key)
    for index in sorted(path.glob("*.index.json")):
        problem = sources.index_problem(index, key)
        if problem:
            raise CheckpointError(problem)


def weight_files(path: Path, setting: str = "resume_from") -> dict[str, Path]:
    """Where each tensor of a save_pretrained (or ColossalAI sharded) safetensors directory lives; `setting` names it in errors."""
    check_weight_files(path, setting)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {key: path / name for key, name in json.loads(index.read_text())["weight_map"].items()}
    with safe_open(path / "model.safetensors", "pt") as f:
        return {key: path / "model.safetensors" for key in f.keys()}


def weight_key(files: dict[str, Path], names: list[str], path: Path, setting: str = "resume_from") -> str:
    """The stored key of a parameter known by these names (tied weights are stored once, under one of them)."""
    key = next((n for n in names if n in files), None)
    if key is None:
        raise CheckpointError(f"{setting}: {path} has no weight for {names[0]}; its weights do not fit this model")
    return key


class WeightsDir:
    """The tensors of a pretrained save_pretrained directory (one safetensors file, or the shards its index lists), read by name."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.files = weight_files(self.path, "model.name")  # an index may name safetensors files in this directory only

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor, copied out of its memory-mapped file; the file is unmapped again, so its pages leave
        this process's resident set (kept mapped, every page read would count in it until the end)."""
        with safe_open(self.files[key], framework="pt") as f:
            return f.get_tensor(key)

    def key_for(self, names: list[str]) -> str:
        """The stored key of a parameter known by these names (tied weights are stored once, under one of them)."""
        return weight_key(self.files, names, self.path, "model.name")


@contextlib.contextmanager
def weight_errors(path: Path, setting: str = "resume_from"):
    """A weights directory that cannot be read becomes one CheckpointError line, naming the setting that named it."""
    try:
        yield
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{setting}: {path} holds no readable safetensors weights ({error_reason(err)})") from None


def read_safetensors_dir(path: Path, setting: str = "resume_from") -> dict[str, torch.Tensor]:
    """All tensors of a save_pretrained directory (one file, or shards listed in an index: weight_files' checks);
    `setting` names it in errors."""
    state: dict[str, torch.Tensor] = {}
    with weight_errors(path, setting):
        for file in sorted(set(weight_files(path, setting).values())):
            state.update(load_file(file))
    return state


def write_adapter(state: dict[str, torch.Tensor], path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, path / "adapter_model.safetensors")


def read_adapter(path: Path, allow_pickle: bool = False, setting: str = "resume_from") -> dict[str, torch.Tensor]:
    """The tensors of a peft adapter dir (a checkpoint's model/, or lora.init_from: `setting`); a pickle-only one only with allow_pickle."""
    problem = sources.weights_dir_problem(path, allow_pickle, setting)
    if problem:
        raise CheckpointError(problem)
    if allow_pickle and not (path / "adapter_model.safetensors").is_file():
        # lora.init_from of a pickle-only adapter, which the user opted into (model.allow_pickle=true)
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    try:
        return load_file(path / "adapter_model.safetensors")
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{setting}: {path / 'adapter_model.safetensors'} is not a readable safetensors file ({error_reason(err)})") from None
