"""Preference training at run time: the log-probabilities of a batch of pairs, the objective's loss, and its metrics.

A pair batch (finetune.data.collate) holds rows 2i (chosen) and 2i+1 (rejected) of pair i. The policy scores
both in one forward. The reference, for objectives that need one (finetune.tasks.objectives), is the same
model with its LoRA/QLoRA adapters off, run without gradients in the same step: no second model is held.
The metrics (PAIR_METRICS) are summed over pairs, so they add up over micro-batches and ranks; their means
are what metrics.jsonl and the eval results report.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch import nn

from finetune.config import Config
from finetune.data import IGNORE_INDEX, model_inputs
from finetune.tasks.objectives import OBJECTIVES, Objective

# What a batch of pairs measures, each a sum over its pairs (means: divided by "pairs").
PAIR_METRICS = ("loss", "reward_chosen", "reward_rejected", "margin", "accuracy", "logp_chosen", "logp_rejected")


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
        adapters_off: a context in which `model` is the reference (its adapters disabled); None for objectives without one.
    """

    def __init__(self, objective: Objective, settings, model: nn.Module, adapters_off: Callable[[], ContextManager] | None) -> None:
        self.objective, self.settings, self.model, self.adapters_off = objective, settings, model, adapters_off
        self.step_sums: torch.Tensor | None = None  # PAIR_METRICS and the pair count of the training micro-batches so far

    def _logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed log-probability of each row of a pair batch under the model as it stands: [2 * pairs]."""
        return sequence_logps(self.model(**model_inputs(batch)).logits, batch["labels"])[0]

    def pair_terms(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(loss, chosen reward, rejected reward, chosen log-prob, rejected log-prob) per pair; the reference pass first
        (no gradients, adapters off). The log-probs are the summed ones, whatever the objective reads."""
        reference = (None, None)
        if self.objective.reference:
            with torch.no_grad(), self.adapters_off():
                logps = self._logps(batch)
            reference = (logps[0::2], logps[1::2])
        sums, counts = sequence_logps(self.model(**model_inputs(batch)).logits, batch["labels"])
        policy = sums / counts.clamp(min=1) if self.objective.length_normalized else sums
        loss, good, bad = self.objective.formula(policy[0::2], policy[1::2], *reference, self.settings)
        return loss, good, bad, sums[0::2], sums[1::2]

    def batch_sums(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over the batch's pairs, float64 sums of PAIR_METRICS and the pair count); eval filler pairs (no label token) count nowhere."""
        loss, good, bad, logp_chosen, logp_rejected = self.pair_terms(batch)
        kept = (batch["labels"][0::2, 1:] != IGNORE_INDEX).any(-1)
        values = torch.stack([loss, good, bad, good - bad, (good > bad).to(loss.dtype), logp_chosen, logp_rejected]).detach().double() * kept
        sums = torch.cat([values.sum(-1), kept.sum().double().reshape(1)])
        return (loss * kept).sum() / kept.sum().clamp(min=1), sums

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of a micro-batch (mean over its pairs); its metric sums add to step_sums."""
        loss, sums = self.batch_sums(batch)
        self.step_sums = sums if self.step_sums is None else self.step_sums + sums
        return loss

    def take_step_sums(self) -> list[float]:
        """The step's PAIR_METRICS sums and pair count (zeros before any step), reset for the next step."""
        sums, self.step_sums = self.step_sums, None
        return sums.tolist() if sums is not None else [0.0] * (len(PAIR_METRICS) + 1)


def pair_objective(cfg: Config, model: nn.Module, peft_model: nn.Module | None) -> PairObjective:
    """The run's objective over `model`; its reference switches the adapters of `peft_model` off (None: no adapters)."""
    objective = OBJECTIVES[cfg.preference.loss]
    adapters_off = peft_model.disable_adapter if peft_model is not None else None  # peft's: the base model's forward
    if objective.reference and adapters_off is None:  # config validation refuses this setup; this guards the code paths that skip it
        raise ValueError(f"preference.loss={objective.name} needs a reference, and a model without adapters has none here")
    return PairObjective(objective, cfg.preference, model, adapters_off or contextlib.nullcontext)


def pair_means(sums: list[float]) -> dict[str, float]:
    """PAIR_METRICS means from their sums and the pair count (the last entry); NaN without pairs."""
    pairs = sums[-1]
    return {**{name: value / pairs if pairs else float("nan") for name, value in zip(PAIR_METRICS, sums)}, "pairs": int(pairs)}
