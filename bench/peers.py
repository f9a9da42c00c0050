"""Our LoRA step against what a user would run instead, on the same job, runs alternated (issue 24).

    python bench/peers.py              # SmolLM2-135M (the quickstart's weights), ~15 min on 2 CPU cores
    python bench/peers.py --smoke      # tiny-llama, a few steps, one round (CI: tests/e2e/test_bench_smoke.py)

1 process: finetune/train.py (TorchDDP, one rank) against Hugging Face Trainer + peft and against the plain
PyTorch + peft loop of bench/plain_loop.py. 2 ranks (torchrun, gloo): train.py under TorchDDP against
plain_loop.py wrapped in torch.nn.parallel.DistributedDataParallel. The job: LoRA r=8 alpha=16 on
q/k/v/o, fp32, AdamW lr 1e-3, clipping at 1.0, fixed-length rows (every row fills data.max_length), one
OpenMP thread per process. Every tool loads the same model directory, LoRA config and tokenized rows (our
build_model, build_lora_config and build_data) and times a step from the collated batch to the update
(train.py's step_s; Trainer: on_step_begin to on_step_end). Each round runs every tool once, in a rotated
order; the first WARMUP_STEPS steps of each run are dropped. Reports min / median / max of each tool's steps
and the ratios of ours to each peer, into bench/results/peers.md and peers.json (a report, not a test:
other work on a shared machine only adds time, to whichever tool it hits).

    python bench/peers.py --trainer OUT.json key=value ...   # one Trainer run (what the comparison launches)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run import WARMUP_STEPS, Case, child_env, common_args, comparison_parser, free_port, start_results, timed, train, write_results  # noqa: E402  (after the path is set)

RESULTS = REPO / "bench" / "results"
ONE_PROCESS = ("ours", "trainer", "plain")
TWO_RANKS = ("ours", "plain_ddp")


def job_args(model: str, steps: int, batch_size: int, max_length: int, results: Path) -> list[str]:
    """The job every tool runs, as train.py config keys (the peers read the same keys): bench/run.py's short
    run on fixed-length data, as LoRA r=8 on q/k/v/o in fp32 with AdamW, without generations."""
    return [
        *common_args(model, steps, batch_size, max_length, results),
        "method=lora",
        "plugin.name=torch_ddp",
        "lora.r=8",
        "lora.alpha=16",
        "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
        "train.precision=fp32",
        "train.optimizer=adamw",
        "train.lr=1e-3",
        "train.max_grad_norm=1.0",
        "eval.num_generation_prompts=0",
    ]


def run_tool(tool: str, args: list[str], ranks: int, out: Path) -> list[float]:
    """One run of one tool; its step times after warm-up."""
    if tool == "ours":
        return [m["step_s"] for m in timed(train(Case(tool, args, nproc=ranks, threads=1), out)["metrics"])]
    script = [str(REPO / "bench" / "peers.py"), "--trainer"] if tool == "trainer" else [str(REPO / "bench" / "plain_loop.py")]
    launcher = ["torchrun", f"--nproc_per_node={ranks}", f"--master_port={free_port()}"] if ranks > 1 else [sys.executable]
    out.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([*launcher, *script, str(out.with_suffix(".json")), *args], cwd=REPO, env=child_env(1), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{tool}: failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return json.loads(out.with_suffix(".json").read_text())["step_s"][WARMUP_STEPS:]


def compare(tools: tuple[str, ...], args: list[str], ranks: int, rounds: int, results: Path) -> dict:
    """Each round runs every tool once (the order rotated by one each round); step statistics and ratios."""
    steps: dict[str, list[float]] = {tool: [] for tool in tools}
    medians: dict[str, list[float]] = {tool: [] for tool in tools}
    for i in range(rounds):
        for tool in tools[i % len(tools):] + tools[: i % len(tools)]:
            times = run_tool(tool, args, ranks, results / "runs" / f"peers_{ranks}r_{tool}_{i}")
            steps[tool] += times
            medians[tool].append(statistics.median(times))
            print(f"{ranks} rank(s), round {i + 1}, {tool}: median step {medians[tool][-1]:.3f} s", flush=True)
    stats = {tool: {"min_s": min(t), "median_s": statistics.median(t), "max_s": max(t), "timed_steps": len(t), "run_medians_s": medians[tool]} for tool, t in steps.items()}
    ratios = {peer: {"median": stats["ours"]["median_s"] / stats[peer]["median_s"], "min": stats["ours"]["min_s"] / stats[peer]["min_s"]} for peer in tools if peer != "ours"}
    return {"ranks": ranks, "tools": stats, "ratios": ratios}


LABELS = {"ours": "finetune/train.py (TorchDDP)", "trainer": "HF Trainer + peft", "plain": "plain PyTorch + peft loop", "plain_ddp": "plain torch DDP + peft loop"}


def markdown(results: dict) -> str:
    """The comparison as markdown tables."""
    lines = [
        f"# Our LoRA step against its peers: {results['machine']}",
        "",
        f"{results['model']}, LoRA r=8 alpha=16 on q/k/v/o, fp32, AdamW, batch {results['batch']} per rank, one OpenMP thread per process, "
        f"{results['rounds']} alternating round(s) of {results['steps']} steps (the first {WARMUP_STEPS} of each run dropped). "
        f"Measured {results['date']} in {results['wall_s'] / 60:.1f} min; 1-minute load average {results['load_before']:.1f} before, {results['load_after']:.1f} after.",
        "",
    ]
    for part in results["parts"]:
        lines += [f"## {part['ranks']} rank(s)", "", "| tool | step min / median / max (s) | medians of the runs (s) | ours / it, median (min) |", "|---|---|---|---|"]
        for tool, s in part["tools"].items():
            ratio = part["ratios"].get(tool)
            cells = [LABELS[tool], f"{s['min_s']:.3f} / {s['median_s']:.3f} / {s['max_s']:.3f}", ", ".join(f"{m:.3f}" for m in s["run_medians_s"]), f"{ratio['median']:.3f} ({ratio['min']:.3f})" if ratio else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def trainer_run(out: str, argv: list[str]) -> None:
    """One Hugging Face Trainer + peft run of the job; writes {"step_s": [...]} to OUT.json."""
    import functools

    import torch
    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from finetune.config import load_config
    from finetune.data import build_data, collate, load_splits
    from finetune.model import build_lora_config, build_model

    cfg = load_config(argv)
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = build_model(cfg.model, cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = get_peft_model(model, build_lora_config(model, cfg.lora))
    data = build_data(cfg.data, tokenizer, load_splits(cfg.data, cfg.train.seed))
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.started)

    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch, max_steps=cfg.train.max_steps, per_device_train_batch_size=cfg.train.batch_size, learning_rate=cfg.train.lr,
            weight_decay=cfg.train.weight_decay, lr_scheduler_type=cfg.train.lr_scheduler, warmup_steps=cfg.train.warmup_steps, max_grad_norm=cfg.train.max_grad_norm,
            seed=cfg.train.seed, save_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True, remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data.train, data_collator=functools.partial(collate, pad_token_id=tokenizer.pad_token_id), callbacks=[StepTimer()])
        trainer.train()
    Path(out).write_text(json.dumps({"step_s": times}))


# --smoke: the whole comparison once, as small as it runs (one process only: no torchrun in CI's smoke).
SMOKE = {"model": "tiny-llama", "steps": WARMUP_STEPS + 2, "batch_size": 1, "max_length": 64, "rounds": 1, "ranks": [1]}


def main() -> None:
    if sys.argv[1:2] == ["--trainer"]:
        trainer_run(sys.argv[2], sys.argv[3:])
        return
    parser = comparison_parser(__doc__.splitlines()[0], SMOKE, model_help="model for every tool (default: the quickstart's SmolLM2-135M)", steps=16,
                               batch_size=4, batch_help="rows per step and rank", max_length=128, max_length_help="tokens per row (every row fills it)", rounds=2)
    parser.add_argument("--ranks", type=lambda s: [int(n) for n in s.split(",")], default=[1, 2], help="comma-separated: 1 (ours, Trainer, plain loop), 2 (ours, plain DDP loop)")
    opts = parser.parse_args()
    results_dir, started, results = start_results(opts, SMOKE, RESULTS)
    args = job_args(opts.model, opts.steps, opts.batch_size, opts.max_length, results_dir)
    results["parts"] = [compare(ONE_PROCESS if ranks == 1 else TWO_RANKS, args, ranks, opts.rounds, results_dir) for ranks in opts.ranks]
    write_results(results, started, results_dir, "peers", markdown)


if __name__ == "__main__":
    main()
