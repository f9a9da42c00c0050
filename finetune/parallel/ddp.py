"""TorchDDP at run time: every hook is the base runtime's (a full replica per rank).
"""

from __future__ import annotations

from finetune.core.plugins.ddp import TorchDDPSpec
from finetune.parallel.base import Plugin


class TorchDDP(TorchDDPSpec, Plugin):
    """PyTorch DDP: the base runtime as it is."""
