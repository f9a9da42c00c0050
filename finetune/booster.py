"""The ColossalAI Booster for a plugin setup: the registered plugin's constructor arguments, then its class built."""

from __future__ import annotations

from typing import Any

from finetune.parallel import PLUGINS


def plugin_kwargs(name: str, options: dict[str, Any], precision: str, max_grad_norm: float, on_cpu: bool) -> dict[str, Any]:
    """Constructor arguments for the named plugin: defaults, the user's options, then what we must set."""
    plugin = PLUGINS[name]
    return plugin.constructor_kwargs({**plugin.options, **options}, precision, max_grad_norm, on_cpu)


def build_booster(name: str, options: dict[str, Any], precision: str, max_grad_norm: float, custom_policy=None):
    """Build the ColossalAI Booster for a plugin setup (the process group must already exist).

    Args:
        custom_policy: a shardformer policy to shard the model with (None: ColossalAI's own).

    Returns:
        (booster, the ColossalAI plugin)
    """
    # Imported here, not at module level: importing colossalai costs 10-20 s on a small CPU machine.
    import torch
    from colossalai.booster import Booster
    from colossalai.booster import plugin as plugins

    spec = PLUGINS[name]
    kwargs = plugin_kwargs(name, options, precision, max_grad_norm, on_cpu=not torch.cuda.is_available())
    if custom_policy is not None:
        kwargs["custom_policy"] = custom_policy
    plugin = getattr(plugins, spec.class_name)(**kwargs)
    # No Booster mixed_precision: where the plugin does not own precision, the training step autocasts and
    # the optimizer scales fp16 losses (Plugin.after_boost).
    return Booster(plugin=plugin), plugin
