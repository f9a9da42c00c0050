"""Load what a run trained, for inference (finetune.chat, generate, serve, evaluate): one loader for every source.

A source (RUN) is a run dir (its final/, else its newest checkpoint), its final/, a checkpoint dir
(checkpoints/step_N), or a model name as training's model.name takes it (a named config, a local HF dir such
as an exported model, a .gguf file, a hub id). The model is built by the one model factory
(finetune.model.build_model); a LoRA adapter goes onto it with peft, unmerged; full fine-tuned weights are
read by the one weights reader (finetune.export_source.with_full_weights). A run's config cannot opt into
running code or unpickling: as for export, only the command's own --trust-remote-code and --allow-pickle
do (finetune.export_source.locate checks the weights dir before anything reads it). Weights are held in bf16
on CUDA, in fp32 on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from finetune.architectures import NAMED_CONFIGS
from finetune.config import ModelConfig, model_source_problems
from finetune.config.schema import TrainConfig
from finetune.errors import FinetuneError
from finetune.export_source import OPT_INS, head_labels, is_run_source, locate, with_full_weights
from finetune.model import build_model
from finetune.tasks import TASKS, DataError, LanguageModelingTask, Task, build_task
from finetune.tasks.base import text_field
from finetune.tasks.chat import DEFAULT_CHAT_TEMPLATE, checked_messages


class InferenceError(FinetuneError):
    """The model cannot be used as asked."""


@dataclass
class Loaded:
    """A model ready for inference: in eval mode on its device, with the tokenizer and task it was trained with."""

    source: str  # what the user named
    model: nn.Module  # a peft model when an adapter is applied (unmerged)
    tokenizer: object
    task: Task  # the run's task; for a plain model, the task asked for (default: instruction)
    device: torch.device

    @property
    def context_window(self) -> int:
        """The most tokens (prompt and completion) the model's positions cover."""
        config = self.model.config
        return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or self.tokenizer.model_max_length)


def inference_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def held_dtype(device: torch.device) -> str:
    """What weights are held in for inference: bf16 on CUDA, fp32 on the CPU (bf16 matmuls are slow there)."""
    return "bf16" if device.type == "cuda" else "fp32"


@dataclass
class Source:
    """What a source names, read and checked before any model is built (open_source)."""

    name: str  # what the user named
    task: Task
    cfg: object | None  # a run's Config; None: a plain model
    weights: Path | None  # a run's weights dir (final/ or a checkpoint's model/)
    flags: frozenset[str]
    command: str

    @property
    def adapter(self) -> bool:
        """Whether the source is a LoRA adapter, put onto its base."""
        return self.weights is not None and (self.weights / "adapter_config.json").is_file()

    @property
    def base(self) -> tuple[str, int | None]:
        """Which base model it needs: the model name, and the seed that initialises a named config (None: pretrained)."""
        name = self.cfg.model.name if self.cfg is not None else self.name
        seed = self.cfg.train.seed if self.cfg is not None else TrainConfig().seed
        return name, seed if name in NAMED_CONFIGS else None


def open_source(name: str, flags: set[str] = frozenset(), command: str = "generate", task_name: str | None = None) -> Source:
    """The source `name` (module docstring) with its task, checked before anything reads its weights.

    Args:
        flags: the command's opt-ins (OPT_INS).
        command: the command reading it, for error lines.
        task_name: the task of a plain model (a run has its own; asking another of a run is an error).
    """
    path = Path(name)
    if is_run_source(path):
        cfg, weights = locate(path, flags, command)
        if task_name and task_name != cfg.task:
            raise InferenceError(f"--task {task_name}: {name} was trained for task {cfg.task}")
        check_model_source(cfg.model)
        return Source(name, build_task(cfg.task, cfg.data, head_labels(cfg, weights, InferenceError) or ()), cfg, weights, frozenset(flags), command)
    task = TASKS[task_name or "instruction"]()
    if task.classification or task.scalar_head:
        raise InferenceError(f"--task {task.name}: a plain model has no trained {task.name} head; name a {task.name} run or checkpoint")
    check_model_source(ModelConfig(name=name, **{key: flag in flags for flag, key in OPT_INS.items()}))
    return Source(name, task, None, None, frozenset(flags), command)


def check_model_source(cfg_model: ModelConfig) -> None:
    """Refuse a base model as training's config check does: unknown, pickle-only or needing its own code without the opt-in."""
    problems = model_source_problems(cfg_model)
    if problems:
        raise InferenceError(problems[0])


def load(source: Source, device: torch.device | None = None) -> Loaded:
    """Build the model of an opened source for inference (module docstring), in eval mode on `device` (default: inference_device)."""
    device = device or inference_device()
    model, tokenizer = build_base(source, device)
    if source.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(source.weights))  # unmerged: the base stays as it is
    elif source.cfg is not None:
        model = with_full_weights(model, source.weights, source.cfg.model.name, source.command)
    return ready(source, model, run_tokenizer(source, tokenizer), device)


def build_base(source: Source, device: torch.device) -> tuple[nn.Module, object]:
    """The base model a source needs (Source.base) and its tokenizer, through the model factory, held in held_dtype."""
    if source.cfg is not None:
        return build_model(source.cfg.model, source.cfg.train.seed, labels=source.task.labels_or_none, dtype=held_dtype(device))
    cfg_model = ModelConfig(name=source.name, **{key: flag in source.flags for flag, key in OPT_INS.items()})
    return build_model(cfg_model, TrainConfig().seed, dtype=held_dtype(device))  # a named config: the default seed's init, as a run's base


def run_tokenizer(source: Source, base_tokenizer):
    """The tokenizer a source was trained with: final/ holds the run's own (its chat template included); else the base's."""
    if source.weights is None or not (source.weights / "tokenizer_config.json").is_file():
        tokenizer = base_tokenizer
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(source.weights), trust_remote_code=False)
    source.task.prepare_tokenizer(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def ready(source: Source, model: nn.Module, tokenizer, device: torch.device) -> Loaded:
    """The model in eval mode on `device`, with what inference needs beside it."""
    model.to(device).eval()
    return Loaded(source.name, model, tokenizer, source.task, device)


def check_generates(source: Source) -> None:
    """Refuse a source whose model does not generate text (a classifier)."""
    if not isinstance(source.task, LanguageModelingTask) or source.task.scalar_head:
        raise InferenceError(f"{source.command}: {source.name} is a {source.task.name} model; it scores texts but does not generate (use finetune.evaluate)")


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """A conversation's prompt for the next assistant turn: the tokenizer's chat template, else the chat task's default."""
    template = None if tokenizer.chat_template else DEFAULT_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True)


def text_ids(tokenizer, text: str) -> list[int]:
    """A plain prompt: a user message in the chat template when the tokenizer has one, else the text to continue."""
    if tokenizer.chat_template:
        return chat_ids(tokenizer, [{"role": "user", "content": text}])
    return tokenizer(text, add_special_tokens=False)["input_ids"]


ROW_LAYOUTS = "{messages: [{role, content}, ...]}, {prompt}, or the run's task layout"


def prompt_record(task: Task, row: dict, where: str) -> tuple[str, object]:
    """One input row (an object, as finetune.data.read_rows gives it) checked before any model is built:
    ("messages", the conversation), ("prompt", its text), or ("record", a record of the run's task)."""
    if "messages" in row:
        return "messages", checked_messages(row, where)
    if "prompt" in row:
        return "prompt", text_field(row, "prompt", where)
    if not isinstance(task, LanguageModelingTask):
        raise DataError(f"{where}: expected {ROW_LAYOUTS}")
    return "record", task.check_prompt(row, where)


def prompt_ids(loaded: Loaded, prompt: tuple[str, object]) -> list[int]:
    """The token ids of a checked prompt (prompt_record)."""
    layout, value = prompt
    if layout == "messages":
        return chat_ids(loaded.tokenizer, value)
    if layout == "prompt":
        return text_ids(loaded.tokenizer, value)
    return loaded.task.prompt_ids(loaded.tokenizer, value)
