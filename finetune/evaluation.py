"""Held-out evaluation (LM: token-weighted loss and perplexity; classification: loss, accuracy, macro-F1)
and fixed-prompt generations.

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
import torch.nn.functional as F
from torch import nn

from finetune.core.layout import Layout
from finetune.data import IGNORE_INDEX, Padding, collate, masked
from finetune.preference import PairObjective, pair_means, pair_objective

# batch -> summed loss over its label tokens (a 0-dim tensor)
BatchLoss = Callable[[dict[str, torch.Tensor]], torch.Tensor]
# batch -> its class logits [batch, labels]; None on a rank without them (pipeline stages before the last)
BatchLogits = Callable[[dict[str, torch.Tensor]], "torch.Tensor | None"]


def label_tokens(labels: torch.Tensor) -> int:
    """Number of tokens a causal LM is scored on (labels shift left by one)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def summed_loss(outputs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """HF's mean token loss times the token count; 0 for a batch with no label tokens (HF's mean is 0/0 there).

    Only that batch is zeroed: a NaN or infinite loss of a batch with tokens stays, so a broken model reads as one.
    """
    tokens = label_tokens(batch["labels"])
    if tokens:
        return outputs.loss.float() * tokens
    # Zero, but still a function of the loss: an interleaved pipeline schedule runs backward through it.
    return torch.nan_to_num(outputs.loss.float(), nan=0.0) * 0


def padded_batches(samples: list[dict], batch_size: int, rank: int, world: int) -> list[list[dict]]:
    """This rank's share as full batches; every rank gets the same number of batches."""
    filler = masked(samples[0])
    per_rank = math.ceil(len(samples) / world)
    count = math.ceil(per_rank / batch_size)
    mine = samples[rank::world]
    mine = mine + [filler] * (count * batch_size - len(mine))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


@torch.no_grad()
def summed_over_ranks(batch_sums: Callable[[dict], torch.Tensor], samples: list[dict], batch_size: int, pad_token_id: int, device, layout: Layout | None, padding: Padding = Padding()) -> torch.Tensor:
    """Per-batch sums (a float64 vector) added over this rank's batches, then over all ranks with a layout."""
    rank, world = (layout.dp_rank, layout.dp_size) if layout else (0, 1)
    totals = None
    for chunk in padded_batches(samples, batch_size, rank, world):
        batch = {k: v.to(device) for k, v in collate(chunk, pad_token_id, padding).items()}
        sums = batch_sums(batch).double()  # every rank runs every batch (pipelines need all stages)
        totals = (totals if totals is not None else torch.zeros_like(sums)) + (sums if layout is None or layout.counts else 0)
    if layout is not None:
        dist.all_reduce(totals)
    return totals


def evaluate(batch_loss: BatchLoss, samples: list[dict], batch_size: int, pad_token_id: int, device, layout: Layout | None, padding: Padding = Padding()) -> dict:
    """Token-weighted loss over `samples`: across all ranks with a layout, on this rank alone without."""

    def sums(batch: dict) -> torch.Tensor:
        return torch.stack([batch_loss(batch).double().reshape(()), torch.tensor(label_tokens(batch["labels"]), dtype=torch.float64, device=device)])

    loss_sum, tokens = summed_over_ranks(sums, samples, batch_size, pad_token_id, device, layout, padding).tolist()
    loss = loss_sum / tokens if tokens > 0 else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(tokens)}


def evaluate_classification(
    batch_logits: BatchLogits, samples: list[dict], batch_size: int, pad_token_id: int, device, layout: Layout | None, num_labels: int, padding: Padding = Padding()
) -> dict:
    """Mean loss, accuracy and macro-F1 over `samples` (filler rows carry label -100 and count nowhere)."""

    def sums(batch: dict) -> torch.Tensor:
        logits = batch_logits(batch)
        if logits is None:  # a pipeline stage without the head: runs the batch, adds nothing
            return torch.zeros(1 + num_labels**2, dtype=torch.float64, device=device)
        labels = batch["labels"]
        kept = labels != IGNORE_INDEX
        confusion = torch.bincount(labels[kept] * num_labels + logits.argmax(-1)[kept], minlength=num_labels**2)
        loss_sum = F.cross_entropy(logits[kept].float(), labels[kept], reduction="sum").double()  # HF's loss, summed
        return torch.cat([loss_sum.reshape(1), confusion.double()])

    totals = summed_over_ranks(sums, samples, batch_size, pad_token_id, device, layout, padding)
    confusion = totals[1:].reshape(num_labels, num_labels)  # [true, predicted]
    count = confusion.sum().item()
    loss = totals[0].item() / count
    if not math.isfinite(loss):  # NaN/inf logits: their argmax is no prediction, so no accuracy either
        return {"loss": loss, "accuracy": float("nan"), "macro_f1": float("nan"), "samples": int(count)}
    return {"loss": loss, "accuracy": confusion.trace().item() / count, "macro_f1": macro_f1(confusion), "samples": int(count)}


def evaluate_pairs(batch_sums: BatchLoss, samples: list[dict], batch_size: int, pad_token_id: int, device, layout: Layout | None, padding: Padding = Padding()) -> dict:
    """Preference metrics over pair samples (finetune.preference.PAIR_METRICS, means over pairs; filler pairs count nowhere)."""
    return pair_means(summed_over_ranks(batch_sums, samples, batch_size, pad_token_id, device, layout, padding).tolist())


def evaluate_task(task, forward, samples: list[dict], batch_size: int, pad_token_id: int, device, layout: Layout | None, padding: Padding = Padding()) -> dict:
    """Eval metrics over samples for `task`, from `forward` (batch -> the task's eval_output) of the model under its plugin."""
    if task.eval_output == "pairs":
        return evaluate_pairs(forward, samples, batch_size, pad_token_id, device, layout, padding)
    if task.eval_output == "logits":
        return evaluate_classification(forward, samples, batch_size, pad_token_id, device, layout, len(task.labels), padding)
    return evaluate(forward, samples, batch_size, pad_token_id, device, layout, padding)


def macro_f1(confusion: torch.Tensor) -> float:
    """Mean F1 over the classes that occur as truth or prediction (sklearn's f1_score(average="macro"))."""
    true_positive = confusion.diagonal()
    support, predicted = confusion.sum(1), confusion.sum(0)
    present = (support + predicted) > 0
    f1 = 2 * true_positive / (support + predicted).clamp(min=1)
    return f1[present].mean().item()


def finite(result: dict) -> bool:
    """Whether an eval result measured a model: its loss is a number (NaN or inf: the model's outputs are not)."""
    return math.isfinite(result["loss"])


def eval_line(result: dict) -> str:
    """One readable line of an eval result (a non-finite one says so first)."""
    if not finite(result):
        return f"not finite (loss {result['loss']}): the model's outputs hold NaN or inf"
    by_source = "".join(f", {key.removeprefix('loss/')} loss {value:.4f}" for key, value in result.items() if key.startswith("loss/"))  # a mixture's sources
    if "margin" in result:  # preference pairs
        return f"loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f}, margin {result['margin']:.4f}, rewards chosen {result['reward_chosen']:.4f} / rejected {result['reward_rejected']:.4f}{by_source}"
    if "accuracy" in result:
        return f"loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}{by_source}"
    return f"loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}{by_source}"


def best_eval(results: list[dict]) -> dict | None:
    """The best of several eval results: highest accuracy for classification, else lowest loss (first on ties).

    A non-finite result is never best (NaN compares false both ways, so min/max would keep one); None when all are.
    """
    results = [r for r in results if finite(r)]
    if not results:
        return None
    if "accuracy" in results[0]:
        return max(results, key=lambda r: r["accuracy"])
    return min(results, key=lambda r: r["loss"])


RELOAD_TOLERANCE = {"fp32": 1e-4}  # relative; half-precision runs: 2e-2


def reload_matches(reloaded: float, trained: float, precision: str) -> bool:
    """Whether final/, reloaded, reproduces the trained model's probe loss; never for a non-finite one (NaN equals nothing)."""
    tolerance = RELOAD_TOLERANCE.get(precision, 2e-2)
    return math.isfinite(reloaded) and math.isfinite(trained) and abs(reloaded - trained) <= tolerance * max(1.0, abs(trained))


def module_batch_loss(model: nn.Module) -> BatchLoss:
    """Batch loss of a plain (or data-parallel) module."""

    def batch_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return summed_loss(model(**batch), batch)

    return batch_loss


def module_logits(model: nn.Module) -> BatchLogits:
    """Class logits of a plain (or data-parallel) classifier."""
    return lambda batch: model(**batch).logits


def module_eval_forward(model: nn.Module, output: str, objective: PairObjective | None) -> Callable:
    """A plain (or data-parallel) module's eval forward for a task's eval_output: its summed loss, class logits, or the pair metric sums of `objective`."""
    if output == "pairs":
        return lambda batch: objective.batch_sums(batch)[1]
    return module_batch_loss(model) if output == "loss" else module_logits(model)


def generate(model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int, device) -> list[str]:
    """Greedy completions of fixed prompts (token ids), one at a time (no padding effects), on this rank alone."""
    return [text for prompt in prompts for text in generate_batch(model, tokenizer, [prompt], max_new_tokens, device)]


def generate_batch(model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int, device, temperature: float = 0.0, top_p: float = 1.0) -> list[str]:
    """Completions of prompts (token ids) generated together (generate_tokens), each decoded without special tokens, stripped."""
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in generate_tokens(model, tokenizer, prompts, max_new_tokens, device, temperature, top_p)]


@torch.no_grad()
def generate_tokens(model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int, device, temperature: float = 0.0, top_p: float = 1.0, streamer=None) -> list[list[int]]:
    """The new tokens of prompts (token ids) generated together, left-padded, each up to and without its first EOS:
    greedy at temperature 0, else sampled from the global torch RNG (seed it first for repeatable samples).

    Args:
        streamer: a transformers streamer that gets the tokens as they come (one prompt only).
    """
    was_training = model.training
    model.eval()
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, streamer=streamer, **sampling)
    model.train(was_training)
    rows = [row[width:].tolist() for row in out]
    return [row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row for row in rows]


BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2}
RELOAD_HEADROOM = 1.25  # generation and the probe's activations, and the allocator's slack, on top of the weights


def reload_device(cfg, method, device: torch.device, free_bytes: int | None = None) -> torch.device:
    """Where rank 0 reloads final/: its GPU while the reloaded model fits in what is free there (the trained model
    and its optimizer states are still held), else the CPU; a quantized base stays where bitsandbytes put it."""
    if device.type != "cuda" or method.quantized_base:
        return device
    from finetune.estimate import load_model_config, model_shape

    dtype = method.frozen_dtype(cfg.train.precision) if method.adapter else "fp32"  # as reload_final loads the base
    need = model_shape(load_model_config(cfg.model.name), "full").total_params * BYTES_PER_ELEMENT[dtype] * RELOAD_HEADROOM
    if free_bytes is None:
        torch.cuda.empty_cache()
        free_bytes = torch.cuda.mem_get_info(device)[0]
    if need <= free_bytes:
        return device
    print(f"the reload check runs on the CPU: reloading {cfg.model.name} would not fit in what is free on {device}", flush=True)
    return torch.device("cpu")


def reload_final(final, cfg, method, task, tokenizer, prompts: list[dict], probe: list[dict], device) -> dict:
    """Rank 0: load the base and then final/ the way a user would; generate with both (generating tasks), score the probe.

    Args:
        method: the run's finetune.methods.Method (adapter dirs load onto a fresh base; full ones alone).
        task: the run's task (its model head, metrics and prompts).
    """
    import transformers

    from finetune.model import base_quantization, build_model

    prompt_ids = [task.prompt_ids(tokenizer, r) for r in prompts]
    movable = not method.quantized_base  # a quantized model is loaded onto its device, and transformers refuses to move 8-bit ones
    before = []
    if method.adapter or prompt_ids:  # a full model's final/ loads alone: its base would only generate the "before" answers
        # Named configs: the same seed gives the same base. QLoRA adapters go onto a freshly quantized base.
        base, _ = build_model(cfg.model, cfg.train.seed, labels=task.labels_or_none, quantization=base_quantization(cfg), precision=cfg.train.precision, dtype=method.frozen_dtype(cfg.train.precision))
        if movable:
            base.to(device)
        before = generate(base, tokenizer, prompt_ids, cfg.eval.max_new_tokens, device)
    if method.adapter:
        from peft import PeftModel

        reloaded, loader = PeftModel.from_pretrained(base, str(final)), "PeftModel.from_pretrained"
    else:
        auto_model = getattr(transformers, task.auto_model)
        base = None  # freed before final/ loads
        reloaded, loader = auto_model.from_pretrained(str(final), torch_dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code), f"{auto_model.__name__}.from_pretrained"
    if movable:
        reloaded.to(device)
    reloaded.eval()
    after = generate(reloaded, tokenizer, prompt_ids, cfg.eval.max_new_tokens, device)
    objective = pair_objective(cfg, task, reloaded, reloaded if method.adapter else None) if task.pairs else None
    forward = module_eval_forward(reloaded, task.eval_output, objective)
    probe_loss = evaluate_task(task, forward, probe, cfg.eval.batch_size, tokenizer.pad_token_id, device, None)["loss"]
    generations = [{"prompt": task.prompt_text(r), "reference": task.reference(r), "before": b, "after": a} for r, b, a in zip(prompts, before, after)]
    return {"loader": loader, "probe_loss": probe_loss, "generations": generations}
