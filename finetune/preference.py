"""Preference training at run time: the log-probabilities of a batch of pairs, the objective's loss, and its metrics.

A pair batch (finetune.data.collate) holds rows 2i (chosen) and 2i+1 (rejected) of pair i. The policy scores
both in one forward. The reference, for objectives that need one (finetune.tasks.objectives), is never a second
model: under LoRA/QLoRA it is the same model with its adapters off, run without gradients in the same step;
under full fine-tuning the starting model's log-probabilities are computed once before training
(attach_reference), cached beside the tokenized data, and each pair carries them into its batch
(finetune.data.REFERENCE). The metrics (PAIR_METRICS) are summed over pairs, so they add up over micro-batches
and ranks; their means are what metrics.jsonl and the eval results report. A reward model (task=reward,
RewardObjective) scores each sequence with its one-output head instead, and reports REWARD_METRICS.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from finetune import assets
from finetune.chunked_loss import chunk_tokens_of
from finetune.config import Config
from finetune.core.layout import Layout
from finetune.data import IGNORE_INDEX, REFERENCE, Padding, collate, model_inputs
from finetune.lora_tp import adapters_disabled
from finetune.tasks import Task
from finetune.tasks.objectives import Objective
from finetune.tasks.preference import REJECTED

# What a batch of pairs measures, each a sum over its pairs (means: divided by "pairs").
PAIR_METRICS = ("loss", "reward_chosen", "reward_rejected", "margin", "accuracy", "logp_chosen", "logp_rejected")
# A reward model's: the rewards are its scores; a scalar head has no log-probabilities. A prefix of PAIR_METRICS (pair_means).
REWARD_METRICS = PAIR_METRICS[:5]


def sequence_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model inputs of a pair batch, labels left out: the model's own loss (a second fp32 log-softmax over the vocabulary) is not wanted."""
    return {k: v for k, v in model_inputs(batch).items() if k != "labels"}


def model_logps(model: nn.Module, batch: dict[str, torch.Tensor], chunked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_logps of a batch under `model`: from its chunked loss where one is installed (finetune.chunked_loss), else from its full logits."""
    labels = {"labels": batch["labels"]} if chunked else {}
    return output_logps(model(**sequence_inputs(batch), **labels), batch["labels"])


def output_logps(outputs, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_logps of a batch from a causal LM's outputs for it: the chunked loss's sums where it gave them (a
    ChunkedLMOutput), else from the full logits."""
    if getattr(outputs, "sequence_logps", None) is not None:
        return outputs.sequence_logps, outputs.label_counts
    return sequence_logps(outputs.logits, labels)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's label tokens, their count): the causal LM's shifted targets, -100 left out."""
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    logps = logits[:, :-1].float().log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * scored).sum(-1), scored.sum(-1)


class PairObjective:
    """The objective of a preference run over one model: its loss for a pair batch, and the pair metrics.

    Args:
        model: the (boosted) model the policy forward runs through.
        adapters_off: a context in which `model` is the reference (its adapters disabled); None for a model without
            adapters, whose batches carry the reference log-probabilities (or whose objective needs none).
    """

    metrics = PAIR_METRICS  # what batch_sums adds up, in this order

    def __init__(self, objective: Objective, settings, model: nn.Module, adapters_off: Callable[[], ContextManager] | None) -> None:
        self.objective, self.settings, self.model, self.adapters_off = objective, settings, model, adapters_off
        self.chunked = chunk_tokens_of(model) > 0  # the log-probabilities come from the chunked loss (train.loss_chunks)
        self.step_sums: torch.Tensor | None = None  # PAIR_METRICS and the pair count of the training micro-batches so far

    def _logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-probability, reply tokens) of each row of a pair batch under the model as it stands: [2 * pairs] each."""
        return model_logps(self.model, batch, self.chunked)

    def _reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference's summed log-probability of each row: the model with its adapters off, without gradients."""
        if self.adapters_off is None:
            raise ValueError(f"preference.loss={self.objective.name} needs reference log-probabilities: a model without adapters reads them from the batch (attach_reference)")
        with torch.no_grad(), self.adapters_off():
            return self._logps(batch)[0]

    def pair_terms(self, batch: dict[str, torch.Tensor], outputs=None) -> tuple[torch.Tensor, ...]:
        """(loss, chosen reward, rejected reward, chosen log-prob, rejected log-prob) per pair; the reference pass first
        (no gradients, adapters off). The log-probs are the summed ones, whatever the objective reads.

        Args:
            outputs: the model's outputs for `batch` where the caller ran it (a pipeline's last stage: the schedule's
                criterion), the reference log-probabilities then in the batch; None: the model runs here.
        """
        reference = (None, None)
        if self.objective.reference:
            logps = batch[REFERENCE] if REFERENCE in batch else self._reference_logps(batch)
            reference = (logps[0::2], logps[1::2])
        sums, counts = self._logps(batch) if outputs is None else output_logps(outputs, batch["labels"])
        policy = sums / counts.clamp(min=1) if self.objective.length_normalized else sums
        loss, good, bad = self.objective.formula(policy[0::2], policy[1::2], *reference, self.settings)
        return loss, good, bad, sums[0::2], sums[1::2]

    def batch_sums(self, batch: dict[str, torch.Tensor], outputs=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over the batch's pairs, float64 sums of self.metrics and the pair count); eval filler pairs (no label
        token) count nowhere. `outputs`: as in pair_terms."""
        loss, good, bad, *logps = self.pair_terms(batch, outputs)
        kept = (batch["labels"][0::2, 1:] != IGNORE_INDEX).any(-1)
        # where, not a product: a filler pair has no reply token, and ORPO's odds of an empty reply are infinite
        values = torch.where(kept, torch.stack([loss, good, bad, good - bad, (good > bad).to(loss.dtype), *logps]).detach().double(), 0.0)
        sums = torch.cat([values.sum(-1), kept.sum().double().reshape(1)])
        return torch.where(kept, loss, 0.0).sum() / kept.sum().clamp(min=1), sums

    def loss(self, batch: dict[str, torch.Tensor], outputs=None) -> torch.Tensor:
        """The training loss of a micro-batch (mean over its pairs); its metric sums add to step_sums. `outputs`: as in pair_terms."""
        loss, sums = self.batch_sums(batch, outputs)
        self.step_sums = sums if self.step_sums is None else self.step_sums + sums
        return loss

    def take_step_sums(self) -> list[float]:
        """The step's metric sums and pair count (zeros before any step), reset for the next step."""
        sums, self.step_sums = self.step_sums, None
        return sums.tolist() if sums is not None else [0.0] * (len(self.metrics) + 1)


class RewardObjective(PairObjective):
    """task=reward: Bradley-Terry over the scores of a one-output sequence classifier (no reference, no log-probabilities)."""

    metrics = REWARD_METRICS

    def pair_terms(self, batch: dict[str, torch.Tensor], outputs=None) -> tuple[torch.Tensor, ...]:
        """(loss, chosen score, rejected score) per pair: the head's output at each sequence's last non-pad token."""
        scores = (outputs or self.model(**sequence_inputs(batch))).logits.squeeze(-1).float()
        return self.objective.formula(scores[0::2], scores[1::2], None, None, self.settings)


def pair_objective(cfg: Config, task: Task, model: nn.Module, peft_model: nn.Module | None) -> PairObjective:
    """The run's objective over `model` for a pair task; its reference switches the adapters of `peft_model` off (None: no
    adapters, and an objective with a reference reads the starting model's log-probabilities from the batch: attach_reference)."""
    objective = task.objective(cfg.preference)
    if task.scalar_head:
        return RewardObjective(objective, cfg.preference, model, None)
    if peft_model is None:
        return PairObjective(objective, cfg.preference, model, None)
    # One switch for every layout: a PeftModel's layers, adapters injected without one (hybrid_parallel), sharded ones under TP.
    return PairObjective(objective, cfg.preference, model, functools.partial(adapters_disabled, peft_model))


def stores_reference(objective: PairObjective | None) -> bool:
    """Whether this run's reference log-probabilities are computed once before training and read per batch (full fine-tuning)."""
    return objective is not None and objective.objective.reference and objective.adapters_off is None


def reference_cache_path(cfg: Config, samples: list[dict]) -> Path:
    """Where the starting model's log-probabilities of these samples are cached: keyed by their tokens and the starting model."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(np.asarray(sample["input_ids"] + sample["labels"] + sample[REJECTED + "input_ids"] + sample[REJECTED + "labels"], dtype=np.int64).tobytes())
    model = Path(cfg.model.name)
    stamps = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model.iterdir() if f.is_file()) if model.is_dir() else []
    settings = [cfg.model.name, cfg.model.revision, cfg.model.attn_implementation, cfg.train.seed, cfg.train.precision, stamps]
    digest.update(json.dumps(settings, default=str).encode())
    return assets.cache_dir() / "data" / f"reference-{digest.hexdigest()[:24]}.npz"


@torch.no_grad()
def attach_reference(
    cfg: Config, model: nn.Module, layout: Layout, samples: list[dict], batch_size: int, pad_token_id: int, device,
    score: Callable[[dict[str, torch.Tensor]], torch.Tensor | None] | None = None, padding: Padding = Padding(),
) -> str:
    """Give every pair sample its [chosen, rejected] summed log-probabilities under the model as it is now (the starting
    model: before training, before a resume loads its checkpoint), cached; returns where they came from.

    Each data-parallel rank scores every dp_size-th sample; all ranks run as many full batches (the last filled up with
    the first sample), since a sharded model gathers its weights in every forward and a pipeline schedule keeps its
    first batch's micro-batch size; the scores are summed over the ranks.

    Args:
        score: batch -> each row's summed log-probability, None on a rank that does not hold them (a pipeline's
            earlier stages: the plugin's row_logps); None: the model's own forward (model_logps).
        padding: how the run pads its batches (a pipeline: to data.max_length).
    """
    path = reference_cache_path(cfg, samples)
    if path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            values = stored["logps"]
        source = f"cache hit {path}"
    else:
        mine = list(range(layout.dp_rank, len(samples), layout.dp_size))
        rounds = math.ceil(math.ceil(len(samples) / layout.dp_size) / batch_size)
        totals = torch.zeros(len(samples), 2, dtype=torch.float64, device=device)
        was_training, chunked = model.training, chunk_tokens_of(model) > 0
        score = score or (lambda batch: model_logps(model, batch, chunked)[0])
        model.eval()
        for k in range(rounds):
            chunk = mine[k * batch_size : (k + 1) * batch_size]
            full = chunk + [0] * (batch_size - len(chunk))
            batch = {key: value.to(device) for key, value in collate([samples[i] for i in full], pad_token_id, padding).items()}
            logps = score(batch)
            if logps is not None and chunk and layout.counts:
                totals[chunk] = logps.double().view(-1, 2)[: len(chunk)]
        model.train(was_training)
        dist.all_reduce(totals)
        values = totals.cpu().numpy()
        source = f"computed by the starting model{', cached ' + str(path) if _write_atomic(path, values) else ''}"
    for sample, pair in zip(samples, values.tolist()):
        sample[REFERENCE] = pair
    return source


def _write_atomic(path: Path, values: np.ndarray) -> bool:
    """Rank 0 writes the values beside `path` and renames them into place; False where it did not (another rank, or not writable)."""
    if dist.get_rank() != 0:
        return True  # rank 0 writes it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
        np.savez(staging, logps=values)
        staging.replace(path)
        return True
    except OSError:
        return False


def pair_means(sums: list[float]) -> dict[str, float]:
    """Metric means from their sums (PAIR_METRICS or a prefix of them: REWARD_METRICS) and the pair count (the last entry); NaN without pairs."""
    *values, pairs = sums
    return {**{name: value / pairs if pairs else float("nan") for name, value in zip(PAIR_METRICS, values)}, "pairs": int(pairs)}
