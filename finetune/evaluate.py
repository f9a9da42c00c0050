"""Evaluate models side by side on a data file: held-out loss and perplexity, or loss, accuracy and macro-F1.

    python -m finetune.evaluate tiny-llama outputs/run1 outputs/run2/final --data heldout.jsonl --task instruction
    python -m finetune.evaluate outputs/cls/checkpoints/step_00000040 --data test.csv --json eval.json --markdown eval.md

Each MODEL is anything finetune.inference loads (a run dir, its final/, a checkpoint, an exported or named
model). The file's rows are the task's records, checked and tokenized as training does (finetune.data), and
scored by training's own eval code (finetune.evaluation): the numbers are those a run reports for its eval split.
--json writes {data, task, max_length, models: [{model, metrics...}]}, which finetune.report --evaluation adds to its report.
Every model reads the file at the same data.max_length (--max-length; default the first run's, else 128).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from finetune.config import DataConfig
from finetune.errors import FinetuneError, run_command
from finetune.report import evaluation_table
from finetune.export_source import add_opt_in_arguments, opt_in_flags
from finetune.inference import load, open_source
from finetune.tasks import TASKS

# by the task's eval_output
COLUMNS = {"loss": ("loss", "perplexity", "tokens"), "logits": ("loss", "accuracy", "macro_f1", "samples"), "pairs": ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected", "pairs")}


def parse_cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m finetune.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", metavar="MODEL", help="run dirs, final/ dirs, checkpoints or model names")
    parser.add_argument("--data", type=Path, required=True, help="the records to score (JSON, JSON Lines, CSV, Parquet)")
    parser.add_argument("--task", choices=sorted(TASKS), help="the records' task (default: the runs' task, else instruction)")
    parser.add_argument("--max-length", type=int, help="tokens per sample (default: the first run's data.max_length, else 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (default 8; the numbers do not depend on it)")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--markdown", type=Path, help="write the table here as markdown")
    add_opt_in_arguments(parser)
    args = parser.parse_args(argv)
    if args.max_length is not None and args.max_length < 2:
        parser.error("--max-length must be at least 2")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def evaluate_models(args: argparse.Namespace) -> dict:
    """What was scored (data, task, max_length) and every model's metrics on it, in the order given (`models`);
    every source checked before the first model is built."""
    import torch

    from finetune.data import load_records, tokenize_records
    from finetune.evaluation import evaluate_task, module_eval_forward

    flags = opt_in_flags(args)
    sources = [open_source(name, flags, "evaluate", args.task) for name in args.models]
    trained_for = sorted({s.task.name for s in sources if s.cfg is not None})
    if len(trained_for) > 1:
        raise FinetuneError(f"the runs were trained for different tasks ({', '.join(trained_for)}); evaluate one task's models together")
    task_name = args.task or (trained_for or ["instruction"])[0]
    sources = [s if s.cfg is not None else open_source(s.name, flags, "evaluate", task_name) for s in sources]  # plain models read the runs' task
    first_run = next((s.cfg for s in sources if s.cfg is not None), None)
    cfg_data = DataConfig(max_length=args.max_length or (first_run.data.max_length if first_run else DataConfig().max_length), truncation=first_run.data.truncation if first_run else "truncate")
    checked = {id(s): load_records(str(args.data), s.task) for s in sources}  # a bad row, or a label outside a classifier's set, before any model is built
    results = []
    for source in sources:
        loaded = load(source)
        samples, _, _ = tokenize_records(source.task, loaded.tokenizer, checked[id(source)], cfg_data, str(args.data), "eval")
        forward = module_eval_forward(loaded.model, source.task.eval_output, preference_objective(source, loaded, first_run) if source.task.pairs else None)
        metrics = evaluate_task(source.task, forward, samples, args.batch_size, loaded.tokenizer.pad_token_id, loaded.device, None)
        results.append({"model": source.name, **{key: metrics[key] for key in COLUMNS[source.task.eval_output]}})
        del loaded  # one model at a time in memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"data": str(args.data), "task": task_name, "max_length": cfg_data.max_length, "models": results}


def preference_objective(source, loaded, first_run):
    """What scores the pairs: the task's objective under the run's `preference` settings (else the first run's, else
    the defaults); the reference is the model with its adapters off, or for a plain model the model itself (rewards
    and margin 0: the baseline a fine-tune is compared with)."""
    import contextlib

    from finetune.config import Config
    from finetune.preference import PairObjective, pair_objective

    cfg = source.cfg or first_run or Config()
    objective = source.task.objective(cfg.preference)
    if objective.reference and not source.adapter:
        if source.cfg is not None:
            raise FinetuneError(f"{source.name}: a full fine-tune trained with preference.loss={cfg.preference.loss}, whose reference is the "
                                "starting model: evaluate does not hold it beside the trained one (the run's own eval in summary.json measured it)")
        return PairObjective(objective, cfg.preference, loaded.model, contextlib.nullcontext)
    return pair_objective(cfg, source.task, loaded.model, loaded.model if source.adapter else None)


def evaluate_command(args: argparse.Namespace) -> int:
    """Score the models; the table on stdout, and in --json / --markdown."""
    for path in (args.json, args.markdown):
        if path is not None and path.is_dir():
            raise FinetuneError(f"{path} is a directory; name a file to write")
    evaluation = evaluate_models(args)
    table = evaluation_table(evaluation["models"])
    if args.json:
        args.json.write_text(json.dumps(evaluation, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    print(table, end="")
    return 0


def main(argv: list[str]) -> int:
    return run_command(argv, parse_cli, evaluate_command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
