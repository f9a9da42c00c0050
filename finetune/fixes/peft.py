"""Fixes for peft 0.13.2.

peft 0.13.2 reads `MatmulLtState.memory_efficient_backward` when it puts LoRA on a bitsandbytes
8-bit layer; bitsandbytes 0.45 removed that attribute (it was always False by then), so peft raises
AttributeError. Fixed in peft 0.14; here the class attribute is given back with its old value.
"""

from __future__ import annotations

from finetune.fixes.guard import VersionGuard

GUARD = VersionGuard("peft", "0.13.2")


def apply(peft_version: str | None = None) -> list[str]:
    """Give bitsandbytes' MatmulLtState the attribute peft 0.13.2 reads (a no-op on other versions)."""
    if not GUARD.matches(peft_version):
        return []
    from bitsandbytes.autograd._functions import MatmulLtState

    if hasattr(MatmulLtState, "memory_efficient_backward"):
        return []
    MatmulLtState.memory_efficient_backward = False
    return ["bitsandbytes MatmulLtState.memory_efficient_backward"]
