"""train.loss_chunks: whether a run takes its causal-LM loss in chunks of tokens (finetune.chunked_loss), and how
many tokens a chunk holds. Read by config validation, the estimator and the run alike; no torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.architectures import architecture, model_type
from finetune.core.plugins import SPECS
from finetune.tasks import TASKS

if TYPE_CHECKING:
    from finetune.config import Config

# Tokens per chunk under train.loss_chunks=auto: a chunk's logits are 4-6 bytes x vocabulary per token under a frozen
# head (LoRA, QLoRA: one fp32 buffer, plus the half logits), 12 where the head trains (fp32 logits, log-softmax and
# gradient; 49k vocabulary: 0.6 GB), and larger chunks gain no speed on CPU or GPU.
DEFAULT_CHUNK_TOKENS = 1024
# Rows of a chunk's logits given to log_softmax at a time (finetune.chunked_loss): its output, this many rows of the
# vocabulary in fp32, is the one temporary beside the chunk's buffer.
LOG_SOFTMAX_ROWS = 64
AUTO, OFF = "auto", "off"


def explicit_chunk_tokens(setting: str) -> int | None:
    """The tokens per chunk a train.loss_chunks value names: a positive count, 0 for off, None for auto.

    Raises:
        ValueError: neither auto, off nor a positive whole number.
    """
    if setting == AUTO:
        return None
    if setting == OFF:
        return 0
    if not setting.isdigit() or int(setting) < 1:
        raise ValueError(setting)
    return int(setting)


def unavailable_reason(cfg: Config) -> str:
    """Why this run keeps the full-logits loss whatever train.loss_chunks says; '' where the chunked loss is exact."""
    task = TASKS.get(cfg.task)
    if task is None or task.classification or task.scalar_head:
        return f"task={cfg.task} has no language-model head (a classification head's logits are small)"
    spec = SPECS.get(cfg.plugin.name)
    refusal = spec.loss_chunks_refused(cfg.plugin.options) if spec is not None else ""
    if refusal:
        return f"plugin {cfg.plugin.name} keeps the full-logits loss: {refusal}"
    kind = model_type(cfg.model.name)
    if not architecture(kind).decoder_body:
        return f"{cfg.model.name} is {kind or 'of unknown type'}, whose forward this tool does not know to split into decoder and head (finetune.architectures: decoder_body)"
    return ""


def loss_chunks_problems(cfg: Config) -> list[str]:
    """The problem with train.loss_chunks: a value that is no setting, or chunks asked for where they cannot be exact."""
    try:
        tokens = explicit_chunk_tokens(cfg.train.loss_chunks)
    except ValueError:
        return [f"train.loss_chunks: must be auto, off or a positive number of tokens per chunk, got {cfg.train.loss_chunks!r}"]
    reason = unavailable_reason(cfg) if tokens else ""
    return [f"train.loss_chunks={tokens}: {reason}; set train.loss_chunks=auto or off"] if reason else []


def loss_chunk_tokens(cfg: Config) -> int:
    """Tokens per chunk of this run's causal-LM loss; 0: the model's own loss over the full logits."""
    try:
        tokens = explicit_chunk_tokens(cfg.train.loss_chunks)
    except ValueError:
        return 0
    if tokens == 0 or unavailable_reason(cfg):
        return 0
    return tokens or DEFAULT_CHUNK_TOKENS
