"""Fine-tune a causal language model with a ColossalAI Booster.

    colossalai run --nproc_per_node=2 finetune/train.py                  # the quickstart (embedded default)
    colossalai run --nproc_per_node=2 finetune/train.py --config booster_configs/torch_ddp.yaml model.name=gpt2
    python finetune/train.py model.name=tiny-gpt2 method=full train.max_steps=5   # one process

Reads top to bottom: config -> process group -> model -> data -> booster -> evaluate -> fit ->
evaluate -> save -> reload check -> summary. Every rank runs the same code; rank 0 prints and writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python finetune/train.py): make `finetune` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta

# Set before the imports below emit them. Optional extras that ColossalAI and bitsandbytes mention on
# import (TensorNVMe async save, apex fused norms, the `kernels` package's faster CPU 4-bit matmul) are
# not used by this tool; their notices would bury the report or an error line.
warnings.filterwarnings("ignore", message=r"Please install (the latest tensornvme|apex)")
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# bitsandbytes' 8-bit matmul computes in fp16 by design and says so on every layer's first call.
warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")

import torch
import torch.distributed as dist
from peft import get_peft_model
from peft.utils.other import fsdp_auto_wrap_policy
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from finetune import checkpoint, checks, compat, patches
from finetune.faults import Faults
from finetune.lora_tp import lora_policy
from finetune.assets import AssetError
from finetune.booster import PLUGINS, Layout, build_booster, parallel_layout
from finetune.config import Config, ConfigError, QuantizationConfig, help_text, load_config, output_problems, to_dict
from finetune.data import DataError, build_data, collate, load_splits, model_inputs, non_pad_tokens
from finetune.estimate import compare_with_run
from finetune.evaluation import best_eval, eval_line, evaluate, evaluate_classification, generate, module_batch_loss, module_logits, summed_loss
from finetune.model import ModelError, build_lora_config, build_model, count_parameters, inject_lora, trainable_line
from finetune.outputs import RunOutputs, tee_rank_output
from finetune.packing import collate_packed, pack, packed_attention
from finetune.profiler import GB, MemoryProfiler
from finetune.quantization import format_weight_bytes, weight_bytes
from finetune.tasks import build_task



class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss under train.on_nan=stop)."""


# Reported as one `error:` line and exit code 2, never as a traceback.
USER_ERRORS = (ConfigError, DataError, ModelError, AssetError, checkpoint.CheckpointError, TrainingError, compat.CompatError, patches.PatchError)


def is_main() -> bool:
    return dist.get_rank() == 0


def log(message: str) -> None:
    """Print on rank 0 only."""
    if is_main():
        print(message, flush=True)


def launch(cfg: Config) -> torch.device:
    """Create the process group (gloo on CPU, nccl on CUDA) under torchrun, or alone for plain python."""
    if "RANK" not in os.environ:  # plain `python finetune/train.py`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cfg.launch.rank_logs:
        tee_rank_output(cfg.output_dir, int(os.environ["RANK"]))
    compat.apply()  # before colossalai touches its CPU accelerator; a no-op on CUDA
    patches.apply()  # ColossalAI bugs that bite on every device
    from colossalai.accelerator import get_accelerator
    from colossalai.utils import set_seed

    # What colossalai.launch_from_torch does, plus the collective timeout it cannot take.
    accelerator = get_accelerator()
    dist.init_process_group(backend=accelerator.communication_backend, timeout=timedelta(seconds=cfg.launch.timeout_s))
    if accelerator.support_set_device:
        accelerator.set_device(int(os.environ["LOCAL_RANK"]))
    set_seed(cfg.train.seed)
    return accelerator.get_current_device()


@contextlib.contextmanager
def main_rank_first():
    """Rank 0 runs the block first (e.g. converting a model into the cache), then the others.

    A user error in rank 0's block is raised on every rank, so all stop with rank 0's one line
    instead of the others dying in a barrier.
    """
    failure: list[Exception | None] = [None]
    if not is_main():
        dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            raise failure[0]
        yield
        return
    try:
        yield
    except USER_ERRORS as err:
        failure[0] = err
        raise
    finally:
        dist.broadcast_object_list(failure, src=0)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.train.lr, momentum=0.9, weight_decay=cfg.train.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int):
    """Warmup, then constant, linear or cosine decay over total_steps."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.train.lr_scheduler == "constant" else cfg.train.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=total_steps)


def batches_forever(dataloader, grad_accum_steps: int, steps_per_epoch: int, start_step: int = 0):
    """Yield (epoch, micro-batches of one optimizer step), reshuffling each epoch.

    Resuming after `start_step` steps continues with the next unseen batch: the sampler's order depends
    only on train.seed and the epoch, so the batches already consumed in that epoch are skipped.
    """
    epoch, skip = divmod(start_step, steps_per_epoch)
    skip *= grad_accum_steps
    while True:
        if hasattr(dataloader.sampler, "set_epoch"):
            dataloader.sampler.set_epoch(epoch)
        micro_batches = []
        for index, batch in enumerate(dataloader):
            if index < skip:
                continue
            micro_batches.append(batch)
            if len(micro_batches) == grad_accum_steps:
                yield epoch, micro_batches
                micro_batches = []
        epoch, skip = epoch + 1, 0


@dataclass
class Run:
    """What the loop needs, built once in main()."""

    cfg: Config
    booster: object
    layout: Layout
    model: torch.nn.Module  # the boosted model
    optimizer: object
    scheduler: object
    device: torch.device
    num_microbatches: int  # pipeline only: micro-batches per step
    pad_to: int  # pipeline only: every batch is padded to this many tokens
    lora_config: object  # peft LoraConfig when adapters (LoRA/QLoRA) are what trains and what checkpoints hold, else None
    steps_per_epoch: int
    faults: Faults
    labels: list[str] | None = None  # classification: the label set, class id = position


def train_step(run: Run, micro_batches: list[dict], step: int) -> tuple[float, int]:
    """One optimizer step over the micro-batches; returns (mean loss, non-pad tokens) of this rank.

    Raises:
        TrainingError: a rank's loss is not finite and train.on_nan=stop (no update is applied).
    """
    cfg, booster, model, optimizer = run.cfg, run.booster, run.model, run.optimizer
    spec = PLUGINS[cfg.plugin.name]
    # Plugins that own precision cast the model themselves; for the others bf16 is autocast here.
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16" and not spec.takes_precision)
    loss_sum, tokens = 0.0, 0
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(run.device) for k, v in batch.items()}
        tokens += non_pad_tokens(batch)
        if run.layout.pipeline:  # micro-batching happens inside the pipeline schedule
            out = booster.execute_pipeline(iter([batch]), model, criterion=lambda outputs, _: outputs.loss, optimizer=optimizer, return_loss=True)
            loss_sum += out["loss"].item() if out["loss"] is not None else 0.0  # the loss exists on the last stage
            continue
        # Gradients are all-reduced only on the last micro-batch of the step, where the plugin can defer it.
        defer = i < len(micro_batches) - 1 and booster.plugin.support_no_sync()
        with booster.no_sync(model, optimizer) if defer else contextlib.nullcontext():
            with autocast:
                loss = model(**model_inputs(batch)).loss / len(micro_batches)
            booster.backward(loss, optimizer)
        loss_sum += loss.item()
    if run.faults.at("nan_at_step", step):
        loss_sum = float("nan")
    if not_finite_anywhere(loss_sum, run.device):
        optimizer.zero_grad()
        if cfg.train.on_nan == "stop":
            raise TrainingError(f"step {step}: the loss is not finite; stopped before updating the weights (train.on_nan=skip drops such steps instead){last_checkpoint_note(cfg)}")
        log(f"step {step}: the loss is not finite; this step's update is skipped (train.on_nan=skip)")
        return loss_sum, tokens
    if cfg.train.max_grad_norm > 0 and spec.fsdp:
        model.module.clip_grad_norm_(cfg.train.max_grad_norm)  # FSDP's own: the norm over all shards
    elif cfg.train.max_grad_norm > 0 and not spec.takes_max_norm:
        optimizer.clip_grad_by_norm(cfg.train.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    return loss_sum, tokens


def not_finite_anywhere(loss: float, device) -> bool:
    """Whether any rank's loss is NaN or infinite (all ranks must agree to skip or stop together)."""
    flag = torch.tensor([0.0 if math.isfinite(loss) else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def last_checkpoint_note(cfg: Config) -> str:
    found = checkpoint.complete_checkpoints(cfg.output_dir)
    return f"; the last good checkpoint is {found[-1]} (resume_from=latest)" if found else "; no checkpoint was written (checkpoint.every_steps)"


@contextlib.contextmanager
def colossalai_errors_only():
    """Silence ColossalAI's warnings in a block (its logger writes a warning as two records, caller and text)."""
    logger = logging.getLogger("colossalai")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def pipeline_eval_pass(run: Run, batch: dict, criterion, return_outputs: bool = False) -> dict:
    """One batch through the pipeline schedule without training: loss (and outputs) on the last stage, None elsewhere."""
    if return_outputs:  # ColossalAI warns on every such call that kept outputs cost memory (one eval batch here)
        with colossalai_errors_only():
            return _pipeline_eval_pass(run, batch, criterion, return_outputs)
    return _pipeline_eval_pass(run, batch, criterion, return_outputs)


def _pipeline_eval_pass(run: Run, batch: dict, criterion, return_outputs: bool) -> dict:
    if to_dict(run.cfg)["plugin"].get("pp_style") == "interleaved":
        # ColossalAI 0.5.0's forward-only interleaved pass hangs on gloo; its training pass does
        # not. Evaluate through the training pass (the model is in eval mode), then drop the grads.
        with torch.enable_grad():
            out = run.booster.execute_pipeline(iter([batch]), run.model, criterion=criterion, optimizer=run.optimizer, return_loss=True, return_outputs=return_outputs)
        run.optimizer.zero_grad()
        return out
    return run.booster.execute_pipeline(iter([batch]), run.model, criterion=criterion, optimizer=None, return_loss=True, return_outputs=return_outputs)


def make_batch_loss(run: Run):
    """Summed eval loss of one batch under this plugin (through the pipeline schedule under PP)."""
    if not run.layout.pipeline:
        return module_batch_loss(run.model)

    def batch_loss(batch: dict) -> torch.Tensor:
        out = pipeline_eval_pass(run, batch, summed_loss)
        if out["loss"] is None:  # not the last stage
            return torch.zeros((), device=run.device)
        return out["loss"] * run.num_microbatches  # the schedule averages over micro-batches

    return batch_loss


def make_batch_logits(run: Run):
    """Class logits of one batch under this plugin; under PP they exist on the last stage only (None elsewhere)."""
    if not run.layout.pipeline:
        return module_logits(run.model)

    def batch_logits(batch: dict) -> torch.Tensor | None:
        # The loss is not used (computed from the logits instead): an all-filler micro-batch makes it NaN.
        out = pipeline_eval_pass(run, batch, lambda outputs, _: outputs.loss, return_outputs=True)
        return out["outputs"]["logits"] if out["outputs"] is not None else None

    return batch_logits


def run_eval(run: Run, samples: list[dict], pad_token_id: int) -> dict:
    """Distributed eval of the boosted model (in eval mode) on samples."""
    batch_size = run.cfg.train.batch_size if run.layout.pipeline else run.cfg.eval.batch_size
    run.model.eval()
    if run.labels:
        result = evaluate_classification(make_batch_logits(run), samples, batch_size, pad_token_id, run.device, run.layout, len(run.labels), run.pad_to)
    else:
        result = evaluate(make_batch_loss(run), samples, batch_size, pad_token_id, run.device, run.layout, run.pad_to)
    run.model.train()
    return result


def peak_bytes_per_rank(profiler: MemoryProfiler) -> list[int]:
    """Every rank's highest memory peak over its recorded stages, on every rank (a collective)."""
    peaks: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(peaks, max(stage.peak_bytes for stage in profiler.stages))
    return peaks


def eval_metrics(step: int, result: dict) -> dict:
    """A metrics.jsonl line of an eval result."""
    return {"step": step, **{f"eval_{k}": v for k, v in result.items() if k not in ("tokens", "samples")}}


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few numbers over all ranks."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def fit(run: Run, dataloader, total_steps: int, eval_samples: list[dict], pad_token_id: int, profiler, outputs, start_step: int = 0) -> dict:
    """The training loop: step, log, evaluate every eval.every_steps, checkpoint every checkpoint.every_steps.

    Returns the loss history (earlier steps of a resumed run included, from metrics.jsonl) and throughput.
    """
    cfg = run.cfg
    steps, losses, eval_history = resumed_history(outputs, start_step) if is_main() else ([], [], [])
    train_tokens, train_rows, train_s = 0, 0, 0.0
    run.model.train()
    batches = batches_forever(dataloader, cfg.train.grad_accum_steps, run.steps_per_epoch, start_step)
    # A context, so the bar's line is ended even when a step raises: an error line then stands alone.
    with tqdm(total=total_steps, initial=start_step, desc="train", disable=not is_main(), dynamic_ncols=True) as progress:
        for step, (epoch, micro_batches) in enumerate(batches, start=start_step + 1):
            if step > total_steps:
                break
            started = time.perf_counter()
            loss, tokens = train_step(run, micro_batches, step)
            run.scheduler.step()
            elapsed = time.perf_counter() - started
            memory = profiler.record_step(step)
            # One rank per data-parallel replica counts, so TP/PP ranks that share a batch count it once.
            rows = sum(len(b["input_ids"]) for b in micro_batches)  # sequences (packed rows under packing)
            loss_sum, token_sum, row_sum = all_reduce_sum([loss, tokens, rows] if run.layout.counts else [0.0, 0.0, 0.0], run.device)
            mean_loss = loss_sum / run.layout.dp_size
            train_tokens += int(token_sum)
            train_rows += int(row_sum)
            train_s += elapsed
            if not math.isfinite(mean_loss):  # skipped under train.on_nan=skip (stop raised in train_step)
                if is_main():
                    outputs.log_metrics({"step": step, "epoch": epoch, "skipped": "non-finite loss"})
            else:
                steps.append(step)
                losses.append(mean_loss)
            if is_main() and math.isfinite(mean_loss) and (step % cfg.train.log_every == 0 or step == total_steps):
                outputs.log_metrics(
                    {
                        "step": step,
                        "epoch": epoch,
                        "loss": mean_loss,
                        "lr": run.scheduler.get_last_lr()[0],
                        "tokens": int(token_sum),
                        "tokens_per_s": token_sum / elapsed,
                        "step_s": elapsed,
                        "memory": {"current_bytes": memory.current_bytes, "peak_bytes": memory.peak_bytes},
                    }
                )
            progress.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{token_sum / elapsed:.0f}")
            progress.update()
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < total_steps:
                result = run_eval(run, eval_samples, pad_token_id)
                eval_history.append({"step": step, **result})
                log(f"step {step}: eval {eval_line(result)}")
                if is_main():
                    outputs.log_metrics(eval_metrics(step, result))
            every = cfg.checkpoint.every_steps
            if every and (step % every == 0 or step == total_steps):
                saved = checkpoint.save_checkpoint(run, step, run.steps_per_epoch, run.lora_config, run.faults)
                log(f"step {step}: checkpoint {saved}")
            run.faults.maybe_kill("kill_after_step", step)
            if step == total_steps:
                break
    return {
        "steps": steps,
        "losses": losses,
        "eval_history": eval_history,
        "throughput": {
            "tokens_per_s": train_tokens / train_s if train_s else 0.0,
            "sequences_per_s": train_rows / train_s if train_s else 0.0,
            "train_tokens": train_tokens,
            "train_s": train_s,
        },
    }


def resumed_history(outputs, start_step: int) -> tuple[list[int], list[float], list[dict]]:
    """Steps, losses and evals a resumed run had logged before its checkpoint (empty for a new run)."""
    records = [r for r in outputs.read_metrics() if 0 < r["step"] <= start_step] if start_step else []
    train = [r for r in records if "loss" in r]
    evals = [{"step": r["step"], **{k.removeprefix("eval_"): v for k, v in r.items() if k.startswith("eval_") and k != "eval_best"}} for r in records if "eval_loss" in r]
    return [r["step"] for r in train], [r["loss"] for r in train], evals


def save_final(run: Run, tokenizer, lora_config) -> Path:
    """final/: a peft adapter dir (LoRA) or a HF model dir (full), written beside and renamed into place."""
    cfg = run.cfg
    final = Path(cfg.output_dir) / "final"
    staging = Path(cfg.output_dir) / "final.partial"
    if is_main():
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    if lora_config and cfg.plugin.name == "hybrid_parallel":  # injected adapters: gather every split and stage, write peft's layout
        adapter = checkpoint.gathered_adapter_state(run.model.unwrap(), pipeline=run.layout.pipeline)
        if is_main():
            checkpoint.write_adapter_dir(adapter, lora_config, cfg.model.name, staging)
    elif PLUGINS[cfg.plugin.name].fsdp:  # gather the full state dict on rank 0, write it with HF / peft
        state = checkpoint.fsdp_full_state_dict(run.model.module)
        if is_main():
            run.model.module.module.save_pretrained(staging, state_dict=state, safe_serialization=True)
    elif lora_config:
        run.booster.save_lora_as_pretrained(run.model, str(staging), use_safetensors=True)
    elif run.layout.replicated:
        if is_main():  # a full replica on every rank: HF's own writer (safetensors, tied weights once)
            run.model.unwrap().save_pretrained(staging, safe_serialization=True)
    else:  # sharded: every rank takes part in gathering the weights into HF layout
        run.booster.save_model(run.model, str(staging), shard=True, use_safetensors=True)
        if is_main():
            run.model.unwrap().config.save_pretrained(staging)
    if is_main():
        tokenizer.save_pretrained(staging)
        if run.labels:  # the class ids of the head (an adapter dir has no config.json to hold them)
            (staging / "labels.json").write_text(json.dumps(run.labels, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)  # only a complete save becomes final/
    dist.barrier()
    return final


def reload_final(final: Path, cfg: Config, tokenizer, prompts: list[dict], probe: list[dict], device, labels: list[str] | None) -> dict:
    """Rank 0: load the base and then final/ the way a user would; generate with both (LM tasks), score the probe."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    task = build_task(cfg.task, cfg.data, labels or ())
    prompt_ids = [task.prompt_ids(tokenizer, r) for r in prompts]
    # Named configs: the same seed gives the same base. QLoRA adapters go onto a freshly quantized base.
    base, _ = build_model(cfg.model, cfg.train.seed, labels=labels, quantization=quantization_for(cfg), precision=cfg.train.precision)
    if cfg.method != "qlora":  # a quantized model is loaded onto its device, and transformers refuses to move 8-bit ones
        base.to(device)
    before = generate(base, tokenizer, prompt_ids, cfg.eval.max_new_tokens, device)
    if cfg.method in ("lora", "qlora"):
        from peft import PeftModel

        reloaded, loader = PeftModel.from_pretrained(base, str(final)), "PeftModel.from_pretrained"
    else:
        del base
        auto_model = AutoModelForSequenceClassification if labels else AutoModelForCausalLM
        reloaded, loader = auto_model.from_pretrained(str(final), torch_dtype=torch.float32), f"{auto_model.__name__}.from_pretrained"
    if cfg.method != "qlora":
        reloaded.to(device)
    reloaded.eval()
    after = generate(reloaded, tokenizer, prompt_ids, cfg.eval.max_new_tokens, device)
    if labels:
        probe_loss = evaluate_classification(module_logits(reloaded), probe, cfg.eval.batch_size, tokenizer.pad_token_id, device, None, len(labels))["loss"]
    else:
        probe_loss = evaluate(module_batch_loss(reloaded), probe, cfg.eval.batch_size, tokenizer.pad_token_id, device, layout=None)["loss"]
    generations = [{"prompt": task.prompt_text(r), "reference": task.reference(r), "before": b, "after": a} for r, b, a in zip(prompts, before, after)]
    return {"loader": loader, "probe_loss": probe_loss, "generations": generations}


def quantization_for(cfg: Config) -> QuantizationConfig | None:
    """The base model's quantization: the quantization section under method=qlora, else none."""
    return cfg.quantization if cfg.method == "qlora" else None


def apply_method(cfg: Config, model: torch.nn.Module, booster, plugin, layout: Layout):
    """Full fine-tuning leaves the model as it is; (Q)LoRA adds adapters the way this plugin can hold them.

    Returns:
        (model, the peft LoraConfig or None)
    """
    if cfg.method == "full":
        return model, None
    lora_config = build_lora_config(model, cfg.lora)
    torch.manual_seed(cfg.train.seed)  # adapter init independent of whatever consumed random numbers before
    if cfg.plugin.name == "hybrid_parallel":
        # enable_lora's PeftModel wrapper hides the model from ColossalAI's pipeline policies, and it
        # refuses tensor parallelism: adapters are injected, then sharded by finetune.lora_tp.
        return inject_lora(model, lora_config), lora_config
    if PLUGINS[cfg.plugin.name].fsdp:  # ColossalAI's FSDP plugin refuses LoRA; peft + FSDP's wrap policy work
        model = get_peft_model(model, lora_config)
        plugin.fsdp_kwargs["auto_wrap_policy"] = fsdp_auto_wrap_policy(model)
        return model, lora_config
    return booster.enable_lora(model, lora_config=lora_config), lora_config


def shard_policy(cfg: Config, model: torch.nn.Module):
    """The shardformer policy of our own for this model and method under hybrid_parallel; None: ColossalAI's.

    RoBERTa has no ColossalAI policy: ours (finetune.roberta_policy). LoRA with tensor parallelism wraps
    the model's policy (ours or ColossalAI's) so each adapter is sharded with the layer it adapts.
    """
    if cfg.plugin.name != "hybrid_parallel":
        return None
    from finetune import roberta_policy  # imports ColossalAI's shardformer

    own = roberta_policy.shard_policy(model)
    if cfg.method != "lora" or to_dict(cfg)["plugin"]["tp_size"] == 1:
        return own
    return lora_policy(model, own)  # shards each adapter with the layer it adapts


def build_dataloader(cfg: Config, plugin, samples: list[dict], pad_token_id: int, pad_to: int, packed: str = ""):
    """The plugin's distributed dataloader: shuffled by train.seed, full batches only.

    Args:
        packed: with packing, how packed batches mark sample boundaries (finetune.packing.packed_attention);
            the batches are then packed rows.
    """
    if packed:
        samples = pack(samples, cfg.data.max_length)
        collate_fn = functools.partial(collate_packed, pad_token_id=pad_token_id, attention=packed)
    else:
        collate_fn = functools.partial(collate, pad_token_id=pad_token_id, pad_to=pad_to)
    return plugin.prepare_dataloader(
        samples,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        seed=cfg.train.seed,
        drop_last=True,
        collate_fn=collate_fn,
        # ColossalAI seeds only its workers; the sampler's shuffling must follow train.seed too.
        distributed_sampler_cls=functools.partial(DistributedSampler, seed=cfg.train.seed),
        # Each new epoch iterator draws a seed; from its own generator it leaves the global RNG (dropout)
        # alone, so a resumed run, which starts a new iterator mid-epoch, draws the same dropout masks.
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )


PROBE_SAMPLES = 16  # eval samples on which the reloaded artifact must reproduce the trained model's loss


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(__doc__ + "\nConfig keys (key=value overrides, --config FILE repeatable):\n" + help_text())
        return
    cfg = load_config(argv, has_cuda=torch.cuda.is_available())  # before any heavy work
    problems = output_problems(cfg)
    if problems:
        raise ConfigError(problems[0])
    resume = checkpoint.resolve_resume(cfg)  # verified complete and compatible before any model is built
    resume_state = checkpoint.read_state(resume) if resume else None
    changed = checkpoint.check_compatible(resume_state, cfg, int(os.environ.get("WORLD_SIZE", "1")), resume) if resume else []
    wall_start = time.perf_counter()
    device = launch(cfg)
    outputs = start_outputs(cfg, resume_state) if is_main() else None
    if resume:
        log(f"resuming from {resume} (step {resume_state['step']})" + (f"; settings changed since: {', '.join(changed)}" if changed else ""))
    profiler = MemoryProfiler()
    log(profiler.format(profiler.record("start")))

    splits = load_splits(cfg.data, cfg.train.seed, cfg.task)  # bad rows fail here, before the model is built
    with main_rank_first():  # rank 0 converts a GGUF into the cache once; the others then load it
        model, tokenizer = build_model(
            cfg.model,
            cfg.train.seed,
            shardformer=cfg.plugin.name == "hybrid_parallel",
            labels=splits.labels,
            quantization=quantization_for(cfg),
            precision=cfg.train.precision,
        )
    log(profiler.format(profiler.record("model_loaded")))
    model_weights = weight_bytes(model)
    log(format_weight_bytes(model_weights))
    with main_rank_first():  # rank 0 tokenizes into the data cache; the others then read it
        data = build_data(cfg.data, tokenizer, splits)
    log(f"data: {len(data.train)} train / {len(data.eval)} eval samples ({data.truncated} truncated, {data.dropped} dropped at {cfg.data.max_length} tokens; cache {data.cache})")
    packed = packed_attention(model) if cfg.data.packing else ""  # before any wrapper hides the model

    booster, plugin = build_booster(cfg.plugin.name, cfg.plugin.options, cfg.train.precision, cfg.train.max_grad_norm, shard_policy(cfg, model))
    layout = parallel_layout(cfg.plugin.name, plugin)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, lora_config = apply_method(cfg, model, booster, plugin, layout)
    trainable, total = count_parameters(model)
    log(trainable_line(trainable, total))

    optimizer = build_optimizer(model, cfg)
    # Pipeline stages exchange activations whose shapes ColossalAI caches after the first step, so
    # under PP every batch is padded to data.max_length (non-pad tokens are still what is counted).
    pad_to = cfg.data.max_length if layout.pipeline else 0
    dataloader = build_dataloader(cfg, plugin, data.train, tokenizer.pad_token_id, pad_to, packed)
    steps_per_epoch = len(dataloader) // cfg.train.grad_accum_steps
    if steps_per_epoch == 0:
        rows = f"{len(dataloader.dataset)} packed rows of " if packed else ""
        raise DataError(f"{cfg.data.train_path}: {rows}{len(data.train)} samples are too few for one step of {cfg.train.batch_size} x {cfg.train.grad_accum_steps} on {layout.dp_size} data-parallel rank(s)")
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    model, optimizer, _, dataloader, scheduler = booster.boost(model, optimizer, dataloader=dataloader, lr_scheduler=scheduler)
    if PLUGINS[cfg.plugin.name].fsdp:
        # ColossalAI's FSDP plugin re-creates the optimizer's param groups over the FSDP parameters,
        # dropping the lr the scheduler had set (0 during warmup): put the scheduled lr back.
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    log(profiler.format(profiler.record("boosted")))
    run = Run(cfg, booster, layout, model, optimizer, scheduler, device, num_microbatches(cfg), pad_to, lora_config, steps_per_epoch, Faults(), data.labels)
    if cfg.lora.init_from and not resume:  # a resumed run's checkpoint holds the adapter already
        checkpoint.init_adapter(run, Path(cfg.lora.init_from))
        log(f"adapter initialised from {cfg.lora.init_from}")
    start_step = checkpoint.load_checkpoint(run, resume, lora=lora_config is not None)["step"] if resume else 0
    module = model.unwrap(unwrap_peft=False)  # this rank's plain (peft) model, for parameter checks

    eval_before = run_eval(run, data.eval, tokenizer.pad_token_id)
    log(f"eval {'at the resumed step' if start_step else 'before training'}: {eval_line(eval_before)}")
    if is_main():
        # A resumed run keeps the untrained model's eval that the first run logged as "before".
        logged = [r for r in outputs.read_metrics() if r["step"] == 0 and "eval_loss" in r] if start_step else []
        if logged:
            eval_before = {k.removeprefix("eval_"): v for k, v in logged[0].items() if k.startswith("eval_")}
        else:
            outputs.log_metrics(eval_metrics(0, eval_before))
    fingerprints_before = checks.fingerprints(module)

    profiler.reset_peak()
    history = fit(run, dataloader, total_steps, data.eval, tokenizer.pad_token_id, profiler, outputs, start_step)
    profiler.record_train_peak()
    log(profiler.format(profiler.record("after_training")))

    eval_after = run_eval(run, data.eval, tokenizer.pad_token_id)
    log(f"eval after training:  {eval_line(eval_after)}")
    probe = data.eval[:PROBE_SAMPLES]
    probe_loss = run_eval(run, probe, tokenizer.pad_token_id)["loss"]
    parameter_changes = checks.compare(fingerprints_before, checks.fingerprints(module))
    digests = checks.replica_digests(module) if layout.replicated else []
    peaks = peak_bytes_per_rank(profiler)  # pipeline stages and shards differ: every rank's, for reports

    final = save_final(run, tokenizer, lora_config)
    if not is_main():
        return
    prompts = generation_prompts(cfg, data.eval_records, data.labels)
    reload = reload_final(final, cfg, tokenizer, prompts, probe, device, data.labels)
    tolerance = 1e-4 if cfg.train.precision == "fp32" else 2e-2
    reload.update(trained_probe_loss=probe_loss, ok=abs(reload["probe_loss"] - probe_loss) <= tolerance * max(1.0, abs(probe_loss)))
    generations = reload.pop("generations")
    outputs.write_json("generations.json", generations)
    all_evals = [{"step": 0, **eval_before}, *history["eval_history"], {"step": total_steps, **eval_after}]
    best, last = best_eval(all_evals), all_evals[-1]
    outputs.log_metrics({**eval_metrics(total_steps, eval_after), "eval_best": best})  # the last eval, and the best
    outputs.plot_loss(history["steps"], history["losses"], [(e["step"], e["loss"]) for e in all_evals])
    memory = {**profiler.summary(), "peak_bytes_per_rank": peaks, "model_weights": model_weights.as_dict()}
    # What finetune.estimate predicts for this very setup, for batches as long as the longest (packed) row.
    seq_len = pad_to or (cfg.data.max_length if packed else max(len(s["input_ids"]) for s in data.train))
    memory["estimate"] = compare_with_run(cfg, dist.get_world_size(), seq_len, memory)
    summary = {
        "model": cfg.model.name,
        "task": cfg.task,
        "method": cfg.method,
        "plugin": cfg.plugin.name,
        "plugin_options": to_dict(cfg)["plugin"],
        "world_size": dist.get_world_size(),
        "data_parallel_size": layout.dp_size,
        "precision": cfg.train.precision,
        "trainable_params": trainable,
        "all_params": total,
        "steps": total_steps,
        "epochs": total_steps / steps_per_epoch,
        "final_loss": history["losses"][-1],
        "eval": {"before": eval_before, "after": eval_after, "history": history["eval_history"], "best": best, "last": last},
        "throughput": history["throughput"],
        "memory": memory,
        "checks": {**parameter_changes, "replica_digests": digests, "replicas_identical": len(set(digests)) == 1 if digests else None},
        "reload": reload,
        "data": {
            "train_samples": len(data.train),
            "eval_samples": len(data.eval),
            "truncated": data.truncated,
            "dropped": data.dropped,
            "packed_rows": len(dataloader.dataset) if packed else None,
            "labels": data.labels,
            "cache": data.cache,
        },
        "final_dir": str(final),
        "resumed_from": {"checkpoint": str(resume), "step": start_step} if resume else None,
        "checkpoints": [str(path) for path in checkpoint.complete_checkpoints(cfg.output_dir)],
        "wall_s": time.perf_counter() - wall_start,
    }
    summary["artifacts"] = outputs.artifacts()
    outputs.write_json("summary.json", summary)
    print_report(summary, generations, profiler)


def start_outputs(cfg: Config, resume_state: dict | None) -> RunOutputs:
    """Rank 0: the run dir, emptied of an overwritten run's results, cleared of half-written checkpoints."""
    if cfg.overwrite_output_dir:
        for name in ("final", "final.partial", checkpoint.CHECKPOINTS, "summary.json", "generations.json"):
            path = Path(cfg.output_dir) / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    for partial in checkpoint.remove_partial(cfg.output_dir):
        log(f"removed the half-written checkpoint {partial}")
    outputs = RunOutputs(cfg.output_dir, resume_state["step"] if resume_state else None)
    outputs.write_config(to_dict(cfg))
    return outputs


def generation_prompts(cfg: Config, eval_records: list[dict], labels: list[str] | None) -> list[dict]:
    """The first eval.num_generation_prompts distinct held-out prompts (none for classification)."""
    if labels:
        return []
    task = build_task(cfg.task, cfg.data)
    return list({task.prompt_text(r): r for r in eval_records}.values())[: cfg.eval.num_generation_prompts]


def num_microbatches(cfg: Config) -> int:
    """Micro-batches per pipeline step (1 without a pipeline)."""
    options = to_dict(cfg)["plugin"]
    if options.get("pp_size", 1) <= 1:
        return 1
    return options["num_microbatches"] or cfg.train.batch_size // options["microbatch_size"]


def print_report(summary: dict, generations: list[dict], profiler: MemoryProfiler) -> None:
    """The closing report on rank 0."""
    ev = summary["eval"]
    print("\n" + "=" * 78)
    print(f"{summary['method']} fine-tune of {summary['model']} with {summary['plugin']} on {summary['world_size']} rank(s), {summary['steps']} steps")
    print(trainable_line(summary["trainable_params"], summary["all_params"]))
    print(f"eval before: {eval_line(ev['before'])}\neval after:  {eval_line(ev['after'])}\neval best:   {eval_line(ev['best'])} (step {ev['best']['step']})")
    print(f"throughput: {summary['throughput']['tokens_per_s']:.0f} non-pad tokens/s over all ranks")
    print("memory:")
    for stage in profiler.stages:
        print("  " + profiler.format(stage))
    estimate = summary["memory"]["estimate"]
    if estimate.get("ratio_measured_to_predicted"):
        print(f"  predicted train_step_peak: {estimate['predicted_train_step_peak_bytes'] / GB:.2f}GB (measured/predicted {estimate['ratio_measured_to_predicted']:.2f})")
    for g in generations:
        print(f"\nprompt:    {g['prompt']}\nreference: {g['reference']}\nbefore:    {g['before']}\nafter:     {g['after']}")
    reload = summary["reload"]
    size = sum(v for k, v in summary["artifacts"].items() if k.startswith("final/"))
    print(f"\nsaved: {summary['final_dir']} ({size / 1e6:.1f} MB)")
    verdict = "ok" if reload["ok"] else "MISMATCH"
    print(f"reloaded with {reload['loader']}: probe loss {reload['probe_loss']:.6f} vs trained {reload['trained_probe_loss']:.6f} ({verdict})")
    print(f"outputs: {Path(summary['final_dir']).parent}/ (summary.json, metrics.jsonl, loss.png, generations.json, config.yaml)")
    print(f"wall time: {summary['wall_s']:.0f} s")


RANK_EXIT_GRACE_S = 3


def cli() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        main(sys.argv[1:])
    except USER_ERRORS as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr, flush=True)
        else:
            # The launcher stops every rank as soon as one exits: leave rank 0 time to say why.
            time.sleep(RANK_EXIT_GRACE_S)
        sys.exit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    cli()
