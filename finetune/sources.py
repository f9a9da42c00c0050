"""Where model and adapter weights come from, checked without torch: hub ids, pickle files, files outside a directory.

A pickle weight file (`pytorch_model.bin`, `adapter_model.bin`) can run code when it is loaded: on the
pinned torch 2.5.1 even `torch.load(weights_only=True)` is bypassable (CVE-2025-32434, fixed in torch
2.6). Directories that hold only such files, and safetensors indexes that name such a shard, are refused
unless the user opts in (model.allow_pickle).

Containment: every file a checkpoint, final/, model or adapter directory names (an index's shards, a
manifest's entries) or links must resolve inside that directory (outside_problem, the one check every
reader of such a directory goes through), so an edited index or a symlink cannot make a run or an export
read (train on, export) files from elsewhere.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CVE = "CVE-2025-32434"
# A Hugging Face hub repo id: `org/name` (letters, digits, `-`, `_`, `.`), as huggingface_hub validates it.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def is_hub_id(name: str) -> bool:
    """Whether model.name reads as a hub repo id (`org/name`) rather than a local path."""
    return bool(_HUB_ID.match(name)) and not Path(name).exists() and not name.endswith(".gguf") and ".." not in name


def has_safetensors(path: Path) -> bool:
    """Whether a model or adapter dir holds safetensors weights (a single file or an index of shards)."""
    return any(p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json") for p in path.iterdir())


SAFETENSORS_INDEX = "model.safetensors.index.json"  # what transformers reads when it loads safetensors shards


def containment_root(directory: Path) -> Path:
    """Where the files of `directory` may resolve to: the directory itself, or for a Hugging Face hub cache
    snapshot (models--ORG--NAME/snapshots/REV, whose files link into the repo's blobs/) the repo folder."""
    resolved = directory.resolve()
    if resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith("models--"):
        return resolved.parent.parent
    return resolved


def outside_problem(directory: Path, key: str, names: Iterable = (), recursive: bool = False) -> str | None:
    """The refusal line for the first file that would be read from outside `directory`, else None: one of
    `names` (relative to it, as an index or a manifest gives them: a '..', an absolute path) that resolves
    outside it, or an entry of it (at every level with `recursive`) that is a link to outside it.

    Args:
        key: the setting or command that named the directory, for the line.
    """
    root = containment_root(directory)
    for name in names:
        target = _resolved(directory, name)
        if target is None or target == root or not target.is_relative_to(root):
            return f"{key}: {directory} names {_short_repr(name)} as one of its files, which resolves outside it; only files inside {directory} are read"
    for entry in _entries(directory, recursive):
        target = _resolved(directory, entry)
        if target is None or not target.is_relative_to(root):
            return f"{key}: {directory / entry} links outside {directory} (to {os.path.realpath(directory / entry)}); only files inside it are read: copy the file in instead"
    return None


def _resolved(directory: Path, name) -> Path | None:
    """directory/name with every link followed; None: not a usable file name (not a string, empty, a NUL byte, a link loop)."""
    if not isinstance(name, str) or not name:
        return None
    try:
        return (directory / name).resolve()
    except (OSError, ValueError, RuntimeError):  # RuntimeError: a symlink loop (Python 3.11)
        return None


def _entries(directory: Path, recursive: bool) -> list[str]:
    """The names of directory's entries relative to it (links not followed into)."""
    if not directory.is_dir():
        return []
    if not recursive:
        return sorted(p.name for p in directory.iterdir())
    found = []
    for parent, dirs, files in os.walk(directory, followlinks=False):
        found += [os.path.relpath(os.path.join(parent, name), directory) for name in [*dirs, *files]]
    return sorted(found)


def _short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def index_problem(index: Path, key: str, allow_pickle: bool = False, opt_in: str | None = None) -> str | None:
    """The refusal line for a weight index (`*.index.json`) that is malformed, names a file outside its
    directory, or names anything but safetensors files (a pickle shard only with allow_pickle); else None.

    Args:
        opt_in: how the reader opts into pickle shards, for the line; None: it never reads them (checkpoints, ColossalAI's loader).
    """
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return f"{key}: {index} is not a weight index (a JSON object whose weight_map maps tensor names to file names)"
    names = sorted(set(weight_map.values()))
    problem = outside_problem(index.parent, key, names)
    if problem:
        return problem
    for name in names:
        if name.endswith(".safetensors") or (allow_pickle and name.endswith(PICKLE_SUFFIXES)):
            continue
        if name.endswith(PICKLE_SUFFIXES) and opt_in:
            return (f"{key}: {index} names the pickle shard {name!r}, which can run code when loaded, even with torch 2.5.1's "
                    f"weights_only=True ({CVE}); convert it to safetensors, or {opt_in} if you trust its source")
        return f"{key}: {index} names {_short_repr(name)}; only safetensors files in {index.parent} are read"
    return None


def weights_dir_problem(path: Path, allow_pickle: bool, key: str, opt_in: str = "set model.allow_pickle=true") -> str | None:
    """The refusal line for a model or adapter dir whose loading would read a file outside it, or (without the
    opt-in) unpickle: pickle-only weights, or a safetensors index naming a pickle shard; else None."""
    if not path.is_dir():
        return None
    index = path / SAFETENSORS_INDEX
    return (
        outside_problem(path, key)
        or (index_problem(index, key, allow_pickle, opt_in) if index.is_file() else None)
        or pickle_only_problem(path, allow_pickle, key, opt_in)
    )


def adapter_config_problem(path: Path, key: str) -> str | None:
    """The refusal line for a peft adapter dir whose adapter_config.json is not a LoRA config peft can build
    from (JSON object, peft_type LORA, r a positive whole number, lora_alpha a positive number, target_modules
    names); else None. Read before any model is built from it."""
    file = path / "adapter_config.json"
    fix = f"point {key} at an intact adapter dir"
    try:
        saved = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"{key}: {file} is not valid JSON ({str(err).splitlines()[0][:120] if str(err) else type(err).__name__}); {fix}"
    if not isinstance(saved, dict):
        return f"{key}: {file} holds a {type(saved).__name__}, not a peft adapter config; {fix}"
    r, alpha, targets = saved.get("r"), saved.get("lora_alpha"), saved.get("target_modules")
    number = (int, float)
    problems = [
        (saved.get("peft_type", "LORA") != "LORA", f"peft_type={_short_repr(saved.get('peft_type'))}, not LORA"),
        (not isinstance(r, int) or isinstance(r, bool) or r < 1, f"r={_short_repr(r)}, not a whole number >= 1"),
        (not isinstance(alpha, number) or isinstance(alpha, bool) or not 0 < alpha < float("inf"), f"lora_alpha={_short_repr(alpha)}, not a positive number"),
        (not (isinstance(targets, str) or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))), f"target_modules={_short_repr(targets)}, not module names"),
    ]
    bad = next((what for wrong, what in problems if wrong), None)
    return f"{key}: {file} has {bad}; {fix}" if bad else None


def pickle_only_problem(path: Path, allow_pickle: bool, key: str, opt_in: str | None = "set model.allow_pickle=true") -> str | None:
    """The refusal line for a dir whose only weights are pickle files, unless the user opted in; else None.

    Args:
        opt_in: how the reader opts in, for the line; None: it never unpickles (a checkpoint).
    """
    if allow_pickle or not path.is_dir() or has_safetensors(path):
        return None
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickled:
        return None
    return (
        f"{key}: {path} holds only pickle weights ({pickled[0]}), which can run code when loaded, even with "
        f"torch 2.5.1's weights_only=True ({CVE}); convert them to safetensors" + (f", or {opt_in} if you trust their source" if opt_in else "; a checkpoint is never unpickled")
    )


def cached_config_file(repo_id: str, revision: str = "") -> Path | None:
    """config.json of a hub id from the local hub cache (HF_HUB_CACHE / HF_HOME), without the network; None if absent."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision or None)
    except ValueError:  # huggingface_hub's stricter id rules (e.g. no `--`): not a cached hub model
        return None
    return Path(found) if isinstance(found, str) else None


def hub_unavailable_line(repo_id: str, revision: str, reason: str) -> str:
    """The one line for a hub id that is neither a local dir, nor in the hub cache, nor downloadable."""
    from huggingface_hub import constants

    at = f" at revision {revision}" if revision else ""
    why = "HF_HUB_OFFLINE is set" if hub_offline() else (reason.strip().splitlines() or ["unreachable"])[0][:160]
    return (
        f"model.name: '{repo_id}'{at} is no local directory and not in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
        f"and the hub cannot give it ({why}); log in (huggingface-cli login) and go online (unset HF_HUB_OFFLINE), "
        f"or download it to a local dir and pass that dir as model.name"
    )


def hub_offline() -> bool:
    """Whether huggingface_hub reads the cache alone (HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE
