"""Where model and adapter weights come from, checked without torch: hub ids and pickle-only dirs.

A pickle weight file (`pytorch_model.bin`, `adapter_model.bin`) can run code when it is loaded: on the
pinned torch 2.5.1 even `torch.load(weights_only=True)` is bypassable (CVE-2025-32434, fixed in torch
2.6). Directories that hold only such files are refused unless the user opts in (model.allow_pickle).
"""

from __future__ import annotations

import re
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


def pickle_only_problem(path: Path, allow_pickle: bool, key: str, opt_in: str = "set model.allow_pickle=true") -> str | None:
    """The refusal line for a dir whose only weights are pickle files, unless the user opted in; else None."""
    if allow_pickle or not path.is_dir() or has_safetensors(path):
        return None
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickled:
        return None
    return (
        f"{key}: {path} holds only pickle weights ({pickled[0]}), which can run code when loaded, even with "
        f"torch 2.5.1's weights_only=True ({CVE}); convert them to safetensors, or {opt_in} if you trust their source"
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
