"""Peak memory and step time with the causal-LM loss in chunks (train.loss_chunks) against the loss over the full
logits, measured in one run (issue 27).

    python bench/loss_chunks.py            # SmolLM2-135M (the quickstart's weights) LoRA, batch 8 x 512, one process
    python bench/loss_chunks.py --smoke    # tiny-llama, a few steps, one round (CI: tests/e2e/test_bench_smoke.py)

The job is bench/peers.py's (LoRA r=8 on q/k/v/o, fp32, AdamW, fixed-length rows) on one process, run once with
train.loss_chunks=off and once with the default (auto) per round, the order swapped each round. Each run's peak is
its own train_step_peak (summary.json) and its step time the median step_s after warm-up; the report gives both
settings, the estimator's prediction for each, and the ratios chunked / full logits (acceptance: peak <= 0.7,
step <= 1.1), with the load average before and after (other work on a shared machine only adds time).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.peers import job_args  # noqa: E402  (after the path is set)
from bench.run import MEASURE_MEMORY, MIB, WARMUP_STEPS, Case, comparison_parser, start_results, timed, train, write_results  # noqa: E402
from tests.conftest import write_fixed_length_file  # noqa: E402

RESULTS = REPO / "bench" / "results"
SETTINGS = {"full logits": "off", "chunked": "auto"}


def measure(args: list[str], rounds: int, results: Path) -> dict[str, dict]:
    """Each setting's peaks, step times and prediction over `rounds` alternating rounds."""
    runs: dict[str, dict] = {name: {"peaks": [], "steps": [], "predicted": None} for name in SETTINGS}
    for i in range(rounds):
        for name in list(SETTINGS)[i % 2 :] + list(SETTINGS)[: i % 2]:
            run = train(Case(name, [*args, f"train.loss_chunks={SETTINGS[name]}"], nproc=1), results / "runs" / f"loss_chunks_{SETTINGS[name]}_{i}")
            memory = run["summary"]["memory"]
            runs[name]["peaks"].append(next(s["peak_bytes"] for s in memory["stages"] if s["name"] == "train_step_peak"))
            runs[name]["steps"] += [m["step_s"] for m in timed(run["metrics"])]
            runs[name]["predicted"] = memory["estimate"].get("predicted_train_step_peak_bytes")
            print(f"round {i + 1}, {name}: peak {runs[name]['peaks'][-1] / MIB:,.0f} MiB, median step {statistics.median(runs[name]['steps']):.2f} s", flush=True)
    return {name: {"peak_bytes": max(r["peaks"]), "median_step_s": statistics.median(r["steps"]), "timed_steps": len(r["steps"]), "step_s": r["steps"], "predicted_bytes": r["predicted"]} for name, r in runs.items()}


def markdown(results: dict) -> str:
    """The measurement as a markdown table with the two ratios."""
    rows = results["settings"]
    full, chunked = rows["full logits"], rows["chunked"]
    lines = [
        f"# Loss in chunks against the full logits: {results['machine']}",
        "",
        f"{results['model']} LoRA r=8 on q/k/v/o, fp32, AdamW, batch {results['batch']}{', gradient checkpointing' if results.get('gradient_checkpointing') else ''}, one process, {results['rounds']} alternating round(s) of "
        f"{results['steps']} steps (the first {WARMUP_STEPS} of each run dropped). Measured {results['date']} in {results['wall_s'] / 60:.1f} min; "
        f"1-minute load average {results['load_before']:.1f} before, {results['load_after']:.1f} after.",
        "",
        "| train.loss_chunks | measured train-step peak (MiB) | predicted (MiB) | median step (s) | timed steps (s) |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        predicted = f"{row['predicted_bytes'] / MIB:,.0f}" if row["predicted_bytes"] else "-"
        steps = ", ".join(f"{s:.1f}" for s in row["step_s"])
        lines.append(f"| {SETTINGS[name]} ({name}) | {row['peak_bytes'] / MIB:,.0f} | {predicted} | {row['median_step_s']:.3f} | {steps} |")
    lines += ["", f"Chunked / full logits: peak {chunked['peak_bytes'] / full['peak_bytes']:.3f}x, step {chunked['median_step_s'] / full['median_step_s']:.3f}x.", ""]
    return "\n".join(lines)


# --smoke: both settings once, as small as they run.
SMOKE = {"model": "tiny-llama", "steps": WARMUP_STEPS + 2, "batch_size": 2, "max_length": 64, "rounds": 1}


def main() -> None:
    parser = comparison_parser(__doc__.splitlines()[0], SMOKE, model_help="model (default: the quickstart's SmolLM2-135M, 49,152-token vocabulary)", steps=2 * WARMUP_STEPS,
                               batch_size=8, batch_help="rows per step", max_length=512, max_length_help="tokens per row (every row fills it)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="both settings with train.gradient_checkpointing=true (the loss term then dominates the peak)")
    opts = parser.parse_args()
    results_dir, started, results = start_results(opts, SMOKE, RESULTS)
    # Rows of exactly --max-length tokens: replies of 2 words per token are cut there (peers' 300 words fill fewer than 512).
    long_rows = write_fixed_length_file(results_dir / "fixed_length_long.jsonl", words_per_output=2 * opts.max_length)
    args = [*job_args(opts.model, opts.steps, opts.batch_size, opts.max_length, results_dir), f"data.train_path={long_rows}", MEASURE_MEMORY]
    if opts.gradient_checkpointing:
        args.append("train.gradient_checkpointing=true")
    results["gradient_checkpointing"] = opts.gradient_checkpointing
    results["settings"] = measure(args, opts.rounds, results_dir)
    write_results(results, started, results_dir, "loss_chunks", markdown)


if __name__ == "__main__":
    main()
