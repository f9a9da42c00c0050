"""Sequence packing benchmark: non-pad tokens/s of finetune/train.py's training step with and without packing.

    python bench/packing.py                      # tiny-llama, one process, 16 steps of each at 8 and 16 rows per step
    python bench/packing.py --model /models/Llama-2-7b-hf --batch-sizes 4,8 --max-length 1024

The data are synthetic Alpaca-like records (no download): instruction, optional input and output
lengths drawn from long-tailed log-normal distributions close to Alpaca's (outputs: median ~45 words,
a tail past 400), filled with common English words, in the Alpaca template.

What runs is the app's own path: the config, data module (split, tokenization), model factory, the
TorchDDP Booster and `train.train_step` (forward, backward, clipping, AdamW), once over padded batches
(data.packing=false: each batch padded to its longest sample) and once over packed rows
(data.packing=true), with the same batch size (rows per step), for each batch size asked. The two alternate step by step on
one boosted model, so load from elsewhere on the machine hits both alike; the first steps of each
are not timed. Throughput = non-pad tokens / time in train_step. Padded batches spend compute on
pad tokens up to the longest sample of each batch; packed rows are nearly full, so the ratio
approaches the padding overhead, which the report also computes from the data. Target: >= 2x.
One process (a world of one). Writes bench/results/packing.md (--results DIR: DIR/packing.md).
`--smoke`: a few steps of the same path on a small data set, into a temporary directory (CI runs it: tests/e2e/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word but not what all were we when your can said "
    "there use an each which she do how their if will up other about out many then them these so some her would make like him into time has look two more "
    "write go see number no way could people my than first water been call who oil its now find long down day did get come made may part over new sound take "
    "only little work know place year live me back give most very after thing our just name good sentence man think say great where help through much before "
    "line right too mean old any same tell boy follow came want show also around form three small set put end does another well large must big even such because"
).split()


def lognormal_words(rng: random.Random, median: float, sigma: float, cap: int) -> str:
    """A text of a log-normally distributed number of words (at least one, at most cap)."""
    count = min(cap, max(1, round(rng.lognormvariate(math.log(median), sigma))))
    return " ".join(rng.choice(WORDS) for _ in range(count))


def alpaca_like_records(count: int, seed: int) -> list[dict]:
    """Synthetic {instruction, input, output} records with Alpaca-like, long-tailed lengths."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        has_input = rng.random() < 0.4  # about 40% of Alpaca records have an input
        records.append(
            {
                "instruction": lognormal_words(rng, 12, 0.45, 80),
                "input": lognormal_words(rng, 15, 0.9, 300) if has_input else "",
                "output": lognormal_words(rng, 45, 1.0, 600),
            }
        )
    return records


def training_samples(path: Path, max_length: int) -> tuple[list[dict], list[int]]:
    """The runs' training split tokenized as the runs do (GPT-2 tokenizer, Alpaca template), and the untruncated lengths."""
    from finetune.assets import gpt2_tokenizer
    from finetune.config import DataConfig
    from finetune.data import load_splits
    from finetune.tasks import build_task

    tokenizer, task = gpt2_tokenizer(), build_task("instruction", DataConfig())
    train = load_splits(DataConfig(train_path=str(path), max_eval_samples=8), seed=42).train
    return [task.tokenize(tokenizer, r, max_length)[0] for r in train], [len(task.token_labels(tokenizer, r)[0]) for r in train]


def length_stats(lengths: list[int], max_length: int) -> dict:
    """Mean, median, p90 and max of the token lengths, and how many exceed max_length."""
    ordered = sorted(lengths)
    return {
        "records": len(ordered),
        "mean": statistics.fmean(ordered),
        "median": statistics.median(ordered),
        "p90": ordered[int(0.9 * len(ordered))],
        "max": ordered[-1],
        "over_max_length": sum(n > max_length for n in ordered),
    }


def padding_fill(samples: list[dict], max_length: int, batch_size: int) -> dict:
    """Non-pad share of the tokens that padded batches (in the sampler's order) and packed rows compute, over one epoch."""
    from torch.utils.data import DistributedSampler

    from finetune.packing import pack

    order = list(DistributedSampler(samples, num_replicas=1, rank=0, shuffle=True, seed=42))
    batches = [[len(samples[i]["input_ids"]) for i in order[k : k + batch_size]] for k in range(0, len(order) - batch_size + 1, batch_size)]
    rows = [len(r["input_ids"]) for r in pack(samples, max_length)]
    row_batches = [rows[k : k + batch_size] for k in range(0, len(rows) - batch_size + 1, batch_size)]
    fill = lambda groups: sum(map(sum, groups)) / sum(len(g) * max(g) for g in groups)  # noqa: E731
    return {"padded_fill": fill(batches), "packed_fill": fill(row_batches)}


WARMUP_STEPS = 2  # not timed: the first steps of each build optimizer state and allocator caches


def measure(args: argparse.Namespace, data: Path, batch_size: int) -> dict[str, dict]:
    """Alternate padded and packed train_step calls on one boosted model; non-pad tokens and seconds of each."""
    import time

    import torch.distributed as dist
    from colossalai.accelerator import get_accelerator

    from finetune import train
    from finetune.config import load_config
    from finetune.data import Padding, batches_forever, build_data, load_splits
    from finetune.distributed import launch
    from finetune.faults import Faults
    from finetune.model import build_model
    from finetune.packing import packed_attention
    from finetune.run import build_dataloader, build_run

    cfg = load_config(
        [f"model.name={args.model}", "method=full", f"data.train_path={data}", f"data.max_length={args.max_length}", "data.max_eval_samples=8", "data.cache=false"]
        + [f"train.batch_size={batch_size}", "train.warmup_steps=0", "train.lr_scheduler=constant", "launch.rank_logs=false", "output_dir=/tmp/bench-packing"],
        world_size=1,
    )
    device = get_accelerator().get_current_device() if dist.is_initialized() else launch(cfg.output_dir, False, cfg.launch.timeout_s, cfg.train.seed)
    splits = load_splits(cfg.data, cfg.train.seed, cfg.task)
    model, tokenizer = build_model(cfg.model, cfg.train.seed)
    data = build_data(cfg.data, tokenizer, splits)
    attention = packed_attention(model)
    # The padded batches are the run's own dataloader; the packed ones come from the same plugin. No fit(): no stop signals to handle.
    run, padded = build_run(cfg, world_size=1, device=device, task=splits.task, model=model, pending=None, samples=data.train, pad_token_id=tokenizer.pad_token_id, faults=Faults(""), preemption=None)
    loaders = {"padded": padded, "packed": build_dataloader(cfg, run.booster.plugin, data.train, tokenizer.pad_token_id, Padding(), attention)}
    batches = {name: batches_forever(loader, 1, len(loader)) for name, loader in loaders.items()}
    totals = {name: {"steps": args.steps, "tokens": 0, "computed": 0, "seconds": 0.0, "rows": len(loader.dataset), "samples": len(data.train)} for name, loader in loaders.items()}
    run.model.train()
    for step in range(WARMUP_STEPS + args.steps):
        for name in ("padded", "packed"):
            micro_batches = next(batches[name])[1]
            started = time.perf_counter()
            _, tokens, _ = train.train_step(run, micro_batches, step + 1)
            if step >= WARMUP_STEPS:
                totals[name]["tokens"] += tokens
                totals[name]["computed"] += sum(b["input_ids"].numel() for b in micro_batches)  # pad included
                totals[name]["seconds"] += time.perf_counter() - started
    return totals


def device_line() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA)"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other work, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"


def report_section(batch_size: int, fill: dict, totals: dict[str, dict]) -> list[str]:
    """The results for one batch size: padding the data implies, then the measured steps."""
    rate = {name: t["tokens"] / t["seconds"] for name, t in totals.items()}
    lines = [
        f"## {batch_size} rows per step",
        "",
        f"Over one epoch in the sampler's order, {fill['padded_fill']:.0%} of the tokens padded batches of {batch_size} compute are real;"
        f" packed rows are {fill['packed_fill']:.0%} real. If a token costs the same either way, packing gains {fill['packed_fill'] / fill['padded_fill']:.2f}x.",
        "",
        "| batches | timed steps | non-pad tokens | computed tokens (pad included) | seconds in train_step | computed tokens/s | non-pad tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in (("padded", "padded (data.packing=false)"), ("packed", "packed (data.packing=true)")):
        t = totals[name]
        lines.append(f"| {label} | {t['steps']} | {t['tokens']:,} | {t['computed']:,} | {t['seconds']:.1f} | {t['computed'] / t['seconds']:,.0f} | {rate[name]:,.0f} |")
    lines += ["", f"**Packing speed-up at {batch_size} rows per step: {rate['packed'] / rate['padded']:.2f}x** non-pad tokens/s.", ""]
    return lines


def write_report(args: argparse.Namespace, stats: dict, fills: dict[int, dict], results: dict[int, dict[str, dict]]) -> str:
    """bench/results/packing.md: the setup, the data, one section per batch size."""
    packed = next(iter(results.values()))["packed"]
    ratios = ", ".join(f"{t['packed']['tokens'] / t['packed']['seconds'] / (t['padded']['tokens'] / t['padded']['seconds']):.2f}x at {b} rows" for b, t in results.items())
    lines = [
        "# Sequence packing: non-pad tokens/s",
        "",
        f"Measured by `python bench/packing.py --model {args.model} --steps {args.steps} --batch-sizes {','.join(map(str, results))} --max-length {args.max_length}`:"
        " train_step of finetune/train.py (TorchDDP, one process, full fine-tuning, fp32, AdamW), padded and packed steps alternating on one model.",
        f"Device: {device_line()}.",
        "",
        f"Data: {stats['records']} synthetic Alpaca-like training records (log-normal instruction/input/output word counts, 40% with input),"
        f" tokenized lengths mean {stats['mean']:.0f}, median {stats['median']:.0f}, p90 {stats['p90']}, max {stats['max']} tokens;"
        f" {stats['over_max_length']} longer than data.max_length={args.max_length} are truncated. They pack into {packed['rows']} rows"
        f" of at most {args.max_length} tokens ({packed['samples'] / packed['rows']:.1f} samples per row).",
        "",
        f"**Packing speed-up (non-pad tokens/s): {ratios}** (target >= 2x). The gain is the padding that packing removes, so it grows with the batch size.",
        "",
    ]
    for batch_size, totals in results.items():
        lines += report_section(batch_size, fills[batch_size], totals)
    return "\n".join(lines)


# --smoke: every step of the measurement once, on a data set a few batches long.
SMOKE = {"model": "tiny-llama", "steps": 1, "batch_sizes": "4", "max_length": 64, "records": 64}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", help="a Llama-family model: GPT-2's packed attention also changes its padded path")
    parser.add_argument("--steps", type=int, default=16, help="timed steps of each kind, per batch size")
    parser.add_argument("--batch-sizes", default="8,16", help="rows per step, comma-separated")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--smoke", action="store_true", help="the same path, as small as it runs (%s)" % ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    parser.add_argument("--results", type=Path, help="where packing.md goes (default bench/results; with --smoke a new temporary directory)")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    output = (args.results or (Path(tempfile.mkdtemp(prefix="bench-smoke-")) if args.smoke else RESULTS)) / "packing.md"
    results: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
        data = Path(tmp) / "alpaca_like.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in alpaca_like_records(args.records, seed=0)))
        samples, lengths = training_samples(data, args.max_length)
        fills = {}
        for batch_size in map(int, args.batch_sizes.split(",")):
            fills[batch_size] = padding_fill(samples, args.max_length, batch_size)
            results[batch_size] = measure(args, data, batch_size)
            print(report_section(batch_size, fills[batch_size], results[batch_size])[-2], flush=True)
    report = write_report(args, length_stats(lengths, args.max_length), fills, results)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    print(report)
    print(f"written to {output}")


if __name__ == "__main__":
    main()
