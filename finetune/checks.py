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
    """Names of this rank's floating-point parameters that hold a NaN or an infinity (packed 4/8-bit ones are not read)."""
    with torch.no_grad():
        return [name for name, p in model.named_parameters() if p.is_floating_point() and p.numel() and not bool(torch.isfinite(p).all())]


def compare(before: dict, after: dict) -> dict[str, int]:
    """How many trainable and frozen parameter tensors changed (in any bit) between two fingerprints."""
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
