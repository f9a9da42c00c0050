"""The hand-written PyTorch loop the benchmark compares finetune/train.py against.

    python bench/plain_loop.py OUT.json model.name=gpt2 train.batch_size=4 data.train_path=... [key=value ...]
    python bench/plain_loop.py --smoke [OUT.json]     # a few steps of a tiny model (CI: tests/e2e/test_bench_smoke.py)

Same config keys as the trainer (so both loops get the same model, seed, data, batch and optimizer),
and nothing else: forward, backward, clip, AdamW step, scheduler step, zero_grad, loss.item(). Each
step is timed over the same window as train.py's `step_s` (the batch is already collated). Writes
{"step_s": [...], "tokens": [...]} to OUT.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from finetune.config import load_config
from finetune.data import build_data, collate, load_splits
from finetune.model import build_model


def main(out: str, argv: list[str]) -> None:
    cfg = load_config(argv)
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = build_model(cfg.model, cfg.train.seed)
    data = build_data(cfg.data, tokenizer, load_splits(cfg.data, cfg.train.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)  # as train.py builds it
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (cfg.train.warmup_steps + 1)))
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cfg.train.seed)).tolist()
    size = cfg.train.batch_size
    batches = [collate([data.train[i] for i in order[j : j + size]], tokenizer.pad_token_id) for j in range(0, len(order) - size + 1, size)]
    model.train()
    times, tokens = [], []
    for step in range(cfg.train.max_steps):
        batch = batches[step % len(batches)]
        started = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        loss.item()
        times.append(time.perf_counter() - started)
        tokens.append(int(batch["attention_mask"].sum()))
    Path(out).write_text(json.dumps({"step_s": times, "tokens": tokens}))


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
