"""Fixes for bitsandbytes 0.50.2.

On CPUs with AVX512-BF16: the first forward of a 4-bit layer in eval mode without grad repacks its weight
into an inference-only layout and keeps it. Every later forward, in training too, then takes the
inference kernel, which has no backward: training after an evaluation fails ("a view of a leaf Variable
... in-place") or loses the gradient through the layer. The fix is per model: model.load_quantized calls
`keep_4bit_weights_trainable` on each quantized model it loads.
"""

from __future__ import annotations

import torch

from finetune.fixes.guard import VersionGuard

GUARD = VersionGuard("bitsandbytes", "0.50.2")


def keep_4bit_weights_trainable(model: torch.nn.Module, bitsandbytes_version: str | None = None) -> int:
    """Turn off bitsandbytes' CPU inference repacking in the model's 4-bit layers; return how many."""
    if torch.cuda.is_available() or not GUARD.matches(bitsandbytes_version):
        return 0
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)
