"""The RoBERTa study: one model and data set, six setups, one table (`python bench/roberta_study.py`, or `make roberta-study`).

tiny-roberta (random init, learns from scratch) classifies the offline chatterbot-corpus conversations
by topic (data.train_path=chatterbot-corpus:topics, 21 labels, 10% held out) as full fine-tuning and
as LoRA on one process, with data parallelism (TorchDDP, 2 ranks) and with pipeline parallelism
(HybridParallel pp_size=2, 1F1B). Every setup sees the same global batch (16), learning rate and
number of steps; each run is a real finetune/train.py run, and finetune.report reads their
summary.json files. Writes bench/results/roberta_study.md and roberta_study.png; the runs themselves
go to outputs/roberta_study/ (not committed). `--smoke`: two steps of the one-process LoRA run, into a
temporary directory unless --results names one (CI runs it: tests/e2e/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune import report  # noqa: E402  (after the path is set)
from tests.conftest import launch_command, run_env  # noqa: E402  (the launchers the tests use)

RESULTS = REPO / "bench" / "results"
GLOBAL_BATCH = 16
COMMON = [
    "task=classification",
    "data.train_path=chatterbot-corpus:topics",
    "model.name=tiny-roberta",
    "train.max_steps=0",
    "train.epochs=8",  # 50 steps of 16 per epoch: 400 steps
    "train.warmup_steps=20",
    "lora.r=16",
    "lora.dropout=0",
    "eval.every_steps=100",
    "eval.num_generation_prompts=0",
    "overwrite_output_dir=true",
]
# A random-init encoder has nothing for LoRA's low-rank updates to steer: it needs a larger step.
LR = {"full": "2e-3", "lora": "1e-2"}
# name: (launcher, ranks, config file, per-rank batch and plugin settings)
SETUPS = {
    "single": ("python", 1, "torch_ddp", [f"train.batch_size={GLOBAL_BATCH}"]),
    "ddp2": ("torchrun", 2, "torch_ddp", [f"train.batch_size={GLOBAL_BATCH // 2}"]),
    "pp2": ("torchrun", 2, "pp2", [f"train.batch_size={GLOBAL_BATCH}", "plugin.num_microbatches=2"]),
}


METHODS = ("full", "lora")
# --smoke: one run of two steps (the study's path, not its result): one process, LoRA (its head trains in full too).
SMOKE_RUNS = [("single", "lora")]
SMOKE_STEPS = ["train.max_steps=2", "train.warmup_steps=1"]


def run_setting(setup: str, method: str, runs_dir: Path, overrides: list[str]) -> Path:
    """One finetune/train.py run of a setup and method (overrides last); returns its output dir (fails loudly)."""
    launcher, ranks, config, extra = SETUPS[setup]
    out = runs_dir / f"{setup}-{method}"
    args = ["--config", str(REPO / "booster_configs" / f"{config}.yaml"), *COMMON, *extra, f"method={method}", f"train.lr={LR[method]}", f"output_dir={out}", *overrides]
    started = time.perf_counter()
    result = subprocess.run(launch_command(launcher, ranks) + args, cwd=REPO, env=run_env(), capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: {setup}-{method} failed (exit {result.returncode}):\n{(result.stdout + result.stderr)[-3000:]}")
    print(f"{setup}-{method}: {time.perf_counter() - started:.0f} s", flush=True)
    return out


def chance_levels(run_dir: Path) -> tuple[int, float, str, float]:
    """(labels, uniform chance, majority class, its share) of the held-out split the runs evaluated on."""
    from finetune.config import load_config
    from finetune.data import load_splits

    cfg = load_config(["--config", str(run_dir / "config.yaml")], world_size=1)
    splits = load_splits(cfg.data, cfg.train.seed, cfg.task)
    label, count = Counter(str(r["label"]) for r in splits.eval).most_common(1)[0]
    return len(splits.labels), 1 / len(splits.labels), label, count / len(splits.eval)


def write_study(run_dirs: list[Path], wall_s: float, results: Path) -> Path:
    """bench/results/roberta_study.md (setup notes, chance levels, the report table) and its PNG."""
    rows = [report.row_of(d, report.read_summary(d)) for d in run_dirs]
    labels, uniform, majority, share = chance_levels(run_dirs[0])
    results.mkdir(parents=True, exist_ok=True)
    report.plot(rows, results / "roberta_study.png")
    text = (
        "# RoBERTa study: single / DDP / PP x full / LoRA (measured by bench/roberta_study.py)\n\n"
        f"tiny-roberta (random init) on chatterbot-corpus topics: {labels} labels; chance on the held-out split is "
        f"{uniform:.1%} (uniform) and {share:.1%} (always '{majority}', the majority class). Global batch {GLOBAL_BATCH}, "
        f"8 epochs, lr {LR['full']} (full) / {LR['lora']} (LoRA r=16, head trained in full), fp32, 2 shared CPU cores. "
        "Peak memory is each rank's process RSS high-water mark; best eval is over evals every 100 steps and at the end.\n\n"
        + report.markdown_table(rows)
        + f"\nStudy wall time: {wall_s:.0f} s. Figure: roberta_study.png.\n"
    )
    path = results / "roberta_study.md"
    path.write_text(text)
    return path


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", type=Path, help="where the runs write their outputs (default outputs/roberta_study; with --smoke RESULTS/runs)")
    parser.add_argument("--smoke", action="store_true", help=f"only {SMOKE_RUNS}, {SMOKE_STEPS[0]}")
    parser.add_argument("--results", type=Path, help="where the study goes (default bench/results; with --smoke a new temporary directory)")
    args = parser.parse_args(argv)
    results = args.results or (Path(tempfile.mkdtemp(prefix="bench-smoke-")) if args.smoke else RESULTS)
    runs_dir = args.runs_dir or (results / "runs" if args.smoke else REPO / "outputs" / "roberta_study")
    runs = SMOKE_RUNS if args.smoke else [(setup, method) for setup in SETUPS for method in METHODS]
    started = time.perf_counter()
    run_dirs = [run_setting(setup, method, runs_dir, SMOKE_STEPS if args.smoke else []) for setup, method in runs]
    path = write_study(run_dirs, time.perf_counter() - started, results)
    print(path.read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
