"""Held-out evaluation (token-weighted loss and perplexity) and fixed-prompt generations.

Distributed evaluation works under every plugin: each data-parallel rank takes every dp_size-th
sample, all ranks run the same number of full batches (padded with samples whose labels are all
masked, so they weigh nothing), and only one rank per data-parallel replica (tensor-parallel rank 0
on the last pipeline stage) adds its sums before they are all-reduced.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from finetune.booster import Layout
from finetune.data import IGNORE_INDEX, collate, prompt_ids

# batch -> summed loss over its label tokens (a 0-dim tensor)
BatchLoss = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def label_tokens(labels: torch.Tensor) -> int:
    """Number of tokens a causal LM is scored on (labels shift left by one)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def summed_loss(outputs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """HF's mean token loss times the token count; 0 for a batch with no label tokens (mean is NaN there)."""
    return torch.nan_to_num(outputs.loss.float(), nan=0.0) * label_tokens(batch["labels"])


def padded_batches(samples: list[dict], batch_size: int, rank: int, world: int) -> list[list[dict]]:
    """This rank's share as full batches; every rank gets the same number of batches."""
    filler = {"input_ids": samples[0]["input_ids"], "labels": [IGNORE_INDEX] * len(samples[0]["labels"])}
    per_rank = math.ceil(len(samples) / world)
    count = math.ceil(per_rank / batch_size)
    mine = samples[rank::world]
    mine = mine + [filler] * (count * batch_size - len(mine))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


@torch.no_grad()
def evaluate(batch_loss: BatchLoss, samples: list[dict], batch_size: int, pad_token_id: int, device, layout: Layout | None, pad_to: int = 0) -> dict:
    """Token-weighted loss over `samples`: across all ranks with a layout, on this rank alone without."""
    rank, world = (layout.dp_rank, layout.dp_size) if layout else (0, 1)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, token count
    for chunk in padded_batches(samples, batch_size, rank, world):
        batch = {k: v.to(device) for k, v in collate(chunk, pad_token_id, pad_to).items()}
        loss = batch_loss(batch)
        if layout is None or layout.counts:
            totals += torch.stack([loss.double().reshape(()), torch.tensor(label_tokens(batch["labels"]), dtype=torch.float64, device=device)])
    if layout is not None:
        dist.all_reduce(totals)
    loss = (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(totals[1].item())}


def module_batch_loss(model: nn.Module) -> BatchLoss:
    """Batch loss of a plain (or data-parallel) module."""

    def batch_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return summed_loss(model(**batch), batch)

    return batch_loss


@torch.no_grad()
def generate(model: nn.Module, tokenizer, records: list[dict], max_new_tokens: int, device) -> list[str]:
    """Greedy completions of fixed prompts, one at a time (no padding effects), on this rank alone."""
    was_training = model.training
    model.eval()
    texts = []
    for record in records:
        ids = torch.tensor([prompt_ids(tokenizer, record)], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    model.train(was_training)
    return texts
