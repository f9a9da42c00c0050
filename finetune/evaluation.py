"""Held-out evaluation (token-weighted loss and perplexity over all ranks) and fixed-prompt generations."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from finetune.data import IGNORE_INDEX, collate, prompt_ids


@torch.no_grad()
def evaluate(model: nn.Module, samples: list[dict], batch_size: int, pad_token_id: int, device: torch.device) -> dict:
    """Loss over every response token of the eval split; each rank takes every world_size-th sample.

    `model` is the unwrapped module: DDP's forward would broadcast buffers, a collective that hangs
    when ranks hold different numbers of eval batches.
    """
    was_training = model.training
    model.eval()
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = samples[rank::world]
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, token count
    for start in range(0, len(mine), batch_size):
        batch = {k: v.to(device) for k, v in collate(mine[start : start + batch_size], pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shifted_labels = batch["labels"][:, 1:]
        totals[0] += F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), shifted_labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).double()
        totals[1] += (shifted_labels != IGNORE_INDEX).sum()
    dist.all_reduce(totals)
    model.train(was_training)
    loss = (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(totals[1].item())}


@torch.no_grad()
def generate(model: nn.Module, tokenizer, records: list[dict], max_new_tokens: int, device: torch.device) -> list[dict]:
    """Greedy completions of fixed prompts, one at a time (no padding effects), on this rank alone."""
    was_training = model.training
    model.eval()
    results = []
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
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        results.append({"prompt": record["instruction"], "reference": record["output"], "generation": text})
    model.train(was_training)
    return results
