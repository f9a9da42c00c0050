"""Fixes for transformers 4.51.3.

transformers 4.51.3 accepts bitsandbytes on CPU only with Intel's IPEX installed, although
bitsandbytes >= 0.45 ships its own CPU backend (it lists "cpu" in supported_torch_devices, and
quantizes, runs forward/backward and steps on CPU). transformers 4.53 dropped the IPEX requirement.
"""

from __future__ import annotations

import torch

from finetune.fixes.guard import VersionGuard

GUARD = VersionGuard("transformers", "4.51.3")


def _bnb_backend_available(raise_exception: bool = False) -> bool:
    """transformers' multi-backend check, trusting bitsandbytes' own list of devices it supports."""
    import bitsandbytes as bnb

    if "cpu" in getattr(bnb, "supported_torch_devices", set()):
        return True
    if raise_exception:
        raise RuntimeError(f"bitsandbytes {bnb.__version__} has no CPU backend; install the pinned bitsandbytes (requirements.txt)")
    return False


def apply(transformers_version: str | None = None) -> list[str]:
    """Let transformers quantize with bitsandbytes on CPU; a no-op on CUDA and on other transformers versions."""
    if torch.cuda.is_available() or not GUARD.matches(transformers_version):
        return []
    import transformers.integrations.bitsandbytes as hf_bnb

    hf_bnb._validate_bnb_multi_backend_availability = _bnb_backend_available
    return ["transformers.integrations.bitsandbytes._validate_bnb_multi_backend_availability"]
