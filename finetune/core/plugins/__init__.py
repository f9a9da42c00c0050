"""Every plugin's declaration, by name: what config validation, the estimator and reports ask (no torch).

A plugin's runtime (finetune.parallel) subclasses its declaration; finetune.parallel.register puts it here too.
"""

from __future__ import annotations

from finetune.core.plugins.base import PluginSpec
from finetune.core.plugins.ddp import TorchDDPSpec
from finetune.core.plugins.fsdp import TorchFSDPSpec
from finetune.core.plugins.gemini import GeminiSpec
from finetune.core.plugins.hybrid import HybridParallelSpec
from finetune.core.plugins.zero import LowLevelZeroSpec

SPECS: dict[str, PluginSpec] = {spec.name: spec for spec in (TorchDDPSpec(), LowLevelZeroSpec(), GeminiSpec(), TorchFSDPSpec(), HybridParallelSpec())}


def register_spec(spec: PluginSpec) -> PluginSpec:
    """Add (or replace) a plugin's declaration; returns it."""
    SPECS[spec.name] = spec
    return spec
