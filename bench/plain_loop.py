"""The hand-written PyTorch loop the benchmarks compare finetune/train.py against.

    python bench/plain_loop.py OUT.json model.name=gpt2 train.batch_size=4 data.train_path=... [key=value ...]
    torchrun --nproc_per_node=2 bench/plain_loop.py OUT.json method=lora ...   # torch DDP (gloo), rank 0 writes
    python bench/plain_loop.py --smoke [OUT.json]     # a few steps of a tiny model (CI: tests/e2e/test_bench_smoke.py)

Same config keys as the trainer (so both loops get the same model, seed, data, batch and optimizer),
and nothing else: forward, backward, clip, AdamW step, scheduler step, zero_grad, loss.item(). method=lora
trains peft adapters (the LoRA config train.py builds); under torchrun the model is wrapped in
torch.nn.parallel.DistributedDataParallel and each rank takes every world_size-th batch row. Each step is
timed over the same window as train.py's `step_s` (the batch is already collated). Writes
{"step_s": [...], "tokens": [...]} (rank 0's) to OUT.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from finetune.config import load_config
from finetune.data import build_data, collate, load_splits, model_inputs
from finetune.model import build_lora_config, build_model


def main(out: str, argv: list[str]) -> None:
    cfg = load_config(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = build_model(cfg.model, cfg.train.seed)
    if cfg.method == "lora":
        from peft import get_peft_model

        torch.manual_seed(cfg.train.seed)
        model = get_peft_model(model, build_lora_config(model, cfg.lora))
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    params = [p for p in model.parameters() if p.requires_grad]
    data = build_data(cfg.data, tokenizer, load_splits(cfg.data, cfg.train.seed))
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)  # as train.py builds it
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (cfg.train.warmup_steps + 1)))
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cfg.train.seed)).tolist()
    size = cfg.train.batch_size * world  # a global batch, of which each rank takes its share
    batches = [collate([data.train[i] for i in order[j : j + size][rank::world]], tokenizer.pad_token_id) for j in range(0, len(order) - size + 1, size)]
    model.train()
    times, tokens = [], []
    for step in range(cfg.train.max_steps):
        batch = batches[step % len(batches)]
        started = time.perf_counter()
        loss = model(**model_inputs(batch)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        loss.item()
        times.append(time.perf_counter() - started)
        tokens.append(int(batch["attention_mask"].sum()))
    if rank == 0:
        Path(out).write_text(json.dumps({"step_s": times, "tokens": tokens}))
    if distributed:
        from finetune.distributed import destroy_process_groups  # torch's own teardown can hang in 2.5.1 (see there)

        destroy_process_groups()


def smoke(out: str | None) -> None:
    """A few steps of a tiny model on fixed-length data; OUT.json defaults to a new temporary directory."""
    from tests.conftest import write_fixed_length_file  # the fixed-length data bench/run.py trains on

    results = Path(out).parent if out else Path(tempfile.mkdtemp(prefix="bench-smoke-"))
    results.mkdir(parents=True, exist_ok=True)
    data = write_fixed_length_file(results / "fixed_length.jsonl")
    out = out or str(results / "plain_loop.json")
    main(out, ["model.name=tiny-gpt2", f"data.train_path={data}", "data.max_length=64", "data.max_eval_samples=8", "train.batch_size=1", "train.max_steps=3"])
    print(f"wrote {out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--smoke"]:
        smoke(sys.argv[2] if len(sys.argv) > 2 else None)
    else:
        main(sys.argv[1], sys.argv[2:])
