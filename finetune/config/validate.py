"""Config validation: every problem with a configuration for a launch, each a line that names the fix, found
before any heavy work by asking the records (plugins, methods, tasks, architectures, model sources).

load_config is the one entry: parse (finetune.config), then validate; the first problem is a ConfigError.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import math
import os
import re
from pathlib import Path

from finetune.architectures import ESTIMATE_ONLY, architecture, config_value, known_model_names, max_positions, model_type
from finetune.config.schema import (
    BUILTIN_SOURCES,
    DATA_SUFFIXES,
    TASKS,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    PreferenceConfig,
    QuantizationConfig,
    build_config,
    choices,
    closest,
    parse_args,
    parse_split_slice,
    train_sources,
)
from finetune.core.loss_chunks import loss_chunk_tokens, loss_chunks_problems, unavailable_reason
from finetune.core.plugins import SPECS
from finetune.errors import shown
from finetune.methods import METHODS as METHOD_RECORDS
from finetune.sources import adapter_config_problem, cached_config_file, hub_offline, hub_unavailable_line, is_hub_id, weights_dir_problem
from finetune.tasks import TASKS as TASK_REGISTRY
from finetune.tasks.objectives import OBJECTIVES

ENV_PATTERN = re.compile(r"^[A-Za-z_*?][A-Za-z0-9_*?]*$")  # a launch.forward_env entry

def choice_problems(key: str, value: str, allowed) -> list[str]:
    """A problem line when value is not one of allowed (with the closest one), else none."""
    if value in allowed:
        return []
    return [f"{key}: unknown value {shown(value)}{closest(str(value), allowed)}; choose from {', '.join(allowed)}"]


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
            problems.append(f"method={cfg.method}: plugin '{cfg.plugin.name}' cannot hold quantized weights ({spec.qlora_refusal}); use torch_ddp, low_level_zero, torch_fsdp (4-bit) or hybrid_parallel with pp_size>1")
        if not has_cuda and not spec.runs_on_cpu:
            problems.append(f"plugin.name={cfg.plugin.name}: needs a CUDA GPU and none is present; on CPU use low_level_zero (stage 1/2) or torch_ddp")
        if method:
            problems += spec.problems(cfg, world_size, has_cuda)
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
    problems += [f"launch.forward_env: {shown(p)} is not a variable name or glob (letters, digits, _, *, ?)" for p in cfg.launch.forward_env if not ENV_PATTERN.match(p)]
    problems += _named_problems(cfg, names, ("train.fit_check", "train.cpu_allocator"))
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
    problems += preference_problems(cfg, names)
    problems += loss_chunks_problems(cfg)
    problems += _activation_offload_problems(cfg, world_size)
    name = cfg.model.name
    # Named configs get the GPT-2 BPE tokenizer; the public configs of other families are for
    # `python -m finetune.estimate`, not for training (random weights, and a tokenizer not theirs).
    if name in ESTIMATE_ONLY:
        problems.append(f"model.name: {name} is a public config for the memory estimator, with no tokenizer here; train it from a local Hugging Face directory (model.name=/path/to/{name})")
    problems += model_source_problems(cfg.model)
    if world_size < 1:
        problems.append(f"world size must be at least 1, got {world_size}")
    return problems


def _activation_offload_problems(cfg: Config, world_size: int) -> list[str]:
    """train.activation_offload hooks the step's own forward and backward; a pipeline's schedule runs them itself."""
    if not cfg.train.activation_offload or cfg.plugin.name not in SPECS:
        return []
    stages = SPECS[cfg.plugin.name].plan(cfg.plugin.options, cfg.train.batch_size, world_size).pp
    if stages > 1:
        return [f"train.activation_offload=true under pipeline parallelism ({stages} stages): the pipeline schedule runs forward and backward "
                "itself, outside the step that offloads; set train.activation_offload=false, or train without a pipeline"]
    return []


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


def model_source_problems(cfg_model: ModelConfig) -> list[str]:
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
        return [f"model.name: {shown(name)} is not a named model{closest(name, known)} ({', '.join(known)}), an existing directory or .gguf file, nor a hub id (org/name)"]
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


def preference_problems(cfg: Config, names: dict[str, tuple[str, ...]]) -> list[str]:
    """The `preference` section (task=reward reads none of it) and what a pair task cannot do yet."""
    task = TASK_REGISTRY.get(cfg.task)
    problems = _unread_preference_settings(cfg) if task is not None and task.pairs and task.scalar_head else _objective_problems(cfg, names)
    if task is not None and task.pairs and cfg.data.packing:
        problems.append(f"data.packing=true with task={cfg.task}: a pair's two sequences are scored whole, side by side; set data.packing=false")
    spec = SPECS.get(cfg.plugin.name)
    if task is not None and task.pairs and not task.scalar_head and spec is not None and not loss_chunk_tokens(cfg):
        problems += spec.unchunked_pair_problems(cfg, unavailable_reason(cfg))
    return problems


def _unread_preference_settings(cfg: Config) -> list[str]:
    """The preference settings a reward model's run sets: its Bradley-Terry loss reads none."""
    defaults = PreferenceConfig()
    changed = [f"preference.{f.name}" for f in dataclasses.fields(defaults) if getattr(cfg.preference, f.name) != getattr(defaults, f.name)]
    if not changed:
        return []
    return [f"{', '.join(changed)}: task={cfg.task} trains with the Bradley-Terry loss, which reads no preference setting; drop {'it' if len(changed) == 1 else 'them'}"]


def _objective_problems(cfg: Config, names: dict[str, tuple[str, ...]]) -> list[str]:
    """`preference.loss` and its settings: a known objective, numbers in range, no setting the objective ignores."""
    settings, problems = cfg.preference, _named_problems(cfg, names, ("preference.loss",))
    for key in ("beta", "label_smoothing", "simpo_gamma", "orpo_lambda"):
        if not math.isfinite(getattr(settings, key)):
            problems.append(f"preference.{key}: must be a finite number, got {getattr(settings, key)}")
    if problems:
        return problems
    if settings.beta <= 0:
        problems.append(f"preference.beta: must be positive, got {settings.beta}")
    if not 0 <= settings.label_smoothing < 0.5:
        problems.append(f"preference.label_smoothing: must be in [0, 0.5), got {settings.label_smoothing}")
    if settings.orpo_lambda < 0:
        problems.append(f"preference.orpo_lambda: must not be negative, got {settings.orpo_lambda}")
    objective, defaults = OBJECTIVES[settings.loss], PreferenceConfig()
    for key in ("label_smoothing", "simpo_gamma", "orpo_lambda"):
        if getattr(settings, key) != getattr(defaults, key) and key not in objective.settings:
            problems.append(f"preference.{key}: preference.loss={settings.loss} does not use it; drop it or choose an objective that does")
    return problems


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
