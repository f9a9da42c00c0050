"""Parallel strategies: one module per ColossalAI plugin, with everything only that plugin does at run time (its
hooks, its checkpoint IO, its deferred weight loading), on top of its torch-free declaration (finetune.core.plugins).

Adding a plugin is one module (a declaration and its runtime) and one `register(MyPlugin())`.
"""

from __future__ import annotations

from finetune.core.plugins import register_spec
from finetune.parallel.base import Plugin
from finetune.parallel.ddp import TorchDDP
from finetune.parallel.fsdp import TorchFSDP
from finetune.parallel.gemini import Gemini
from finetune.parallel.hybrid import HybridParallel
from finetune.parallel.zero import LowLevelZero

PLUGINS: dict[str, Plugin] = {}


def register(plugin: Plugin) -> Plugin:
    """Add (or replace) a plugin: its runtime here, its declaration among finetune.core.plugins.SPECS; returns it."""
    PLUGINS[plugin.name] = register_spec(plugin)
    return plugin


def unregister(name: str) -> None:
    """Remove a registered plugin (runtime and declaration)."""
    from finetune.core.plugins import SPECS

    del PLUGINS[name], SPECS[name]


for _plugin in (TorchDDP(), LowLevelZero(), Gemini(), TorchFSDP(), HybridParallel()):
    register(_plugin)
