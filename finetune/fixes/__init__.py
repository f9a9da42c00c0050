"""Fixes for the pinned stack's upstream bugs: one module per library, each with one version guard.

    torch.py         inductor's compile workers (applied on import: import this package before colossalai);
                     sub-group collective timeouts (set by distributed.launch with launch.timeout_s);
                     list all_to_all on gloo (sequence parallelism on CPU)
    colossalai.py    the CPU path of ColossalAI 0.5.0, and its bugs on every device
    transformers.py  bitsandbytes on CPU refused without IPEX
    peft.py          a bitsandbytes attribute peft 0.13.2 reads
    bitsandbytes.py  4-bit CPU inference repacking (per model: model.load_quantized applies it)
    glibc.py         freed memory that glibc keeps resident (called where memory is freed, with its thresholds)

`apply()` applies every process-wide fix once; every entry point that trains or loads a model for training
calls it at start-up through distributed.launch (train.py, bench/, tests/deferred_ranks.py); code that
builds quantized models without a process group (tests) calls it itself.
"""

from __future__ import annotations

from finetune.fixes import torch as _torch  # noqa: F401  (first: its import stops inductor's compile workers)
from finetune.fixes import colossalai, peft, transformers


def apply() -> list[str]:
    """Apply every process-wide fix (idempotent; raises UnsupportedVersion for a ColossalAI it was not written for); return what was fixed."""
    return [*_torch.apply(), *colossalai.apply(), *transformers.apply(), *peft.apply()]
