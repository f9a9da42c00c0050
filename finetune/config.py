"""Run configuration: dataclasses with defaults (the quickstart), YAML files, and `key=value` overrides.

    python finetune/train.py --config booster_configs/torch_ddp.yaml --config my_run.yaml train.max_steps=10

`--config` may repeat; later files win, and command-line overrides win over every file. Unknown keys
and values of the wrong type are rejected with one line that names the key (and the closest valid
one). This module imports no torch or ColossalAI, so bad input fails before any heavy work.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import importlib.util
import math
import os
import re
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from finetune.architectures import NAMED_CONFIGS, architecture, config_value, known_model_names, max_positions, model_type
from finetune.core.layout import Plan
from finetune.core.plugins import SPECS
from finetune.errors import SHOWN_CHARS, FinetuneError, shown
from finetune.methods import METHODS as METHOD_RECORDS
from finetune.sources import adapter_config_problem, cached_config_file, hub_offline, hub_unavailable_line, is_hub_id, weights_dir_problem
from finetune.tasks import TASKS as TASK_REGISTRY

METHODS = tuple(METHOD_RECORDS)
TASKS = tuple(TASK_REGISTRY)
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
# The built-in sources a data.train_path may name (finetune.corpus reads them), each with the task its rows fit.
CHATTERBOT = "chatterbot-corpus"
BUILTIN_SOURCES = {CHATTERBOT: "instruction", f"{CHATTERBOT}:chat": "chat", f"{CHATTERBOT}:topics": "classification"}

TRUNCATION = ("truncate", "drop")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("constant", "linear", "cosine")
ATTENTION = ("auto", "eager", "sdpa", "flash_attention_2")
ON_NAN = ("stop", "skip")
FIT_CHECKS = ("error", "warn", "off")


def choices() -> dict[str, tuple[str, ...]]:
    """Every key whose value is one of a set of names, with the names it takes (a plugin's own named
    options are its Plugin.choices). validate checks them; the config reader keeps such values as written."""
    return {
        "task": TASKS,
        "method": METHODS,
        "plugin.name": tuple(sorted(SPECS)),  # read now: a plugin may be registered after import
        "model.attn_implementation": ATTENTION,
        "train.precision": PRECISIONS,
        "train.optimizer": OPTIMIZERS,
        "train.lr_scheduler": SCHEDULERS,
        "train.on_nan": ON_NAN,
        "train.fit_check": FIT_CHECKS,
        "data.truncation": TRUNCATION,
        "quantization.quant_type": ("nf4", "fp4"),
        "quantization.compute_dtype": ("auto", *PRECISIONS),
    }


class ConfigError(FinetuneError):
    """A configuration problem, stated in one line."""


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # a named config (see finetune/model.py), a local HF dir, a .gguf file, or a hub id (org/name)
    revision: str = ""  # hub ids: the branch, tag or commit to load; empty: main
    attn_implementation: str = "auto"  # auto (sdpa; eager where sdpa is wrong) | eager | sdpa | flash_attention_2 (CUDA only)
    trust_remote_code: bool = False  # only for local dirs whose code you trust
    allow_pickle: bool = False  # load model/adapter dirs with only pickle weights (pytorch_model.bin): they can run code (CVE-2025-32434)


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)  # empty: the architecture's default
    init_from: str = ""  # a peft adapter dir to start from (e.g. a finished run's final/), split to this run's layout; empty: a fresh adapter
    use_dora: bool = False  # DoRA: a trained magnitude vector per adapted layer beside the low-rank update (peft use_dora)
    use_rslora: bool = False  # rank-stabilised scale alpha/sqrt(r) instead of alpha/r (peft use_rslora)
    init: str = "default"  # adapter init (peft init_lora_weights): default | gaussian | pissa | pissa_niter_N | olora | loftq


@dataclass
class QuantizationConfig:
    """The frozen base model's weights under method=qlora (bitsandbytes)."""

    bits: int = 4  # 4 | 8
    quant_type: str = "nf4"  # nf4 | fp4 (4-bit only)
    double_quant: bool = True  # quantize the 4-bit scales too (about 0.4 bits/parameter less)
    compute_dtype: str = "auto"  # auto (= train.precision) | fp32 | bf16 | fp16
    skip_modules: list[str] = field(default_factory=list)  # kept in full precision; empty: lm_head and classification heads


@dataclass
class PluginConfig:
    name: str = "torch_ddp"  # a key of finetune.core.plugins.SPECS
    options: dict[str, Any] = field(default_factory=dict)  # written flat in YAML: plugin.bucket_cap_mb=50


# data.train_path: one source (a path), or a mixture: a list of paths, or in YAML a list of {path, weight, name}.
TrainPath = typing.Union[str, list]
SOURCE_KEYS = ("path", "weight", "name")


@dataclass
class DataConfig:
    train_path: TrainPath = "chatterbot-corpus"  # .json/.jsonl/.csv/.parquet file, or chatterbot-corpus[:chat|:topics] (finetune/corpus.py); a list: a mixture
    weights: list[float] = field(default_factory=list)  # a mixture's sampling weights, one per train_path entry; empty: equal
    eval_path: str = ""  # empty: hold out eval_fraction of train_path, split so no prompt (or text) is on both sides
    eval_fraction: float = 0.1
    split_slice: str = ""  # part of the training records: "500" (first 500), "10%" (first 10%), "100:300" (a range); empty: all
    max_length: int = 128  # tokens per sample
    truncation: str = "truncate"  # samples longer than max_length: truncate | drop (both counted)
    packing: bool = False  # causal-LM tasks: several samples per row, attention kept inside each sample
    max_eval_samples: int = 0  # 0: all; else a seeded sample of this many eval records (kept in file order)
    labels: list[str] = field(default_factory=list)  # classification: the label set in class-id order; empty: the training file's labels
    text_field: str = "text"  # classification field names
    text_pair_field: str = "text_pair"
    label_field: str = "label"
    cache: bool = True  # tokenized splits cached under $FINETUNE_CACHE/data (keyed by files, tokenizer, settings)


@dataclass(frozen=True)
class Source:
    """One training source of a run: its file, its sampling weight and the name its eval loss is logged under."""

    path: str
    weight: float
    name: str


def train_sources(cfg_data: DataConfig) -> list[Source]:
    """data.train_path (and data.weights) as the run's sources, in the order given; the name is the file's stem unless set."""
    entries = cfg_data.train_path if isinstance(cfg_data.train_path, list) else [cfg_data.train_path]
    entries = [e if isinstance(e, dict) else {"path": e} for e in entries]
    weights = cfg_data.weights or [e.get("weight", 1.0) for e in entries]
    return [Source(str(e["path"]), float(w), str(e.get("name") or _source_name(str(e["path"])))) for e, w in zip(entries, weights)]


def _source_name(path: str) -> str:
    return path if path in BUILTIN_SOURCES else Path(path).stem


@dataclass
class TrainConfig:
    max_steps: int = 60  # optimizer steps; 0: run `epochs` full epochs
    epochs: int = 1
    batch_size: int = 4  # per rank, per micro-step
    grad_accum_steps: int = 1
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    warmup_steps: int = 3
    max_grad_norm: float = 1.0  # 0: no clipping
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    seed: int = 42
    log_every: int = 1
    on_nan: str = "stop"  # a non-finite loss: stop (the last checkpoint stays good) | skip (drop that step's update)
    fit_check: str = "error"  # before weights load, the estimated per-rank peak vs free memory: error (stop, naming changes that fit) | warn | off


@dataclass
class EvalConfig:
    every_steps: int = 20  # 0: evaluate only before and after training
    batch_size: int = 8
    num_generation_prompts: int = 3  # fixed held-out prompts generated before and after training
    max_new_tokens: int = 40


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # save every N optimizer steps and at the last one; 0: no checkpoints (final/ is always written)
    keep_last: int = 2  # complete checkpoints kept; 0: keep all


# What training needs on every host; secrets (HF_TOKEN, AWS_*, ...) are left out on purpose.
FORWARD_ENV_DEFAULT = (
    "PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "CONDA_PREFIX", "HOME", "USER", "LOGNAME", "LANG", "LC_*", "TZ", "TMPDIR",
    "SSH_AUTH_SOCK", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_*", "NCCL_*", "GLOO_*", "TORCH_*", "PYTORCH_*",
    "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_CACHE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT",
    "TRANSFORMERS_*", "TOKENIZERS_PARALLELISM", "FINETUNE_*",
)
_ENV_PATTERN = re.compile(r"^[A-Za-z_*?][A-Za-z0-9_*?]*$")


@dataclass
class LaunchConfig:
    timeout_s: int = 1800  # collective timeout: a rank that waits longer on the others fails instead of hanging
    rank_logs: bool = True  # copy each rank's stdout/stderr into output_dir/logs/rank_N.log
    # What `colossalai run` may export to every host (names or globs): it puts them on each host's command line.
    forward_env: list[str] = field(default_factory=lambda: list(FORWARD_ENV_DEFAULT))


@dataclass
class LoggingConfig:
    tensorboard: bool = False  # scalars (loss, lr, grad norm, tokens/s, eval, memory) under output_dir/tensorboard/
    wandb: bool = False  # the same through wandb (installed separately; WANDB_MODE=offline needs no network)
    wandb_project: str = "colossal-finetune"


@dataclass
class Config:
    task: str = "instruction"
    method: str = "lora"
    output_dir: str = "outputs/quickstart"
    resume_from: str = ""  # latest (newest complete checkpoint in output_dir) | a checkpoint directory
    overwrite_output_dir: bool = False  # start afresh in an output_dir that holds another run
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    plugin: PluginConfig = field(default_factory=PluginConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def config_keys(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every valid dotted key with its declared type (plugin options come from the plugin registry)."""
    keys: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys.update(config_keys(hint, f"{prefix}{f.name}."))
        elif f.name != "options":
            keys[prefix + f.name] = hint
    return keys


def _plugin_option_keys() -> set[str]:
    return {f"plugin.{opt}" for spec in SPECS.values() for opt in spec.options}


def _closest(key: str, candidates) -> str:
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


class Plain(str):
    """The text of an unquoted YAML scalar, kept as written: its meaning depends on the key's declared type.

    YAML 1.1 would read `off`, `no`, `on`, `yes` as booleans and `0123` as an octal number, so a name
    (train.fit_check=off, a model.revision) would arrive changed. A string key takes the text; any other
    key takes what YAML 1.1 makes of it (`resolved`), as before: `true`, `yes`, `1e-3`, `.inf`, `0x10`.
    """

    def resolved(self) -> Any:
        """The value YAML 1.1 (yaml.safe_load) gives this text."""
        node = yaml.ScalarNode(_RESOLVER.resolve(yaml.ScalarNode, str(self), (True, False)), str(self))
        try:
            return yaml.constructor.SafeConstructor().construct_object(node)
        except yaml.YAMLError:  # `=` and `<<` resolve to YAML tags that make no value: the text stays text
            return str(self)


_RESOLVER = yaml.resolver.Resolver()
_PLAIN_TAG = "!finetune/plain"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# Values a config may hold after its aliases are expanded: a config has about a hundred keys and a few
# lists; a small file whose anchors nest (the "billion laughs") would otherwise expand exponentially.
YAML_MAX_VALUES = 100_000


class _ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader whose unquoted scalars load as Plain (typed later, by the key they set)."""

    def resolve(self, kind, value, implicit):
        tag = super().resolve(kind, value, implicit)
        return _PLAIN_TAG if kind is yaml.ScalarNode and implicit[0] and tag != _MERGE_TAG else tag


_ConfigLoader.add_constructor(_PLAIN_TAG, lambda loader, node: Plain(node.value))


def _expanded_size(root: yaml.Node) -> int:
    """How many values the node graph holds with every alias expanded; over YAML_MAX_VALUES (or a cycle) counts as over it."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    on_path: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value if isinstance(node, yaml.SequenceNode) else []
        if children_done:
            on_path.discard(id(node))
            sizes[id(node)] = min(YAML_MAX_VALUES + 1, 1 + sum(sizes[id(c)] for c in children))
            continue
        if id(node) in on_path:  # an alias inside its own anchor: infinitely deep
            return YAML_MAX_VALUES + 1
        on_path.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def load_yaml(text: str, where: str) -> Any:
    """A YAML document as config values (unquoted scalars as Plain), with aliases bounded by YAML_MAX_VALUES.

    Raises:
        yaml.YAMLError: not valid YAML.
        ConfigError: the aliases expand past the bound, or it nests too deep to read.
    """
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > YAML_MAX_VALUES:
            raise ConfigError(f"{where}: its aliases expand to more than {YAML_MAX_VALUES:,} values (or refer to themselves); write the values out")
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to read") from None
    finally:
        loader.dispose()


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the declared type, converting the forms YAML and the shell produce."""
    origin = typing.get_origin(hint)
    if hint == TrainPath:
        return _coerce_train_path(key, value)
    if isinstance(value, Plain) and hint is not str and origin is not list:
        value = value.resolved()
    if origin is list:
        if isinstance(value, str):
            value = [Plain(v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {shown(value)}")
        item = typing.get_args(hint)[0]
        return [_coerce(key, v, item) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {shown(value)}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {shown(value)}")
        try:
            number = float(value)  # YAML reads 1e-3 as a string; float() does not
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected a number, got {shown(value)}") from None
        if hint is int:
            if not math.isfinite(number) or number != int(number):
                raise ConfigError(f"{key}: expected a whole number, got {shown(value)}")
            if abs(number) >= 2**63:  # past any count or seed a run uses (torch's int64); keeps later lines short
                raise ConfigError(f"{key}: {shown(value)} is out of range (at most 2**63-1)")
            return int(number)
        return number
    if hint is str:
        if isinstance(value, Plain) and value.resolved() is None:
            value = None  # `key:` or `key: ~` in a file sets no string
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {shown(value)}")
        return str(value)
    raise AssertionError(f"unhandled type {hint} for {key}")


def _coerce_train_path(key: str, value: Any) -> str | list:
    """data.train_path: a path, a list of paths, or a list of {path, weight, name} mappings."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected a path or a list of paths (or of {{path, weight}} in YAML), got {shown(value)}")
    entries: list = []
    for entry in value:
        if isinstance(entry, dict):
            unknown = sorted(set(entry) - set(SOURCE_KEYS), key=str)
            if unknown or "path" not in entry:
                raise ConfigError(f"{key}: each mapping needs a path and may have {', '.join(SOURCE_KEYS[1:])}; got {shown(entry)}")
            source = {"path": _coerce(f"{key} path", entry["path"], str)}
            if "weight" in entry:
                source["weight"] = _coerce(f"{key} weight", entry["weight"], float)
            if "name" in entry:
                source["name"] = _coerce(f"{key} name", entry["name"], str)
            entries.append(source)
        elif isinstance(entry, str):
            entries.append(str(entry))
        else:
            raise ConfigError(f"{key}: expected paths (or {{path, weight}} mappings), got {shown(entry)}")
    return entries


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _read_yaml(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        tree = load_yaml(Path(path).read_text(encoding="utf-8"), f"--config {path}") or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML ({str(err).splitlines()[0][:SHOWN_CHARS]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys, got {type(tree).__name__}")
    return _flatten(tree)


def _parse_override(arg: str) -> tuple[str, Any]:
    key, sep, raw = arg.partition("=")
    if not sep or not key:
        raise ConfigError(f"{shown(arg)}: expected key=value (e.g. train.max_steps=10) or --config FILE")
    try:
        value = load_yaml(raw, shown(arg)) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def parse_args(argv: list[str]) -> list[tuple[str, str, Any]]:
    """Split argv into (source, key, value) settings in the order they apply."""
    settings: list[tuple[str, str, Any]] = []
    args = iter(argv)
    for arg in args:
        if arg == "--config" or arg.startswith("--config="):
            path = arg.partition("=")[2] if "=" in arg else next(args, None)
            if not path:
                raise ConfigError("--config needs a file path")
            settings += [(f"--config {path}", k, v) for k, v in _read_yaml(path).items()]
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {shown(arg)}: use --config FILE or key=value")
        else:
            settings.append(("command line", *_parse_override(arg)))
    return settings


def build_config(settings: list[tuple[str, str, Any]]) -> Config:
    """Apply (source, key, value) settings over the defaults, checking every key and value."""
    cfg = Config()
    keys = config_keys()
    plugin_keys = _plugin_option_keys()
    for source, key, value in settings:
        if key in keys:
            section, _, name = key.rpartition(".")
            target = getattr(cfg, section) if section else cfg
            setattr(target, name, _coerce(key, value, keys[key]))
        elif key in plugin_keys:
            cfg.plugin.options[key.split(".", 1)[1]] = value
        else:
            hint = _closest(key, list(keys) + sorted(plugin_keys))
            raise ConfigError(f"{source}: unknown config key {shown(key)}{hint}")
    # Plugin options are checked once the plugin is final: a later setting may change plugin.name.
    spec = SPECS.get(cfg.plugin.name)
    for opt, value in list(cfg.plugin.options.items()) if spec else []:
        if opt not in spec.options:
            raise ConfigError(f"plugin.{opt}: not an option of plugin '{cfg.plugin.name}' (its options: {', '.join(spec.options)})")
        cfg.plugin.options[opt] = _coerce(f"plugin.{opt}", value, type(spec.options[opt]))
    if spec:  # resolved once: from here on plugin.options holds every option of the plugin, defaults included
        cfg.plugin.options = {**spec.options, **cfg.plugin.options}
    return cfg


def from_dict(tree: dict[str, Any], source: str) -> Config:
    """A Config from plain data shaped like to_dict() (a checkpoint's record of its run), checked key by key."""
    return build_config([(source, key, value) for key, value in _flatten(tree).items()])


SliceBound = tuple[Fraction, bool]  # (value, is a percentage)
_BOUND = re.compile(r"^(\d+(?:\.\d+)?)(%?)$")


def parse_split_slice(spec: str) -> tuple[SliceBound | None, SliceBound | None]:
    """data.split_slice as (start, stop) bounds: "N" and "P%" are ":N" and ":P%"; "A:B" a range, either end optional.

    Raises:
        ValueError: the spelling is not one of these, a count is fractional, or a percentage is over 100.
    """
    start, sep, stop = spec.strip().rpartition(":") if ":" in spec else ("", "", spec.strip())
    bounds = []
    for text in (start.strip(), stop.strip()):
        if not text:
            bounds.append(None)
            continue
        match = _BOUND.match(text)
        if not match:
            raise ValueError(f"{shown(text)} is not a record count (500) or a percentage (10%)")
        value, percent = Fraction(match.group(1)), bool(match.group(2))
        if percent and value > 100:
            raise ValueError(f"{shown(text)} is over 100%")
        if not percent and value.denominator != 1:
            raise ValueError(f"{shown(text)} is not a whole number of records")
        bounds.append((value, percent))
    if bounds == [None, None]:
        raise ValueError("selects everything; leave data.split_slice empty for that")
    return bounds[0], bounds[1]


def choice_problems(key: str, value: str, allowed) -> list[str]:
    """A problem line when value is not one of allowed (with the closest one), else none."""
    if value in allowed:
        return []
    return [f"{key}: unknown value {shown(value)}{_closest(str(value), allowed)}; choose from {', '.join(allowed)}"]


def _named_problems(cfg: Config, names: dict[str, tuple[str, ...]], keys: tuple[str, ...]) -> list[str]:
    """choice_problems of these keys of choices(), read from cfg."""
    problems = []
    for key in keys:
        section, _, name = key.rpartition(".")
        problems += choice_problems(key, getattr(getattr(cfg, section) if section else cfg, name), names[key])
    return problems


def validate(cfg: Config, world_size: int, has_cuda: bool) -> list[str]:
    """Every problem with the configuration for this launch, each a line that names the fix."""
    unusable = _unusable_paths(cfg)
    if unusable:  # every later check would look these paths up, and the OS refuses them
        return unusable
    names = choices()
    problems = _named_problems(cfg, names, ("task", "method"))
    problems += _quantization_problems(cfg, has_cuda)
    problems += _named_problems(cfg, names, ("train.precision", "train.optimizer", "train.lr_scheduler", "model.attn_implementation", "plugin.name"))
    spec = SPECS.get(cfg.plugin.name)
    method = METHOD_RECORDS.get(cfg.method)
    if spec is not None:
        problems += [line for opt, allowed in spec.choices.items() for line in choice_problems(f"plugin.{opt}", cfg.plugin.options[opt], allowed)]
        if method and method.adapter and not spec.supports_lora:
            problems.append(f"method={cfg.method}: plugin '{cfg.plugin.name}' cannot hold LoRA adapters; use method=full or plugin.name=torch_ddp")
        elif method and method.quantized_base and spec.qlora_refusal:
            problems.append(f"method={cfg.method}: plugin '{cfg.plugin.name}' cannot hold quantized weights ({spec.qlora_refusal}); use torch_ddp, low_level_zero or hybrid_parallel with pp_size>1")
        if not has_cuda and not spec.runs_on_cpu:
            problems.append(f"plugin.name={cfg.plugin.name}: needs a CUDA GPU and none is present; on CPU use low_level_zero (stage 1/2) or torch_ddp")
        if method:
            problems += spec.problems(cfg, world_size, has_cuda)
        task = TASK_REGISTRY.get(cfg.task)
        if method and task and task.classification:
            problems += spec.classification_problems(cfg, world_size)
    if not has_cuda and cfg.train.precision == "fp16":
        problems.append("train.precision=fp16: needs a CUDA GPU (loss scaling); on CPU use bf16 or fp32")
    if not has_cuda and cfg.model.attn_implementation == "flash_attention_2":
        problems.append("model.attn_implementation=flash_attention_2: needs a CUDA GPU; on CPU use sdpa or eager")
    elif cfg.model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:  # transformers would refuse at model load
        problems.append("model.attn_implementation=flash_attention_2: the flash_attn package is not installed; "
                        "`pip install flash-attn --no-build-isolation` (it builds against this torch and CUDA), or use sdpa")
    for key in ("train.batch_size", "train.grad_accum_steps", "train.epochs", "train.log_every", "eval.batch_size", "lora.r", "data.max_length", "launch.timeout_s"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            problems.append(f"{key}: must be at least 1")
    problems += _named_problems(cfg, names, ("train.on_nan",))
    problems += [f"launch.forward_env: {shown(p)} is not a variable name or glob (letters, digits, _, *, ?)" for p in cfg.launch.forward_env if not _ENV_PATTERN.match(p)]
    problems += _named_problems(cfg, names, ("train.fit_check",))
    for key in ("train.max_steps", "train.warmup_steps", "eval.every_steps", "eval.num_generation_prompts", "data.max_eval_samples", "checkpoint.every_steps", "checkpoint.keep_last"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 0:
            problems.append(f"{key}: must not be negative")
    if not 0 <= cfg.lora.dropout < 1:
        problems.append(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout}")
    if not cfg.data.eval_path and not 0 < cfg.data.eval_fraction < 1:
        problems.append(f"data.eval_fraction: must be in (0, 1) when data.eval_path is empty, got {cfg.data.eval_fraction}")
    if cfg.train.lr <= 0:
        problems.append(f"train.lr: must be positive, got {cfg.train.lr}")
    problems += _data_problems(cfg)
    problems += _number_problems(cfg)
    problems += _model_file_problems(cfg)
    problems += _init_adapter_problems(cfg)
    problems += _lora_variant_problems(cfg)
    problems += tracking_problems(cfg)
    name = cfg.model.name
    # Named configs get the GPT-2 BPE tokenizer (50,257 tokens); a smaller vocabulary (Llama-2's 32,000)
    # cannot embed its ids: such configs are for `python -m finetune.estimate`, not for training.
    if name in NAMED_CONFIGS and NAMED_CONFIGS[name][1].get("vocab_size", 50257) < 50257:
        problems.append(f"model.name: {name} is a public config for the memory estimator, with no tokenizer here; train it from a local Hugging Face directory (model.name=/path/to/{name})")
    problems += _model_source_problems(cfg.model)
    if world_size < 1:
        problems.append(f"world size must be at least 1, got {world_size}")
    return problems


def _unusable_paths(cfg: Config) -> list[str]:
    """Paths no file can have on this system (a NUL character, a name past the OS limit): one line each, not an OSError later."""
    paths = [("model.name", cfg.model.name), ("data.eval_path", cfg.data.eval_path), ("lora.init_from", cfg.lora.init_from), ("resume_from", cfg.resume_from), ("output_dir", cfg.output_dir)]
    problems = []
    for key, path in [*paths, *(("data.train_path", s.path) for s in train_sources(cfg.data))]:
        try:
            os.stat(path)
        except ValueError:
            problems.append(f"{key}: {shown(path)} contains a NUL character, which no path can hold")
        except OSError as err:
            if err.errno == errno.ENAMETOOLONG:
                problems.append(f"{key}: {shown(path)} is longer than this system allows for a path or a file name")
    return problems


def _model_source_problems(cfg_model: ModelConfig) -> list[str]:
    """model.name given as a path or a hub id: it must exist (a hub id: cached, or fetched at build time) and not be pickle-only."""
    name, path = cfg_model.name, Path(cfg_model.name)
    if cfg_model.revision and not is_hub_id(name):
        return [f"model.revision: only for hub ids (org/name), and model.name={name} is not one; drop model.revision"]
    if name in known_model_names():
        return []
    if is_hub_id(name):
        config_file = cached_config_file(name, cfg_model.revision)
        if config_file is None:  # build_model downloads it, or refuses with the ways out when it cannot
            return [hub_unavailable_line(name, cfg_model.revision, "")] if hub_offline() else []
        path = config_file.parent
    elif not path.exists():
        known = known_model_names()
        return [f"model.name: {shown(name)} is not a named model{_closest(name, known)} ({', '.join(known)}), an existing directory or .gguf file, nor a hub id (org/name)"]
    elif path.is_dir() and not (path / "config.json").exists():
        return [f"model.name: {name} has no config.json; expected a Hugging Face model directory"]
    elif path.is_file() and path.suffix != ".gguf":
        return [f"model.name: {name} is a file but not a .gguf; give a model directory or a GGUF file"]
    problem = weights_dir_problem(path, cfg_model.allow_pickle, "model.name") or remote_code_problem(path / "config.json", name, cfg_model.trust_remote_code)
    return [problem] if problem else []


def remote_code_problem(config_file: Path, name: str, trust_remote_code: bool) -> str:
    """The refusal line for a model that only its own Python code can load (config.json auto_map for a model type
    transformers does not know) without model.trust_remote_code, else "": refused before transformers would ask on the terminal."""
    import json

    if trust_remote_code or not config_file.is_file():
        return ""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError):
        return ""  # the loader reports an unreadable config.json
    if not isinstance(config, dict) or not isinstance(config.get("auto_map"), dict):
        return ""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # only for dirs that ship code

    if config.get("model_type") in CONFIG_MAPPING_NAMES:
        return ""  # transformers has its own code for the type, and uses it without trust_remote_code
    return (
        f"model.name: {name} is a model type transformers does not know ({shown(config.get('model_type'))}) that only its own Python code "
        f"(config.json auto_map) can load; set model.trust_remote_code=true if you trust that code, or use a model transformers supports"
    )


def _init_adapter_problems(cfg: Config) -> list[str]:
    """lora.init_from must be a peft adapter dir whose rank, alpha and targets are this run's."""
    if not cfg.lora.init_from:
        return []
    if cfg.method in METHOD_RECORDS and not METHOD_RECORDS[cfg.method].adapter:
        return [f"lora.init_from is set but method={cfg.method} trains no adapter; use method=lora or drop lora.init_from"]
    path = Path(cfg.lora.init_from)
    problem = weights_dir_problem(path, cfg.model.allow_pickle, "lora.init_from")
    if problem:  # a link or index out of the dir, or pickle without the opt-in: before anything in it is read
        return [problem]
    if not (path / "adapter_config.json").is_file():
        return [f"lora.init_from: {path} is not a peft adapter dir (no adapter_config.json)"]
    if not (path / "adapter_model.safetensors").is_file() and not (path / "adapter_model.bin").is_file():  # a pickle-only one was refused above without the opt-in
        return [f"lora.init_from: {path} is not a peft adapter dir (no adapter_model.safetensors)"]
    problem = adapter_config_problem(path, "lora.init_from")
    if problem:
        return [problem]
    import json

    saved = json.loads((path / "adapter_config.json").read_text())
    targets = cfg.lora.target_modules or list(architecture(model_type(cfg.model.name)).lora_targets)
    for key, theirs, ours in (("r", saved.get("r"), cfg.lora.r), ("alpha", saved.get("lora_alpha"), cfg.lora.alpha)):
        if theirs != ours:
            return [f"lora.init_from: the adapter in {path} has {key}={theirs}, this run lora.{key}={ours}; set lora.{key}={theirs}"]
    if targets and sorted(saved.get("target_modules") or []) != sorted(targets):
        return [f"lora.init_from: the adapter in {path} adapts {sorted(saved.get('target_modules') or [])}, this run {sorted(targets)}; set lora.target_modules to match"]
    return []


def tracking_problems(cfg: Config) -> list[str]:
    """Trackers switched on whose package is not installed (checked before any heavy work)."""
    problems = []
    if cfg.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        problems.append("logging.tensorboard=true: the tensorboard package is not installed; pip install -r requirements.txt, or set logging.tensorboard=false")
    if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
        problems.append("logging.wandb=true: the wandb package is not installed; pip install wandb (WANDB_MODE=offline needs no network), or use logging.tensorboard=true")
    return problems


LORA_MAX_RANK = 4096  # above any hidden size trained here: a larger lora.r is a typo, not a choice


def _number_problems(cfg: Config) -> list[str]:
    """Numbers that pass their type check but make no sense: not finite, or out of range (each would fail late or silently)."""
    train, problems = cfg.train, []
    for key, value in (("train.lr", train.lr), ("train.max_grad_norm", train.max_grad_norm), ("train.weight_decay", train.weight_decay)):
        if not math.isfinite(value):
            problems.append(f"{key}: must be a finite number, got {value}")
    if train.max_grad_norm < 0:  # a negative norm would silently turn clipping off: 0 is the way to say so
        problems.append(f"train.max_grad_norm: must not be negative, got {train.max_grad_norm}; use 0 for no clipping")
    if train.weight_decay < 0:
        problems.append(f"train.weight_decay: must not be negative, got {train.weight_decay}")
    for key, value in (("train.seed", train.seed), ("eval.max_new_tokens", cfg.eval.max_new_tokens)):
        if value < 0:
            problems.append(f"{key}: must not be negative, got {value}")
    if train.seed >= 2**32:  # numpy's seed range
        problems.append(f"train.seed: must be below 2**32, got {train.seed}")
    if cfg.lora.alpha <= 0:
        problems.append(f"lora.alpha: must be positive, got {cfg.lora.alpha} (the adapter's scale is alpha/r)")
    hidden = config_value(cfg.model.name, ("hidden_size", "n_embd"))
    limit = min(LORA_MAX_RANK, hidden or LORA_MAX_RANK)
    if cfg.method in METHOD_RECORDS and METHOD_RECORDS[cfg.method].adapter and cfg.lora.r > limit:
        what = f"{cfg.model.name}'s hidden size" if hidden and hidden < LORA_MAX_RANK else "the largest rank accepted"
        problems.append(f"lora.r={cfg.lora.r}: above {what} ({limit}); use a rank such as 8 to 64")
    if not cfg.output_dir.strip():
        problems.append("output_dir: is empty; give the directory the run writes to")
    return problems


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def _model_file_problems(cfg: Config) -> list[str]:
    """What a model's own files say against this run: no tokenizer beside the weights, or data.max_length past its positions."""
    path = Path(cfg.model.name)
    if cfg.model.name not in known_model_names() and path.is_dir() and (path / "config.json").is_file():
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            return [f"model.name: {path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer into it (tokenizer.save_pretrained)"]
    limit = max_positions(cfg.model.name)
    if limit and cfg.data.max_length > limit:
        return [f"data.max_length={cfg.data.max_length}: above the {limit} positions of {cfg.model.name}; set data.max_length={limit} or less"]
    return []


def _quantization_problems(cfg: Config, has_cuda: bool) -> list[str]:
    """What is wrong with the quantization section, or with setting it for a method that does not quantize."""
    quant = cfg.quantization
    if cfg.method not in METHOD_RECORDS or not METHOD_RECORDS[cfg.method].quantized_base:
        if quant != QuantizationConfig():
            return [f"quantization.* is set but method={cfg.method} does not quantize; use method=qlora or drop the quantization keys"]
        return []
    problems = choice_problems("quantization.bits", str(quant.bits), ("4", "8"))
    problems += _named_problems(cfg, choices(), ("quantization.quant_type", "quantization.compute_dtype"))
    if quant.bits == 8 and (quant.quant_type, quant.double_quant) != ("nf4", True):
        problems.append("quantization.quant_type and quantization.double_quant apply to 4-bit only; drop them with quantization.bits=8")
    if not has_cuda and quant.compute_dtype == "fp16":
        problems.append("quantization.compute_dtype=fp16: half-precision matmuls need a CUDA GPU; on CPU use bf16 or fp32")
    return problems


def _data_problems(cfg: Config) -> list[str]:
    """What is wrong with the data settings for this task, model and plugin."""
    data = cfg.data
    problems = _named_problems(cfg, choices(), ("data.truncation",)) + _mixture_problems(data)
    sources = train_sources(data)
    for key, path in [("data.train_path", s.path) for s in sources] + [("data.eval_path", data.eval_path)]:
        if not path:
            continue
        if path in BUILTIN_SOURCES:
            if cfg.task in TASKS and BUILTIN_SOURCES[path] != cfg.task:
                fits = [name for name, task in BUILTIN_SOURCES.items() if task == cfg.task]
                problems.append(f"{key}={path} holds {BUILTIN_SOURCES[path]} records, not {cfg.task} records; use task={BUILTIN_SOURCES[path]}" + (f" or {key}={fits[0]}" if fits else ""))
        elif not Path(path).is_file():
            problems.append(f"{key}: file not found: {path}")
        elif Path(path).suffix.lower() not in DATA_SUFFIXES:
            problems.append(f"{key}: {path} is not a {', '.join(DATA_SUFFIXES)} file (or one of {', '.join(BUILTIN_SOURCES)})")
    if data.eval_path and Path(data.eval_path).is_file() and Path(sources[0].path).is_file() and Path(data.eval_path).resolve() == Path(sources[0].path).resolve():
        # every eval record would also be trained on, so eval loss would measure memorisation
        problems.append(f"data.eval_path: is data.train_path ({sources[0].path}); give a separate eval file, or leave data.eval_path empty to hold out data.eval_fraction")
    if data.split_slice:
        try:
            parse_split_slice(data.split_slice)
        except ValueError as err:
            problems.append(f"data.split_slice={shown(data.split_slice)}: {err}; use e.g. 500, 10% or 100:300")
    classification = cfg.task in TASK_REGISTRY and TASK_REGISTRY[cfg.task].classification
    if data.labels and not classification:
        problems.append("data.labels: only for task=classification; remove it")
    if len(set(data.labels)) != len(data.labels):
        problems.append(f"data.labels: lists a label twice: {data.labels}")
    if data.packing and classification:
        problems.append("data.packing=true: only for causal-LM tasks (instruction, summarization, chat); set it to false")
    kind = model_type(cfg.model.name)
    if architecture(kind).encoder and not classification:
        problems.append(f"model.name={cfg.model.name} is an encoder ({kind}) and only serves task=classification; pick a causal LM for task={cfg.task}")
    return problems


def _mixture_problems(data: DataConfig) -> list[str]:
    """What is wrong with a mixture of training sources: weights against sources, names, one eval file for all."""
    paths = data.train_path if isinstance(data.train_path, list) else [data.train_path]
    if any(isinstance(p, dict) and "weight" in p for p in paths) and data.weights:
        return ["data.weights: the data.train_path entries carry weights already; give them in one place"]
    if data.weights and len(data.weights) != len(paths):
        return [f"data.weights: {len(data.weights)} weight(s) for {len(paths)} data.train_path source(s); give one weight per source, in the same order"]
    sources = train_sources(data)
    problems = [f"data.weights: the weight of {s.path} is {s.weight:g}; weights must be positive (drop a source by removing it)" for s in sources if not (s.weight > 0 and math.isfinite(s.weight))]
    names = [s.name for s in sources]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"data.train_path: two sources are named {shown(name)} (a file listed twice, or files with the same stem); give each a name in YAML: {{path: ..., name: ...}}")
    if len(sources) > 1 and data.eval_path:
        problems.append("data.eval_path: one eval file cannot be split among the mixture's sources; leave it empty (each source holds out data.eval_fraction)")
    return problems


LORA_INITS = ("default", "gaussian", "pissa", "pissa_niter_N", "olora")  # peft's init_lora_weights (loftq needs a quantization config)


def mutates_base(init: str) -> bool:
    """Whether a lora.init moves part of each adapted weight into the adapter (PiSSA, OLoRA): the base left is a residual."""
    return init.startswith("pissa") or init == "olora"


def _lora_variant_problems(cfg: Config) -> list[str]:
    """lora.use_dora / use_rslora / init: set only with an adapter method, init one peft accepts, PiSSA/OLoRA on a float base."""
    variants = [f"lora.{key}" for key, on in (("use_dora", cfg.lora.use_dora), ("use_rslora", cfg.lora.use_rslora), ("init", cfg.lora.init != "default")) if on]
    method = METHOD_RECORDS.get(cfg.method)
    if variants and method and not method.adapter:
        return [f"{', '.join(variants)} set but method={cfg.method} trains no adapter; use method=lora or drop them"]
    init = cfg.lora.init
    if init not in LORA_INITS and not re.fullmatch(r"pissa_niter_[1-9][0-9]*", init):
        return [f"lora.init: unknown value {shown(init)}; choose from {', '.join(LORA_INITS)} (N: power iterations, e.g. pissa_niter_4)"]
    if not mutates_base(init):
        return []
    if method and method.quantized_base:
        return [f"lora.init={init} with method={cfg.method}: it writes a residual into the base weights, which a 4/8-bit base cannot hold; use method=lora"]
    kind = model_type(cfg.model.name)
    if architecture(kind).conv1d:
        return [f"lora.init={init} for {kind}: peft 0.13.2 decomposes its Conv1D (in x out) projections into adapters of the wrong shape; use lora.init=default or gaussian"]
    if cfg.lora.init_from:
        return [f"lora.init={init} with lora.init_from: the saved adapter replaces the initial one, leaving a residual base it does not belong to; drop one of them"]
    return []


def load_config(argv: list[str], world_size: int | None = None, has_cuda: bool = False) -> Config:
    """Parse argv into a validated Config, raising ConfigError with the first problem found."""
    cfg = build_config(parse_args(argv))
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    problems = validate(cfg, world_size, has_cuda)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data, plugin options written flat as in the YAML files."""
    tree = dataclasses.asdict(cfg)
    tree["plugin"] = {"name": cfg.plugin.name, **cfg.plugin.options}
    return tree


def parallel_plan(cfg: Config, world_size: int) -> Plan:
    """tp / pp / dp and micro-batches per step of this config on world_size processes (the one place they are derived)."""
    return SPECS[cfg.plugin.name].plan(cfg.plugin.options, cfg.train.batch_size, world_size)


def help_text() -> str:
    """All keys with their defaults, for --help."""
    defaults = _flatten(dataclasses.asdict(Config()))
    lines = [f"  {k} = {defaults.get(k)!r}" for k in config_keys()]
    for name, spec in SPECS.items():
        lines.append(f"  plugin '{name}': {spec.summary} Options: " + ", ".join(f"{k}={v!r}" for k, v in spec.options.items()))
    return "\n".join(lines)
