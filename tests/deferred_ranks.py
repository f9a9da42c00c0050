"""Run by tests/distributed/test_deferred.py under torchrun (2 ranks): each pretrained model directory built the way
a sharding plugin asks (Plugin.model_init), boosted, its weights loaded per shard (load_deferred), and its
logits compared with the unsharded model's; and bf16 pipeline steps (ZeRO-0 and -1) from a deferred build against
one from an eager build. Rank 0 writes {"<model> <setup>": max |difference|} as JSON. A rank that hangs
(WORK_LIMIT_S, or TEARDOWN_LIMIT_S once its work is done) prints every thread's stack and exits; so does a rank
that the launcher stops because the other one failed.

    torchrun --nproc_per_node=2 tests/deferred_ranks.py OUT.json MODEL_DIR [MODEL_DIR ...]
"""

from __future__ import annotations

import faulthandler
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from finetune import deferred  # noqa: E402
from finetune.parallel import PLUGINS  # noqa: E402
from finetune.chunked_loss import chunk_tokens_of  # noqa: E402
from finetune.config import build_config, parse_args  # noqa: E402
from finetune.distributed import destroy_process_groups, launch  # noqa: E402
from finetune.faults import Faults  # noqa: E402
from finetune.methods import method_named  # noqa: E402
from finetune.model import build_model  # noqa: E402
from finetune.run import build_run  # noqa: E402
from finetune.tasks import build_task  # noqa: E402

WORK_LIMIT_S = 240  # the whole run takes ~20 s alone, ~70 s on two cores shared with other test runs
TEARDOWN_LIMIT_S = 30  # destroying the groups and exiting takes well under a second

SETUPS = {
    "tp2": ["plugin.name=hybrid_parallel", "plugin.tp_size=2"],
    # the logits are compared: the last stage's chunked loss (train.loss_chunks) gives none
    "pp2": ["plugin.name=hybrid_parallel", "plugin.pp_size=2", "plugin.num_microbatches=1", "train.loss_chunks=off"],
    "fsdp": ["plugin.name=torch_fsdp"],
}


def logits_of(run, batch: dict, vocab: int) -> torch.Tensor | None:
    """The boosted model's logits for batch (None on pipeline stages without them), vocabulary shards gathered."""
    with torch.no_grad():
        if run.layout.pipeline:
            out = run.booster.execute_pipeline(iter([batch]), run.model, criterion=lambda o, _: o.loss, optimizer=None, return_loss=True, return_outputs=True)
            return out["outputs"]["logits"] if out["outputs"] is not None else None
        # A model under the chunked loss (train.loss_chunks) answers a call with labels with the loss alone, no logits:
        # ask it without them (shardformer's GPT-2, under TP, needs them).
        logits = run.model(**{k: v for k, v in batch.items() if k != "labels" or not chunk_tokens_of(run.model)}).logits
    if logits.shape[-1] != vocab:  # tensor parallel: each rank holds a slice of the vocabulary
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, logits)
        logits = torch.cat(parts, dim=-1)
    return logits


# The step at train.lr as built, unclipped: the Run's scheduler and clipping stay out of the comparison.
UNSCHEDULED = ["train.warmup_steps=0", "train.lr_scheduler=constant", "train.max_grad_norm=0"]


def run_of(cfg, model, pending, batch: dict):
    """The Run train.py builds for this model (finetune.run.build_run); its training samples are the batch's rows, enough for a step."""
    rows = [{"input_ids": ids, "labels": ids} for ids in batch["input_ids"].tolist()]
    world = dist.get_world_size()
    samples = rows * (cfg.train.batch_size * world // len(rows) + 1)
    from colossalai.accelerator import get_accelerator

    task = build_task(cfg.task, cfg.data)
    run, _ = build_run(cfg, world_size=world, device=get_accelerator().get_current_device(), task=task, model=model, pending=pending, samples=samples, pad_token_id=0, faults=Faults(""), preemption=None)
    return run


def check(model_dir: str, setup: str, batch: dict, reference: torch.Tensor) -> float | None:
    """Max |logits - reference| of the model built, boosted and loaded as train.py does under setup."""
    cfg = build_config(parse_args([f"model.name={model_dir}", "method=full", "train.precision=fp32", *SETUPS[setup]]))
    spec, method = PLUGINS[cfg.plugin.name], method_named(cfg.method)
    model, _ = build_model(cfg.model, 0, spec.shardformer, init=method.model_init(spec.model_init))
    pending = deferred.pending(model)
    assert pending is not None and all(p.is_meta for p in model.parameters()), "built with its weights"  # LazyTensors are meta too
    run = run_of(cfg, model, pending, batch)  # boosted, its weights loaded per shard
    run.model.eval()
    logits = logits_of(run, batch, reference.shape[-1])
    return None if logits is None else (logits - reference).abs().max().item()


def losses_after_a_step(model_dir: str, init: str, batch: dict, zero_stage: int) -> list[float]:
    """The pipeline loss before and after one bf16 step (pp2, ZeRO-1 or plain mixed precision): the optimizer's
    fp32 master copies, made at boost, must hold the loaded weights, or the step writes the unloaded ones back."""
    cfg = build_config(parse_args([f"model.name={model_dir}", "method=full", "train.precision=bf16", "train.lr=2e-2", *UNSCHEDULED, "plugin.name=hybrid_parallel", "plugin.pp_size=2", "plugin.num_microbatches=2", f"plugin.zero_stage={zero_stage}"]))
    spec = PLUGINS[cfg.plugin.name]
    model, _ = build_model(cfg.model, 0, spec.shardformer, init=init)
    run = run_of(cfg, model, deferred.pending(model), batch)
    losses = []
    for _ in range(2):
        out = run.booster.execute_pipeline(iter([batch]), run.model, criterion=lambda o, _: o.loss, optimizer=run.optimizer, return_loss=True)
        run.optimizer.step()
        run.optimizer.zero_grad()
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, None if out["loss"] is None else out["loss"].item())
        losses.append(next(x for x in found if x is not None))
    return losses


def nan_max(values: torch.Tensor) -> float:
    """The largest |value|, NaN if any is (Python's max would skip a NaN)."""
    return values.abs().max().item()


def main(out: str, model_dirs: list[str]) -> None:
    """One rank's run, watched: a hang in its work or in its teardown dumps its stacks and exits."""
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    faulthandler.dump_traceback_later(WORK_LIMIT_S, exit=True)
    launch(str(Path(out).parent), False, 300, 0)
    try:
        compare(out, model_dirs)
    finally:
        faulthandler.dump_traceback_later(TEARDOWN_LIMIT_S, exit=True)  # replaces the work's limit
        destroy_process_groups()


def compare(out: str, model_dirs: list[str]) -> None:
    """Write the differences of every model and setup, and of the bf16 steps, to out (rank 0)."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}  # shardformer's GPT-2 needs labels and a mask
    results = {}
    for model_dir in model_dirs:
        reference = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
        with torch.no_grad():
            expected = reference(**batch).logits
        for setup in SETUPS:
            diffs = [None] * dist.get_world_size()
            dist.all_gather_object(diffs, check(model_dir, setup, batch, expected))
            results[f"{Path(model_dir).name} {setup}"] = nan_max(torch.tensor([d for d in diffs if d is not None]))
    for zero_stage in (0, 1):  # the master copies live in ZeRO's optimizer, or in the mixed-precision one
        deferred_losses, eager_losses = (losses_after_a_step(model_dirs[0], init, batch, zero_stage) for init in ("lazy", "eager"))
        results[f"pp2 zero{zero_stage} bf16 step"] = nan_max(torch.tensor(deferred_losses) - torch.tensor(eager_losses))
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
