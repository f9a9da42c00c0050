"""DPO against supervised fine-tuning on the same pairs, and the reference model's memory (issue 25).

    python bench/preference.py            # SmolLM2-135M-Instruct (the quickstart's weights) LoRA, one process
    python bench/preference.py --smoke    # tiny-llama, a few steps, one round (CI: tests/e2e/test_bench_smoke.py)

Both runs read the built-in chatterbot-corpus pairs as chat records, so a chosen reply is the same tokens in both:
SFT trains on {user prompt, assistant chosen} (task=chat), DPO on {user prompt, chosen, rejected}
(task=preference, preference.loss=dpo). A DPO step scores each pair's chosen and rejected rows with gradients and
once more without (the reference: the same model with its adapters off): four forwards and two backwards of a row
where SFT runs one of each, about 2.7x the work if a backward costs two forwards. Runs alternate, the order swapped
each round; each run's step time is its median step_s after warm-up and its peak is train_step_peak (summary.json,
under train.cpu_allocator=exact: RSS follows the live tensors), beside the estimator's prediction. The reference
costs no weights here; a second copy of the model as the reference (what TRL does without peft) would add the
frozen weights once more: the estimator's weight term of the same run.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.peers import job_args  # noqa: E402  (after the path is set)
from bench.run import MEASURE_MEMORY, MIB, WARMUP_STEPS, Case, comparison_parser, start_results, timed, train, write_results  # noqa: E402
from finetune.corpus import preference_records  # noqa: E402

RESULTS = REPO / "bench" / "results"
TASKS = {"SFT (chosen only)": "chat", "DPO": "preference"}


def write_pairs(results: Path) -> dict[str, Path]:
    """The corpus's pairs as chat records: a DPO file and an SFT file of the same prompts and chosen replies."""
    pairs = preference_records()
    files = {"chat": results / "pairs_sft.jsonl", "preference": results / "pairs_dpo.jsonl"}
    rows = {
        "chat": [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}]} for p in pairs],
        "preference": [{"messages": [{"role": "user", "content": p["prompt"]}], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs],
    }
    for task, path in files.items():
        path.write_text("".join(json.dumps(row) + "\n" for row in rows[task]))
    return files


def measure(args: list[str], files: dict[str, Path], rounds: int, results: Path) -> dict[str, dict]:
    """Each task's step times, peak and prediction over `rounds` alternating rounds."""
    runs: dict[str, dict] = {name: {"steps": [], "peaks": []} for name in TASKS}
    for i in range(rounds):
        for name in list(TASKS)[i % 2 :] + list(TASKS)[: i % 2]:
            task = TASKS[name]
            run = train(Case(name, [*args, f"task={task}", f"data.train_path={files[task]}"], nproc=1, threads=1), results / "runs" / f"preference_{task}_{i}")
            memory = run["summary"]["memory"]
            runs[name]["steps"] += [m["step_s"] for m in timed(run["metrics"])]
            runs[name]["peaks"].append(next(s["peak_bytes"] for s in memory["stages"] if s["name"] == "train_step_peak"))
            runs[name]["estimate"] = memory["estimate"]
            print(f"round {i + 1}, {name}: median step {statistics.median(runs[name]['steps']):.2f} s, peak {runs[name]['peaks'][-1] / MIB:,.0f} MiB", flush=True)
    rows = {}
    for name, run in runs.items():
        per_rank = run["estimate"]["per_rank"]
        rows[name] = {
            "median_step_s": statistics.median(run["steps"]),
            "min_step_s": min(run["steps"]),
            "timed_steps": len(run["steps"]),
            "peak_bytes": max(run["peaks"]),
            "predicted_bytes": run["estimate"]["predicted_train_step_peak_bytes"],
            "weights_bytes": per_rank["weights"],
        }
    return rows


def markdown(results: dict) -> str:
    """The measurement as a markdown table, the DPO / SFT step ratio and the reference copy's cost."""
    rows = results["tasks"]
    sft, dpo = rows["SFT (chosen only)"], rows["DPO"]
    copy = dpo["predicted_bytes"] + dpo["weights_bytes"]
    lines = [
        f"# DPO against SFT on the same pairs: {results['machine']}",
        "",
        f"{results['model']} LoRA r=8 on q/k/v/o, fp32, AdamW, {results['batch']} (pairs for DPO, chosen rows for SFT), one process, one thread, "
        f"{results['rounds']} alternating round(s) of {results['steps']} steps (the first {WARMUP_STEPS} of each run dropped). "
        f"Measured {results['date']} in {results['wall_s'] / 60:.1f} min; 1-minute load average {results['load_before']:.1f} before, {results['load_after']:.1f} after.",
        "",
        "| task | step min / median (s) | measured train-step peak (MiB) | predicted (MiB) |",
        "|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['min_step_s']:.3f} / {row['median_step_s']:.3f} | {row['peak_bytes'] / MIB:,.0f} | {row['predicted_bytes'] / MIB:,.0f} |")
    lines += [
        "",
        f"DPO / SFT: median step {dpo['median_step_s'] / sft['median_step_s']:.2f}x (fastest {dpo['min_step_s'] / sft['min_step_s']:.2f}x).",
        f"Reference: the adapters switched off, no weights of its own. A second model copy as the reference would add the frozen weights, "
        f"{dpo['weights_bytes'] / MIB:,.0f} MiB (the estimator's weight term): predicted {copy / MIB:,.0f} MiB instead of {dpo['predicted_bytes'] / MIB:,.0f} "
        f"({copy / dpo['predicted_bytes']:.2f}x).",
        "",
    ]
    return "\n".join(lines)


# --smoke: both tasks once, as small as they run.
SMOKE = {"model": "tiny-llama", "steps": WARMUP_STEPS + 2, "batch_size": 2, "max_length": 64, "rounds": 1}


def main() -> None:
    parser = comparison_parser(__doc__.splitlines()[0], SMOKE, model_help="model (default: the quickstart's SmolLM2-135M-Instruct)", steps=4 * WARMUP_STEPS,
                               batch_size=4, batch_help="pairs (DPO) or rows (SFT) per step", max_length=128, max_length_help="data.max_length")
    opts = parser.parse_args()
    results_dir, started, results = start_results(opts, SMOKE, RESULTS)
    args = [*job_args(opts.model, opts.steps, opts.batch_size, opts.max_length, results_dir), MEASURE_MEMORY]  # peaks of the live tensors, both tasks alike
    results["tasks"] = measure(args, write_pairs(results_dir), opts.rounds, results_dir)
    write_results(results, started, results_dir, "preference", markdown)


if __name__ == "__main__":
    main()
