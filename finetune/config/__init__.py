"""Run configuration: dataclasses with defaults (the quickstart), YAML files, and `key=value` overrides.

    python finetune/train.py --config booster_configs/torch_ddp.yaml --config my_run.yaml train.max_steps=10

`--config` may repeat; later files win, and command-line overrides win over every file. Unknown keys
and values of the wrong type are rejected with one line that names the key (and the closest valid
one). This package imports no torch or ColossalAI, so bad input fails before any heavy work.

The package, by job: schema (the dataclasses, YAML and key=value parsing, the resolved config as plain data) and
validate (every problem with a config for a launch, asking the records); load_config parses, then validates.
"""

from __future__ import annotations

from finetune.config.schema import (
    BUILTIN_SOURCES,
    CHATTERBOT,
    TASKS,
    Config,
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    Plain,
    QuantizationConfig,
    SliceBound,
    Source,
    build_config,
    choices,
    config_keys,
    flatten,
    from_dict,
    help_text,
    parallel_plan,
    parse_args,
    parse_split_slice,
    to_dict,
    train_sources,
)
from finetune.config.validate import (
    LORA_INITS,
    load_config,
    model_source_problems,
    mutates_base,
    remote_code_problem,
    validate,
)

__all__ = ["BUILTIN_SOURCES", "CHATTERBOT", "Config", "ConfigError", "DataConfig", "LORA_INITS", "LoraConfig", "ModelConfig", "Plain", "QuantizationConfig", "SliceBound", "Source", "TASKS", "build_config", "choices", "config_keys", "flatten", "from_dict", "help_text", "load_config", "model_source_problems", "mutates_base", "parallel_plan", "parse_args", "parse_split_slice", "remote_code_problem", "to_dict", "train_sources", "validate"]  # fmt: skip
