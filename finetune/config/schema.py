"""The config schema and its parsing: dataclasses with defaults (the quickstart), YAML files, and `key=value`
overrides, each key and value checked as it is read (finetune.config has the overview)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from finetune.core.layout import Plan
from finetune.core.plugins import SPECS
from finetune.errors import SHOWN_CHARS, FinetuneError, shown
from finetune.methods import METHODS as METHOD_RECORDS
from finetune.tasks import TASKS as TASK_REGISTRY
from finetune.tasks import batch_rows
from finetune.tasks.objectives import OBJECTIVES

TASKS = tuple(TASK_REGISTRY)
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
# The built-in sources a data.train_path may name (finetune.corpus reads them), each with the task its rows fit.
CHATTERBOT = "chatterbot-corpus"
BUILTIN_SOURCES = {CHATTERBOT: "instruction", f"{CHATTERBOT}:chat": "chat", f"{CHATTERBOT}:topics": "classification", f"{CHATTERBOT}:preference": "preference"}

TRUNCATION = ("truncate", "drop")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("constant", "linear", "cosine")
ATTENTION = ("auto", "eager", "sdpa", "flash_attention_2")
ON_NAN = ("stop", "skip")
CPU_ALLOCATORS = ("fast", "exact")  # finetune.distributed.allocate_for_steps reads it
FIT_CHECKS = ("error", "warn", "off")


def choices() -> dict[str, tuple[str, ...]]:
    """Every key whose value is one of a set of names, with the names it takes (a plugin's own named
    options are its Plugin.choices). validate checks them; the config reader keeps such values as written."""
    return {
        "task": TASKS,
        "method": tuple(METHOD_RECORDS),  # read when asked: a method registered later is a choice too
        "plugin.name": tuple(sorted(SPECS)),  # read now: a plugin may be registered after import
        "model.attn_implementation": ATTENTION,
        "train.precision": PRECISIONS,
        "train.optimizer": OPTIMIZERS,
        "train.lr_scheduler": SCHEDULERS,
        "train.on_nan": ON_NAN,
        "train.fit_check": FIT_CHECKS,
        "train.cpu_allocator": CPU_ALLOCATORS,
        "data.truncation": TRUNCATION,
        "quantization.quant_type": ("nf4", "fp4"),
        "quantization.compute_dtype": ("auto", *PRECISIONS),
        "preference.loss": tuple(OBJECTIVES),
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
    train_path: TrainPath = "chatterbot-corpus"  # .json/.jsonl/.csv/.parquet file, or chatterbot-corpus[:chat|:topics|:preference] (finetune/corpus.py); a list: a mixture
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
    # Causal LMs: the head and cross-entropy in chunks of this many tokens, only where labels count (no batch x tokens x
    # vocab logits): auto (1024 where exact: torch_ddp, low_level_zero, torch_fsdp) | off | N tokens per chunk
    loss_chunks: str = "auto"
    # The tensors autograd saves for backward wait in host memory and come back in backward (finetune.activation_offload;
    # pinned, copied on a side stream on CUDA); not under a pipeline, whose schedule runs forward and backward itself
    activation_offload: bool = False
    seed: int = 42
    log_every: int = 1
    on_nan: str = "stop"  # a non-finite loss: stop (the last checkpoint stays good) | skip (drop that step's update)
    fit_check: str = "error"  # before weights load, the estimated per-rank peak vs free memory: error (stop, naming changes that fit) | warn | off
    # CPU runs only (no effect on CUDA): fast (the steps' activations reuse glibc's heap; RSS then includes freed
    # memory the heap keeps) | exact (every block of 256 KiB or more mapped and returned: RSS follows the live tensors)
    cpu_allocator: str = "fast"


@dataclass
class PreferenceConfig:
    """task=preference: the objective and its settings (formulas: docs/preference.md)."""

    loss: str = "dpo"  # dpo | ipo | hinge | simpo | orpo
    beta: float = 0.1  # the reward scale (DPO, IPO's 1/(2 beta) target, hinge, SimPO; ORPO: rewards as reported)
    label_smoothing: float = 0.0  # DPO only: conservative DPO's label-flip probability, in [0, 0.5)
    simpo_gamma: float = 0.5  # SimPO only: the target reward margin
    orpo_lambda: float = 0.1  # ORPO only: weight of the odds-ratio term beside the SFT loss on chosen


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
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
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
    return {f"plugin.{opt}" for spec in SPECS.values() for opt in [*spec.options, *spec.renamed_options]}


def closest(key: str, candidates) -> str:
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


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config data ({"train": {"lr": 1e-4}}) as dotted keys ({"train.lr": 1e-4}), the form build_config reads."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
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
    return flatten(tree)


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
            hint = closest(key, list(keys) + sorted(plugin_keys))
            raise ConfigError(f"{source}: unknown config key {shown(key)}{hint}")
    # Plugin options are checked once the plugin is final: a later setting may change plugin.name.
    spec = SPECS.get(cfg.plugin.name)
    for opt, value in list(cfg.plugin.options.items()) if spec else []:
        if opt in spec.renamed_options:
            # Set to off (as every config written before the rename records it) it means what the defaults mean.
            if str(value).lower() in ("false", "", "0", "none"):
                del cfg.plugin.options[opt]
                continue
            raise ConfigError(f"plugin.{opt}: renamed; use {spec.renamed_options[opt]}")
        if opt not in spec.options:
            raise ConfigError(f"plugin.{opt}: not an option of plugin '{cfg.plugin.name}' (its options: {', '.join(spec.options)})")
        cfg.plugin.options[opt] = _coerce(f"plugin.{opt}", value, type(spec.options[opt]))
    if spec:  # resolved once: from here on plugin.options holds every option of the plugin, defaults included
        cfg.plugin.options = {**spec.options, **cfg.plugin.options}
    return cfg


def from_dict(tree: dict[str, Any], source: str) -> Config:
    """A Config from plain data shaped like to_dict() (a checkpoint's record of its run), checked key by key."""
    return build_config([(source, key, value) for key, value in flatten(tree).items()])


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


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data, plugin options written flat as in the YAML files."""
    tree = dataclasses.asdict(cfg)
    tree["plugin"] = {"name": cfg.plugin.name, **cfg.plugin.options}
    return tree


def parallel_plan(cfg: Config, world_size: int) -> Plan:
    """tp / pp / dp and micro-batches per step of this config on world_size processes (the one place they are derived)."""
    return SPECS[cfg.plugin.name].plan(cfg.plugin.options, batch_rows(cfg.task, cfg.train.batch_size), world_size)


def help_text() -> str:
    """All keys with their defaults, for --help."""
    defaults = flatten(dataclasses.asdict(Config()))
    lines = [f"  {k} = {defaults.get(k)!r}" for k in config_keys()]
    for name, spec in SPECS.items():
        lines.append(f"  plugin '{name}': {spec.summary} Options: " + ", ".join(f"{k}={v!r}" for k, v in spec.options.items()))
    return "\n".join(lines)
