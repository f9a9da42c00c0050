"""Generate answers for a file of prompts with a trained model, batched and resumable.

    python -m finetune.generate outputs/run1 --input prompts.jsonl --output answers.jsonl
    python -m finetune.generate outputs/run1/checkpoints/step_00000040 --input p.jsonl --output a.jsonl --temperature 0.7 --seed 1

RUN is anything finetune.inference loads (a run dir, its final/, a checkpoint, an exported or named model).
Each input row is {messages: [{role, content}, ...]} (a conversation), {prompt} (text: a user message in
the chat template where the tokenizer has one, else continued as it is), or a record of the run's task
(instruction: {instruction, input?}); the output row is the input row with `response` added, in input order.
Greedy at --temperature 0 (the default), else sampled with --top-p.

Resumable: rows already in the output are kept and skipped. Rows are written a batch at a time, and batch k
always holds input rows k*B .. k*B+B-1 with the torch seed --seed + k*B, so a run killed half-way and run again
with the same settings writes the same file as one uninterrupted run (a torn last line, or a batch cut
short, is generated again).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from finetune.errors import FinetuneError, run_command
from finetune.faults import Faults
from finetune.export_source import add_opt_in_arguments, opt_in_flags
from finetune.inference import check_generates, load, open_source, prompt_ids, prompt_record
from finetune.tasks import TASKS, DataError

RESPONSE = "response"  # the output row's field holding the generated text


def parse_cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m finetune.generate", description=__doc__.split("\n")[0])
    parser.add_argument("source", metavar="RUN", help="a run dir, its final/, a checkpoint dir, or a model name")
    parser.add_argument("--input", type=Path, required=True, help="JSON Lines (or JSON, CSV, Parquet) file of prompts")
    parser.add_argument("--output", type=Path, required=True, help="JSON Lines file of answers (rows already there are skipped)")
    parser.add_argument("--batch-size", type=positive, default=8, help="prompts generated together (default 8)")
    parser.add_argument("--max-new-tokens", type=positive, default=128, help="tokens generated per prompt at most (default 128)")
    parser.add_argument("--temperature", type=non_negative, default=0.0, help="0: greedy (default); above 0: sampled")
    parser.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass, in (0, 1] (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed (default 0)")
    parser.add_argument("--task", choices=sorted(TASKS), help="the record layout of a plain model's input rows (a run has its own task)")
    add_opt_in_arguments(parser)
    return parser.parse_args(argv)


def positive(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number >= 1")
    return value


def non_negative(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0")
    return value


def probability(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def done_rows(output: Path, rows: list[dict], batch_size: int) -> list[str]:
    """The output's lines to keep: complete answers to the input's first rows, cut back to whole batches
    (a resumed batch then holds the rows, and so draws the samples, it would have held uninterrupted)."""
    if not output.exists():
        return []
    if not output.is_file():
        raise FinetuneError(f"--output: {output} is not a file")
    lines = output.read_text(encoding="utf-8").split("\n")
    kept = []
    for number, line in enumerate(lines[:-1], start=1):  # the last piece has no newline: torn, or empty
        try:
            answer = json.loads(line)
        except json.JSONDecodeError:
            raise FinetuneError(f"--output: {output} line {number} is not JSON; it is not an output of this command (move it away to start afresh)") from None
        asked = rows[number - 1] if number <= len(rows) else None
        if not isinstance(answer, dict) or asked is None or {k: v for k, v in answer.items() if k != RESPONSE} != {k: v for k, v in asked.items() if k != RESPONSE}:
            raise FinetuneError(f"--output: {output} line {number} is not the answer to --input row {number}; it holds answers to other prompts (move it away to start afresh)")
        kept.append(line)
    if len(kept) == len(rows):
        return kept
    return kept[: len(kept) - len(kept) % batch_size]


def generate_file(args: argparse.Namespace) -> int:
    """Answer every input row not yet in the output; returns how many were generated now."""
    import torch
    from tqdm import tqdm

    from finetune.data import read_rows
    from finetune.evaluation import generate_batch

    source = open_source(args.source, opt_in_flags(args), "generate", args.task)
    check_generates(source)
    if args.output.resolve() == args.input.resolve():
        raise FinetuneError(f"--output: {args.output} is the input file")
    rows = read_rows(str(args.input))
    if not rows:
        raise DataError(f"{args.input}: no rows")
    prompts = [prompt_record(source.task, row, f"{args.input} row {i}") for i, row in enumerate(rows, start=1)]  # every row checked before the model is built
    kept = done_rows(args.output, rows, args.batch_size)
    if len(kept) == len(rows):
        print(f"{args.output}: all {len(rows)} rows answered already")
        return 0
    loaded = load(source)
    ids = [prompt_ids(loaded, prompt) for prompt in prompts]
    for number, prompt in enumerate(ids, start=1):
        if len(prompt) + args.max_new_tokens > loaded.context_window:
            raise DataError(f"{args.input} row {number}: its prompt ({len(prompt)} tokens) and --max-new-tokens {args.max_new_tokens} exceed the model's context of {loaded.context_window} tokens")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("".join(line + "\n" for line in kept), encoding="utf-8")  # drops a torn line or a cut batch
    faults = Faults()
    with args.output.open("a", encoding="utf-8") as out, tqdm(total=len(rows), initial=len(kept), desc="generate", unit="row", dynamic_ncols=True) as progress:
        for start in range(len(kept), len(rows), args.batch_size):
            torch.manual_seed(args.seed + start)
            texts = generate_batch(loaded.model, loaded.tokenizer, ids[start : start + args.batch_size], args.max_new_tokens, loaded.device, args.temperature, args.top_p)
            text = "".join(json.dumps({**row, RESPONSE: answer}, ensure_ascii=False) + "\n" for row, answer in zip(rows[start:], texts))
            if faults.at("kill_in_generate", start // args.batch_size):  # a kill half-way through writing this batch
                out.write(text[: len(text) // 2])
                out.flush()
                faults.maybe_kill("kill_in_generate", start // args.batch_size)
            out.write(text)  # one batch at a time, synced: a kill leaves whole batches and at most one torn line
            out.flush()
            os.fsync(out.fileno())
            progress.update(len(texts))
    return len(rows) - len(kept)


def generate_command(args: argparse.Namespace) -> int:
    """Answer the file's prompts; say how many answers were written."""
    count = generate_file(args)
    print(f"wrote {count} answer(s) to {args.output}")
    return 0


def main(argv: list[str]) -> int:
    return run_command(argv, parse_cli, generate_command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
