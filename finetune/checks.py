"""Sanity checks on parameters: did training touch what it should, and only that, on every rank alike."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn


def fingerprints(model: nn.Module) -> dict[str, tuple[bool, float, float]]:
    """Per parameter: (trainable, sum, sum of squares) in float64, cheap enough to take before and after."""
    with torch.no_grad():
        return {
            name: (p.requires_grad, p.double().sum().item(), p.double().square().sum().item())
            for name, p in model.named_parameters()
        }


def compare(before: dict, after: dict) -> dict[str, int]:
    """How many trainable and frozen parameter tensors changed between two fingerprints."""
    counts = {"trainable_tensors": 0, "trainable_changed": 0, "frozen_tensors": 0, "frozen_changed": 0}
    for name, (trainable, *values) in before.items():
        kind = "trainable" if trainable else "frozen"
        counts[f"{kind}_tensors"] += 1
        counts[f"{kind}_changed"] += tuple(values) != tuple(after[name][1:])
    return counts


def replica_digests(model: nn.Module) -> list[str]:
    """SHA-256 of this rank's parameters, gathered from every rank (equal digests: identical replicas)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    gathered: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(gathered, digest.hexdigest())
    return gathered
