"""Fine-tune a causal language model (or an encoder classifier) with a ColossalAI Booster.

    launch/single_node.sh 2                                              # the quickstart (embedded default)
    launch/single_node.sh 2 --config booster_configs/torch_ddp.yaml model.name=gpt2
    python finetune/train.py model.name=tiny-gpt2 method=full train.max_steps=5   # one process

Reads top to bottom: config -> process group -> data -> model -> booster -> evaluate -> fit ->
evaluate -> save -> reload check -> summary. Every rank runs the same code; rank 0 prints and writes.
What differs by plugin, method or task is asked of the run's Plugin, Method and Task objects.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python finetune/train.py): make `finetune` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib
import logging
import math
import os
import time
import warnings

# Set before the imports below emit them. Optional extras that ColossalAI and bitsandbytes mention on
# import (TensorNVMe async save, apex fused norms, the `kernels` package's faster CPU 4-bit matmul) are
# not used by this tool; their notices would bury the report or an error line.
warnings.filterwarnings("ignore", message=r"Please install (the latest tensornvme|apex)")
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# bitsandbytes' 8-bit matmul computes in fp16 by design and says so on every layer's first call.
warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")

import torch
import torch.distributed as dist
from tqdm import tqdm

from finetune import checkpoint, checks, deferred, outputs
from finetune.config import Config, ConfigError, help_text, load_config
from finetune.data import IGNORE_INDEX, SplitData, batches_forever, build_data, load_splits, max_label_tokens, non_pad_tokens
from finetune.distributed import CollectiveTimeout, RankLost, all_reduce_sum, allocate_for_steps, collective_timeout, destroy_process_groups, is_main, launch, log, main_rank_first, peak_bytes_per_rank, rank_lost
from finetune.errors import FinetuneError
from finetune.evaluation import eval_line, evaluate_task, reload_device, reload_final, reload_matches
from finetune.faults import Faults
from finetune.methods import method_named
from finetune.fixes import glibc
from finetune.model import base_quantization, build_model
from finetune.outputs import output_problems
from finetune.packing import packed_attention
from finetune.parallel import PLUGINS
from finetune.preemption import PREEMPTED_EXIT_CODE, Preempted, Preemption
from finetune.preference import attach_reference, pair_means, stores_reference
from finetune.profiler import MemoryProfiler
from finetune.quantization import format_weight_bytes, weight_bytes
from finetune.run import Run, build_run


class TrainingError(FinetuneError):
    """Training cannot go on (a non-finite loss under train.on_nan=stop)."""


class ReloadMismatch(FinetuneError):
    """final/, reloaded, does not reproduce the trained model's probe loss."""


def check_fit(cfg: Config, world_size: int, device: torch.device) -> None:
    """Before any weights load: the estimator's per-rank peak for this run against this rank's free memory.

    Free memory: CUDA's mem_get_info on GPU; on CPU the available RAM shared by this node's ranks.
    FINETUNE_AVAILABLE_BYTES overrides it (to keep headroom for other work, and for tests).

    Raises:
        ConfigError: the run does not fit and train.fit_check=error (the line names changes that fit).
    """
    from finetune.estimate import fit_check_line

    if cfg.train.fit_check == "off":
        return
    if "FINETUNE_AVAILABLE_BYTES" in os.environ:
        available = float(os.environ["FINETUNE_AVAILABLE_BYTES"])
    elif device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        available = psutil.virtual_memory().available / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        line = fit_check_line(cfg, world_size, available, device.type)
    except FinetuneError as err:  # e.g. a GGUF or hub model whose config is not on this machine yet
        log(f"fit check skipped: {err}")
        return
    if line and cfg.train.fit_check == "error":
        raise ConfigError(line)
    if line:
        log(f"warning: {line}")


def train_step(run: Run, micro_batches: list[dict], step: int) -> tuple[float, int, float | None]:
    """One optimizer step over the micro-batches; returns (mean loss, non-pad tokens) of this rank and the clipped gradient norm.

    Raises:
        TrainingError: a rank's loss is not finite and train.on_nan=stop (no update is applied).
    """
    micro_batches = [{k: v.to(run.device) for k, v in batch.items()} for batch in micro_batches]
    tokens = sum(non_pad_tokens(batch) for batch in micro_batches)
    loss = run.plugin.forward_backward(run, micro_batches)
    if run.faults.at("nan_at_step", step):
        loss = float("nan")
    if not_finite_anywhere(loss, run.device):
        run.optimizer.zero_grad()
        if run.cfg.train.on_nan == "stop":
            raise TrainingError(f"step {step}: the loss is not finite; stopped before updating the weights (train.on_nan=skip drops such steps instead){last_checkpoint_note(run.cfg)}")
        log(f"step {step}: the loss is not finite; this step's update is skipped (train.on_nan=skip)")
        return loss, tokens, None
    grad_norm = run.plugin.step(run, run.cfg.train.max_grad_norm)
    run.optimizer.zero_grad()
    return loss, tokens, grad_norm


def widest_batch(micro_batches: list[dict], so_far: tuple[int, int], token_labels: bool) -> tuple[int, int]:
    """(longest padded row, most label tokens per row) of the micro-batches and those drawn before (`so_far`): the
    shape the estimator is asked about beside this rank's measured peak. Without token labels (a classifier's: one
    class a row) no token reaches a language-model head: 0."""
    for batch in micro_batches:
        scored = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if token_labels else 0
        so_far = (max(so_far[0], batch["input_ids"].shape[1]), max(so_far[1], -(-scored // len(batch["input_ids"]))))
    return so_far


def not_finite_anywhere(loss: float, device) -> bool:
    """Whether any rank's loss is NaN or infinite (all ranks must agree to skip or stop together)."""
    flag = torch.tensor([0.0 if math.isfinite(loss) else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def last_checkpoint_note(cfg: Config) -> str:
    found = checkpoint.complete_checkpoints(cfg.output_dir)
    return f"; the last good checkpoint is {found[-1]} (resume_from=latest)" if found else "; no checkpoint was written (checkpoint.every_steps)"


def eval_batch_size(run: Run) -> int:
    """Samples per batch of a pass without training: pipelines run the train batch (their schedule keeps the micro-batch
    size of the first batch it sees), other plugins eval.batch_size."""
    return run.cfg.train.batch_size if run.layout.pipeline else run.cfg.eval.batch_size


def run_eval(run: Run, samples: list[dict], pad_token_id: int, by_source: dict[str, list[dict]] | None = None) -> dict:
    """Distributed eval of the boosted model (in eval mode) on samples: the task's metrics through the plugin's forward.

    A mixture's eval also gives each source's own loss, as loss/<source name>.
    """
    run.model.eval()
    forward = run.plugin.eval_forward(run, run.task.eval_output)
    result = evaluate_task(run.task, forward, samples, eval_batch_size(run), pad_token_id, run.device, run.layout, run.padding)
    for name, part in (by_source or {}).items():
        result[f"loss/{name}"] = evaluate_task(run.task, forward, part, eval_batch_size(run), pad_token_id, run.device, run.layout, run.padding)["loss"]
    run.model.train()
    return result


def fit(run: Run, dataloader, total_steps: int, data: SplitData, pad_token_id: int, profiler, writer, start_step: int = 0) -> dict:
    """The training loop: step, log, evaluate every eval.every_steps, checkpoint every checkpoint.every_steps.

    Returns the loss history (earlier steps of a resumed run included, from metrics.jsonl) and throughput.
    """
    cfg = run.cfg
    steps, losses, eval_history = outputs.resumed_history(writer, start_step) if is_main() else ([], [], [])
    train_tokens, train_rows, train_s, widest = 0, 0, 0.0, (0, 0)
    run.model.train()
    batches = batches_forever(dataloader, cfg.train.grad_accum_steps, run.steps_per_epoch, start_step)
    # A context, so the bar's line is ended even when a step raises: an error line then stands alone.
    with tqdm(total=total_steps, initial=start_step, desc="train", disable=not is_main(), dynamic_ncols=True) as progress:
        for step, (epoch, micro_batches) in enumerate(batches, start=start_step + 1):
            if step > total_steps:
                break
            started = time.perf_counter()
            run.faults.maybe_stall("stall_in_tp", step)
            widest = widest_batch(micro_batches, widest, not run.task.classification)
            loss, tokens, grad_norm = train_step(run, micro_batches, step)
            run.scheduler.step()
            elapsed = time.perf_counter() - started
            memory = profiler.record_step(step)
            # One rank per data-parallel replica counts, so TP/PP ranks that share a batch count it once.
            rows = sum(len(b["input_ids"]) for b in micro_batches)  # sequences (packed rows under packing)
            sums = [loss, tokens, rows, *(run.objective.take_step_sums() if run.objective else [])]  # preference: the pair metric sums
            loss_sum, token_sum, row_sum, *pair_sums = all_reduce_sum(sums if run.layout.counts else [0.0] * len(sums), run.device)
            mean_loss = loss_sum / run.layout.dp_size
            train_tokens, train_rows, train_s = train_tokens + int(token_sum), train_rows + int(row_sum), train_s + elapsed
            if math.isfinite(mean_loss):  # a non-finite one was skipped under train.on_nan=skip (stop raised in train_step)
                steps.append(step)
                losses.append(mean_loss)
            if is_main() and (not math.isfinite(mean_loss) or step % cfg.train.log_every == 0 or step == total_steps):
                writer.log_metrics(outputs.step_metrics(step, epoch, mean_loss, run.scheduler.get_last_lr()[0], int(token_sum), elapsed, memory, grad_norm, pair_means(pair_sums) if pair_sums else None))
            progress.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{token_sum / elapsed:.0f}")
            progress.update()
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < total_steps:
                result = run_eval(run, data.eval, pad_token_id, data.eval_by_source)
                eval_history.append({"step": step, **result})
                log(f"step {step}: eval {eval_line(result)}")
                if is_main():
                    writer.log_metrics(outputs.eval_metrics(step, result))
            every = cfg.checkpoint.every_steps
            saved = every and (step % every == 0 or step == total_steps)
            if saved:
                log(f"step {step}: checkpoint {checkpoint.save_checkpoint(run, step)}")
            run.faults.maybe_kill("kill_after_step", step)
            run.faults.maybe_signal("sigterm_after_step", step)
            if run.preemption.agreed(run.device):  # every rank stops after the same step
                raise Preempted(step, checkpoint.checkpoint_dir(cfg.output_dir, step) if saved else checkpoint.save_checkpoint(run, step))
            if step == total_steps:
                break
    throughput = {"tokens_per_s": train_tokens / train_s if train_s else 0.0, "sequences_per_s": train_rows / train_s if train_s else 0.0, "train_tokens": train_tokens, "train_s": train_s}
    return {"steps": steps, "losses": losses, "eval_history": eval_history, "throughput": throughput, "widest_batch": widest}


PROBE_SAMPLES = 16  # eval samples on which the reloaded artifact must reproduce the trained model's loss


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(__doc__ + "\nConfig keys (key=value overrides, --config FILE repeatable):\n" + help_text())
        return
    cfg = load_config(argv, has_cuda=torch.cuda.is_available())  # before any heavy work
    problems = output_problems(cfg, writer=os.environ.get("RANK", "0") == "0")
    if problems:
        raise ConfigError(problems[0])
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    resume, resume_state, changed = checkpoint.open_resume(cfg, world_size)  # verified complete and compatible before any model is built
    # Rank 0 locks output_dir before anything is written there, and holds it to the end, errors included.
    with outputs.own_output_dir(cfg) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
        train(cfg, world_size, resume, resume_state, changed)


def train(cfg: Config, world_size: int, resume: Path | None, resume_state: dict | None, changed: list[str]) -> None:
    """The run itself, on every rank: process group, data, model, booster, fit, final/, reload check, summary."""
    plugin_spec, method = PLUGINS[cfg.plugin.name], method_named(cfg.method)
    wall_start = time.perf_counter()
    device = launch(cfg.output_dir, cfg.launch.rank_logs, cfg.launch.timeout_s, cfg.train.seed)
    check_fit(cfg, world_size, device)  # before any weights load
    writer = outputs.start_outputs(cfg, resume_state) if is_main() else None
    for partial in checkpoint.remove_partial(cfg.output_dir) if is_main() else []:
        log(f"removed the half-written checkpoint {partial}")
    if resume:
        log(f"resuming from {resume} (step {resume_state['step']})" + (f"; settings changed since: {', '.join(changed)}" if changed else ""))
        if layout_line := checkpoint.layout_change_line(resume_state, cfg, world_size):
            log(layout_line)
        fence = checkpoint.fence_newer(cfg.output_dir, resume) if is_main() else None
        if fence:
            log(f"the newer checkpoints of the branch this resume abandons moved to {fence} (resume_from=latest and keep_last no longer see them)")
    profiler = MemoryProfiler(cfg.train.cpu_allocator)
    log(profiler.format(profiler.record("start")))

    splits = load_splits(cfg.data, cfg.train.seed, cfg.task)  # bad rows fail here, before the model is built
    task = splits.task  # with what it learned from the training records (a classifier's labels)
    with main_rank_first():  # rank 0 converts a GGUF into the cache once; the others then load it
        model, tokenizer = build_model(
            cfg.model, cfg.train.seed, plugin_spec.shardformer, task.labels_or_none,
            None if plugin_spec.quantizes_shards(cfg) else base_quantization(cfg),  # tensor parallelism quantizes each rank's shards once split
            cfg.train.precision, method.frozen_dtype(cfg.train.precision),
            method.model_init(plugin_spec, cfg), quant_storage=plugin_spec.quantized_storage(cfg),
        )
    pending = deferred.pending(model)  # built without its weights: the plugin loads each rank's share after sharding
    log(profiler.format(profiler.record("model_loaded")))
    model_weights = weight_bytes(model)
    log(format_weight_bytes(model_weights))
    data = build_data(cfg.data, tokenizer, splits)  # every rank tokenizes a share; they meet in the cache, outside any collective
    log(f"data: {len(data.train)} train / {len(data.eval)} eval samples ({data.truncated} truncated, {data.dropped} dropped at {cfg.data.max_length} tokens; cache {data.cache})")
    if data.sources:
        log("data mixture (weight: samples drawn of the source's training samples): " + ", ".join(f"{s['name']} {s['weight']:g}: {s['drawn']} of {s['train_samples']}" for s in data.sources))
    packed = packed_attention(model) if cfg.data.packing else ""  # before any wrapper hides the model

    run, dataloader = build_run(cfg, world_size=world_size, device=device, task=task, model=model, pending=pending, samples=data.train, pad_token_id=tokenizer.pad_token_id, packed=packed, faults=Faults(), preemption=Preemption())
    del model  # run.model is the boosted one: the model as built is freed now (below), not held by this name
    steps_heap = allocate_for_steps(device, cfg.train.cpu_allocator, base_quantization(cfg) is not None)
    log(profiler.format(profiler.record("boosted")))
    held = run.plugin.held_weight_bytes(run.state)  # a plugin that shards the weights: what each rank holds of them now
    if held is not None:
        model_weights.per_rank = [None] * world_size
        dist.all_gather_object(model_weights.per_rank, held)
        log("; ".join(format_weight_bytes(h, f"rank {r} holds") for r, h in enumerate(model_weights.per_rank)))
    if cfg.lora.init_from and not resume:  # a resumed run's checkpoint holds the adapter already
        checkpoint.init_adapter(run, Path(cfg.lora.init_from))
        log(f"adapter initialised from {cfg.lora.init_from}")
    if stores_reference(run.objective):  # full fine-tuning: the starting model scores the pairs, before a resume loads trained weights
        source = attach_reference(cfg, run.model, run.layout, data.train + data.eval, eval_batch_size(run), tokenizer.pad_token_id, device, run.plugin.row_logps(run), run.padding)
        log(f"reference log-probabilities: {source}")
    start_step, position_line = checkpoint.load_checkpoint(run, resume) if resume else (0, "")
    if position_line:  # another global batch: the batch sequence cannot continue exactly
        log(position_line)
    checks.refuse_non_finite(module := run.model.unwrap(unwrap_peft=False), cfg, resume)  # this rank's plain (peft) model, for parameter checks

    eval_before = run_eval(run, data.eval, tokenizer.pad_token_id, data.eval_by_source)
    log(f"eval {'at the resumed step' if start_step else 'before training'}: {eval_line(eval_before)}")
    if is_main():
        eval_before = outputs.first_eval(writer, eval_before, start_step)  # a resumed run keeps the untrained model's
    fingerprints_before = plugin_spec.fingerprints(module)

    if steps_heap:  # what the evaluation's activations left in the heap: the training peak starts from what the run holds
        glibc.release_freed_heap()
    profiler.reset_peak()
    history = fit(run, dataloader, run.total_steps, data, tokenizer.pad_token_id, profiler, writer, start_step)
    profiler.record_train_peak()
    if steps_heap:  # the steps' activations: after_training shows what the run still holds
        glibc.release_freed_heap()
    log(profiler.format(profiler.record("after_training")))
    if not history["steps"] and not start_step:  # every step skipped (on every rank alike): final/ would be the untrained model
        raise TrainingError(f"all {run.total_steps} step(s) had a non-finite loss and were skipped (train.on_nan=skip): nothing was trained, so no final/ is written{last_checkpoint_note(cfg)}")

    eval_after = run_eval(run, data.eval, tokenizer.pad_token_id, data.eval_by_source)
    log(f"eval after training:  {eval_line(eval_after)}")
    probe = data.eval[:PROBE_SAMPLES]
    # An eval set no larger than the probe is the probe: eval_after scored the same batches already.
    probe_loss = eval_after["loss"] if len(probe) == len(data.eval) else run_eval(run, probe, tokenizer.pad_token_id)["loss"]
    parameter_changes = checks.compare(fingerprints_before, plugin_spec.fingerprints(module))
    digests = checks.replica_digests(module) if run.layout.replicated else []
    peaks = peak_bytes_per_rank(max(stage.peak_bytes for stage in profiler.stages))  # pipeline stages and shards differ
    builds = peak_bytes_per_rank(profiler.build_bytes())  # each rank's memory for building the model: the node's is their sum

    final = checkpoint.write_final(run, tokenizer)
    if not is_main():
        return
    outputs.drop_previous(cfg.output_dir)  # this run's final/ is written: an overwritten run's results go
    prompts = task.generation_prompts(data.eval_records, cfg.eval.num_generation_prompts)
    reload = reload_final(final, cfg, method, task, tokenizer, prompts, probe, reload_device(cfg, method, device))
    if run.faults.at("reload_mismatch", 0):
        reload["probe_loss"] += 1.0
    reload.update(trained_probe_loss=probe_loss, ok=reload_matches(reload["probe_loss"], probe_loss, cfg.train.precision))
    memory = {**profiler.summary(), "peak_bytes_per_rank": peaks, "build_bytes_per_rank": builds, "model_weights": model_weights.as_dict()}
    # What finetune.estimate predicts for this very setup, for the widest batch this rank drew (its peak's): a batch is
    # padded to its longest row, and under the chunked loss only its label tokens reach the head. A run that drew
    # none (resumed at its last step): batches as long as the longest (packed) row, every row scored throughout.
    seq_len, label_len = history["widest_batch"]
    if not seq_len:
        seq_len = run.padding(cfg.data.max_length if packed else max(len(s["input_ids"]) for s in data.train))
        label_len = 0 if packed else max_label_tokens(data.train)  # packed rows: up to seq_len
    trainable, total = run.parameter_counts
    facts = {"trainable": trainable, "total": total, "total_steps": run.total_steps, "steps_per_epoch": run.steps_per_epoch, "start_step": start_step, "resume": resume, "wall_start": wall_start, "seq_len": seq_len, "label_len": label_len}
    outputs.finish(writer, run, data, history, (eval_before, eval_after), memory, reload, parameter_changes, digests, final, facts, profiler, dataloader if packed else None)
    if not reload["ok"]:  # raised after summary.json is written: the evidence stays
        raise ReloadMismatch(f"{final}: the trained model's probe loss is {probe_loss} (its outputs hold NaN or inf): the saved artifact is not usable (details in summary.json)" if not math.isfinite(probe_loss) else f"{final}: reloaded, it gives probe loss {reload['probe_loss']:.6f}, the trained model {probe_loss:.6f}; the saved artifact is not the trained model (details in summary.json, reload)")


def run_main(argv: list[str]) -> int:
    """main(argv) and its exit code: 0; 2 for a user error, said in one line on stderr; 3 when preempted."""
    try:
        try:
            main(argv)
        except RuntimeError as err:
            raise collective_timeout(err) or rank_lost(err) or err
    except FinetuneError as err:
        if os.environ.get("RANK", "0") == "0" or isinstance(err, (CollectiveTimeout, RankLost)):  # only the waiting rank knows
            print(f"error: {err}", file=sys.stderr, flush=True)
        else:
            # The launcher stops every rank as soon as one exits: leave rank 0 time to say why. Still here,
            # this rank's error was its own (rank 0 did not raise it), so it says it, naming itself.
            time.sleep(RANK_EXIT_GRACE_S)
            print(f"error (rank {os.environ['RANK']}): {err}", file=sys.stderr, flush=True)
        return 2
    except Preempted as stop:
        log(str(stop))
        return PREEMPTED_EXIT_CODE
    return 0


def cli() -> None:
    """Entry point: run_main's exit code, the process groups destroyed on the way out."""
    try:
        sys.exit(run_main(sys.argv[1:]))
    finally:
        if dist.is_available() and dist.is_initialized():
            destroy_process_groups()


RANK_EXIT_GRACE_S = 3

if __name__ == "__main__":
    cli()
