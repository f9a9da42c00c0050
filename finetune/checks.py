"""Sanity checks on parameters: did training touch what it should, and only that, on every rank alike."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn


def tensor_digest(tensor: torch.Tensor) -> str:
    """Hash of a tensor's bytes: equal digests mean bit-identical tensors (quantized ones included)."""
    data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy()
    return hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()


def fingerprints(model: nn.Module) -> dict[str, tuple[bool, str]]:
    """Per parameter: (trainable, digest of its bytes), cheap enough to take before and after training."""
    with torch.no_grad():
        return {name: (p.requires_grad, tensor_digest(p)) for name, p in model.named_parameters()}


def non_finite_parameters(model: nn.Module) -> list[str]:
    """Names of this rank's floating-point parameters that hold a NaN or an infinity (packed 4/8-bit ones are not read:
    stored as floats for FSDP, their bytes are not float numbers)."""
    from finetune.quantization import is_quantized

    with torch.no_grad():
        return [name for name, p in model.named_parameters() if p.is_floating_point() and p.numel() and not is_quantized(p) and not bool(torch.isfinite(p).all())]


def refuse_non_finite(model: nn.Module, cfg, resume) -> None:
    """Once every weight is loaded (pretrained, lora.init_from, a resumed checkpoint), on every rank: none may be NaN or inf.

    Such a model's loss is NaN from the first step, and its evals would measure nothing.

    Raises:
        ModelError: some rank holds a non-finite weight; the line names the source (cfg: the run's Config; resume: its checkpoint or None).
    """
    from finetune.model import ModelError

    found: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(found, non_finite_parameters(model)[:3])  # every rank raises alike
    names = sorted({name for part in found for name in part})
    if not names:
        return
    if resume:
        source = f"resume_from: the checkpoint {resume}"
    elif cfg.lora.init_from and any("lora_" in name for name in names):
        source, names = f"lora.init_from: the adapter in {cfg.lora.init_from}", [name for name in names if "lora_" in name]
    else:
        source = f"model.name: the weights of {cfg.model.name}"
    raise ModelError(f"{source} hold NaN or infinite values ({', '.join(names[:2])}{' and more' if len(names) > 2 else ''}); a model with them gives NaN from the first step: use intact weights")


def compare(before: dict | None, after: dict | None) -> dict[str, int | bool]:
    """How many trainable and frozen parameter tensors changed (in any bit) between two fingerprints; None: not taken (the plugin says why)."""
    if before is None or after is None:
        return {"skipped": True}
    counts = {"trainable_tensors": 0, "trainable_changed": 0, "frozen_tensors": 0, "frozen_changed": 0}
    for name, (trainable, digest) in before.items():
        kind = "trainable" if trainable else "frozen"
        counts[f"{kind}_tensors"] += 1
        counts[f"{kind}_changed"] += digest != after[name][1]
    return counts


def replica_digests(model: nn.Module) -> list[str]:
    """SHA-256 of this rank's parameters, gathered from every rank (equal digests: identical replicas)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            digest.update(name.encode())
            digest.update(tensor_digest(p).encode())
    gathered: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(gathered, digest.hexdigest())
    return gathered
