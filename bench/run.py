"""Benchmarks, measured on the machine that runs them: one command, `python bench/run.py` (or `make bench`).

1. Framework overhead: step time of finetune/train.py (TorchDDP, one rank) against the hand-written
   PyTorch loop in bench/plain_loop.py on the same model, batch and optimizer, after warm-up, runs
   alternated. The ratio of the fastest steps is the headline (other work on a shared machine only ever
   adds time; timeit reports the minimum for the same reason), the ratio of medians is shown beside
   it. Target: ratio <= 1.05.
2. Plugins: each booster_configs/ setup trains the same model on 2 ranks for real (torchrun); non-pad
   tokens/s (after warm-up) and the train_step_peak memory come from the run's own metrics.jsonl and
   summary.json, next to what finetune.estimate predicted for that run. Every sample fills
   data.max_length, so every setup sees the same shapes (and non-pad tokens are all tokens).
3. Methods: full fine-tuning vs LoRA on the same setup, with the base model's bytes per parameter
   counted from the built model's storage (QLoRA joins this table as one more entry of METHODS).
4. The CPU process baseline the estimator assumes, measured again.

Writes bench/results/results.md, results.json and plugins.png. On CUDA the same cases run on every GPU
of the machine and the tables report tokens/s per GPU, peak CUDA memory and MFU.

`--smoke` runs every part once on a tiny model, one rank, one timed step (CI runs it: tests/e2e/test_bench_smoke.py),
into a temporary directory unless --results names one: it checks that the benchmark runs, not what it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune import estimate  # noqa: E402  (after the path is set)
from tests.conftest import write_fixed_length_file  # noqa: E402  (the same fixed-length data as the tests)

RESULTS = REPO / "bench" / "results"
MIB = 2**20
WARMUP_STEPS = 2  # first steps build caches, buckets and optimizer states: not timed
# Runs whose peak is compared with finetune.estimate's prediction: on CPU the default allocator's heap keeps
# freed activations resident (RSS above the live tensors); exact measures what the run holds.
MEASURE_MEMORY = "train.cpu_allocator=exact"
# Peak dense bf16 TFLOP/s per GPU, for MFU (vendor figures; BENCH_PEAK_TFLOPS overrides).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0, "RTX 4090": 165.0}


@dataclass
class Case:
    """One real training run of finetune/train.py."""

    name: str
    args: list[str]
    nproc: int = 2
    threads: int = 0  # OpenMP threads per rank; 0: the cores divided among the ranks


def common_args(model: str, steps: int, batch_size: int, max_length: int, results: Path) -> list[str]:
    """A short run on fixed-length data (same shapes under every setup): no mid-run eval, a small eval set."""
    data = write_fixed_length_file(results / "fixed_length.jsonl")
    return [
        f"model.name={model}",
        f"data.train_path={data}",
        f"data.max_length={max_length}",
        "data.max_eval_samples=8",
        f"train.max_steps={steps}",
        f"train.batch_size={batch_size}",
        "train.warmup_steps=1",
        "eval.every_steps=0",
        f"eval.batch_size={batch_size}",
        "eval.num_generation_prompts=1",
        "eval.max_new_tokens=4",
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(threads: int) -> dict[str, str]:
    """OpenMP threads per process, offline, the venv's launchers on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def train(case: Case, out: Path) -> dict:
    """Run finetune/train.py for one case; return its summary and metrics."""
    launcher = [sys.executable] if case.nproc == 1 else ["torchrun", f"--nproc_per_node={case.nproc}", f"--master_port={free_port()}"]
    command = [*launcher, str(REPO / "finetune" / "train.py"), *case.args, f"output_dir={out}", "overwrite_output_dir=true"]  # a bench run again replaces its runs
    started = time.perf_counter()
    threads = case.threads or max(1, (os.cpu_count() or 1) // case.nproc)  # one per core per rank
    result = subprocess.run(command, cwd=REPO, env=child_env(threads), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{case.name}: train.py failed:\n{(result.stdout + result.stderr)[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"summary": summary, "metrics": [m for m in metrics if "loss" in m], "wall_s": time.perf_counter() - started}


def timed(metrics: list[dict]) -> list[dict]:
    """The steps after warm-up."""
    return [m for m in metrics if m["step"] > WARMUP_STEPS]


def case_row(case: Case, run: dict, on_cuda: bool) -> dict:
    """What one run measured: tokens/s (non-pad tokens per step over the median step time after warm-up,
    robust to other work on a shared machine), train_step_peak, and the estimate for the run."""
    steps = timed(run["metrics"])
    median_step = statistics.median(m["step_s"] for m in steps)
    memory = run["summary"]["memory"]
    peak = next(s["peak_bytes"] for s in memory["stages"] if s["name"] == "train_step_peak")
    prediction = memory["estimate"]
    world = run["summary"]["world_size"]
    row = {
        "case": case.name,
        "ranks": world,
        "tokens_per_s": statistics.median(m["tokens"] for m in steps) / median_step,
        "median_step_s": median_step,
        "peak_bytes_rank0": peak,
        # The node's host memory for building the model: each rank's highest use up to `boosted` above its `start`, summed.
        "build_bytes_sum": sum(memory.get("build_bytes_per_rank") or [0]) or None,
        "predicted_bytes": prediction.get("predicted_train_step_peak_bytes"),
        "trainable_params": run["summary"]["trainable_params"],
        "base_bytes_per_param": base_bytes_per_param(run["summary"]),
        "wall_s": run["wall_s"],
    }
    if on_cuda:
        row["tokens_per_s_per_gpu"] = row["tokens_per_s"] / world
        row["mfu"] = mfu(row["tokens_per_s_per_gpu"], prediction["per_rank"]["setup"]["seq_len"], run["summary"]) if "per_rank" in prediction else None
    return row


def training_flops_per_token(params: int, layers: int, hidden: int, seq_len: int, trainable_fraction: float) -> float:
    """Model FLOPs per trained token (PaLM appendix B): 6N + 12*L*h*s for full training; frozen weights
    skip their weight-gradient matmuls (LoRA: ~4N)."""
    weight_grads = 2 * params * trainable_fraction
    return 4 * params + weight_grads + 12 * layers * hidden * seq_len


def mfu(tokens_per_s_per_gpu: float, seq_len: int, summary: dict) -> float | None:
    """Model FLOPs utilisation of one GPU against its peak dense bf16 rate."""
    import torch

    name = torch.cuda.get_device_name()
    peak = float(os.environ.get("BENCH_PEAK_TFLOPS", 0)) or next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)
    if not peak:
        return None
    shape = estimate.model_shape(estimate.load_model_config(summary["model"]), "full")
    flops = training_flops_per_token(summary["all_params"], shape.layers, shape.hidden, seq_len, summary["trainable_params"] / summary["all_params"])
    return tokens_per_s_per_gpu * flops / (peak * 1e12)


# ---------------------------------------------------------------------------------------------------
# 1. Framework overhead


def framework_overhead(model: str, steps: int, batch_size: int, max_length: int, rounds: int, results: Path) -> dict:
    """Step time of train.py (TorchDDP, 1 rank) over that of the plain loop, alternating runs."""
    args = [*common_args(model, steps, batch_size, max_length, results), "method=full", "plugin.name=torch_ddp"]
    # One thread each: on a shared machine a two-thread step stalls at every OpenMP barrier whose other
    # thread was descheduled, which would swamp the difference being measured.
    ours, plain = [], []
    for i in range(rounds):
        out = results / "runs" / f"overhead_plain_{i}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(REPO / "bench" / "plain_loop.py"), str(out), *args], cwd=REPO, env=child_env(1), check=True, capture_output=True)
        plain += json.loads(out.read_text())["step_s"][WARMUP_STEPS:]
        run = train(Case("overhead", args, nproc=1, threads=1), results / "runs" / f"overhead_ours_{i}")
        ours += [m["step_s"] for m in timed(run["metrics"])]
    return {
        "model": model,
        "batch": f"{batch_size} x {max_length}",
        "timed_steps": len(ours),
        "train_py_min_s": min(ours),
        "plain_min_s": min(plain),
        "ratio": min(ours) / min(plain),
        "train_py_median_s": statistics.median(ours),
        "plain_median_s": statistics.median(plain),
        "median_ratio": statistics.median(ours) / statistics.median(plain),
    }


# ---------------------------------------------------------------------------------------------------
# 2-4. Plugins, methods, the CPU baseline

PLUGIN_SETUPS = {"torch_ddp": 1, "zero1": 1, "zero2": 1, "fsdp": 1, "tp2": 2, "pp2": 2}  # setup -> ranks it needs at least


def plugin_cases(base: list[str], nproc: int) -> list[Case]:
    """Full fine-tuning under each booster_configs/ setup that fits on nproc ranks, and FSDP as one unit
    (plugin.auto_wrap=none, what it was before per-block wrapping) beside the per-block default."""
    cases = [Case(setup, [*base, "method=full", "--config", f"booster_configs/{setup}.yaml"], nproc) for setup, need in PLUGIN_SETUPS.items() if nproc >= need]
    return cases + [Case("fsdp_one_unit", [*base, "method=full", "--config", "booster_configs/fsdp.yaml", "plugin.auto_wrap=none"], nproc)]


def method_cases(base: list[str], nproc: int) -> list[Case]:
    """Methods other than full fine-tuning (full is the torch_ddp plugin row): LoRA and QLoRA 4-bit on
    torch_ddp, and LoRA with its adapters split over 2 tensor-parallel ranks (booster_configs/tp2_lora.yaml),
    with the same columns (base bytes/param, step time, tokens/s, peak memory)."""
    cases = [
        Case("lora", [*base, "method=lora", "plugin.name=torch_ddp"], nproc),
        # bf16 on CPU too: the frozen base is then held in bf16 (2 bytes/param) instead of float32.
        Case("lora_bf16", [*base, "method=lora", "plugin.name=torch_ddp", "train.precision=bf16"], nproc),
        Case("qlora", [*base, "method=qlora", "quantization.bits=4", "plugin.name=torch_ddp"], nproc),
    ]
    if nproc >= 2:
        cases.append(Case("lora_tp2", [*base, "method=lora", "--config", "booster_configs/tp2_lora.yaml"], nproc))
    return cases


def pretrained_copy(name: str, results: Path) -> str:
    """A named (random-init) model saved once as a safetensors model directory: trained from there, it is a
    pretrained checkpoint to the plugins that load weights per shard (finetune.deferred)."""
    target = results / "runs" / f"{name}-pretrained"
    if not (target / "model.safetensors").exists():
        from finetune.config import ModelConfig
        from finetune.model import build_model

        model, tokenizer = build_model(ModelConfig(name=name), seed=0)
        model.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
    return str(target)


def base_bytes_per_param(summary: dict) -> float:
    """Bytes per parameter of the base weights as the run built them (summary.json's model_weights, taken
    before adapters exist): for QLoRA the packed 4-bit data and its quantization state over the logical count."""
    weights = summary["memory"]["model_weights"]
    params = weights["quantized"]["params"] + sum(d["params"] for d in weights["unquantized"].values())
    return weights["total_bytes"] / params


def cpu_process_baseline(results: Path) -> dict:
    """The estimator's CPU_PROCESS_BYTES, measured as it was defined: a 1-rank tiny-gpt2 run's RSS after
    training minus its live weights, gradients (param.grad + DDP bucket) and AdamW states."""
    run = train(Case("baseline", [*common_args("tiny-gpt2", 3, 1, 64, results), "method=full", "eval.batch_size=1", MEASURE_MEMORY], nproc=1), results / "runs" / "baseline")
    summary = run["summary"]
    after = next(s["current_bytes"] for s in summary["memory"]["stages"] if s["name"] == "after_training")
    params = summary["all_params"]
    measured = after - params * (4 + 2 * 4 + 8)
    return {"measured_bytes": measured, "constant_bytes": estimate.CPU_PROCESS_BYTES}


# ---------------------------------------------------------------------------------------------------
# Report


def fmt_mib(n: float | None) -> str:
    return f"{n / MIB:,.0f}" if n else "-"


def markdown(results: dict) -> str:
    """The results as markdown tables."""
    on_cuda = results["device"] == "cuda"
    lines = [
        f"# Benchmarks: {results['machine']}",
        "",
        f"Measured {results['date']} in {results['wall_s'] / 60:.1f} min (1-minute load average {results['load_before']:.1f} before, {results['load_after']:.1f} after).",
        "",
    ]
    if "overhead" in results:
        o = results["overhead"]
        lines += [
            "## Framework overhead (TorchDDP, 1 rank, full fine-tuning)",
            "",
            "| model | batch | timed steps (each) | finetune/train.py step, fastest / median | plain PyTorch loop step, fastest / median | ratio, fastest / median |",
            "|---|---|---|---|---|---|",
            f"| {o['model']} | {o['batch']} | {o['timed_steps']} | {o['train_py_min_s']:.3f} / {o['train_py_median_s']:.3f} s "
            f"| {o['plain_min_s']:.3f} / {o['plain_median_s']:.3f} s | {o['ratio']:.3f} / {o['median_ratio']:.3f} |",
            "",
        ]
    memory = "peak CUDA memory, rank 0 (MiB)" if on_cuda else "peak RSS, rank 0 (MiB)"
    speed = "tokens/s per GPU" if on_cuda else "tokens/s (all ranks)"
    for title, key in (("Plugins (full fine-tuning)", "plugins"), ("Methods (TorchDDP; lora_tp2: tensor parallel)", "methods")):
        rows = results.get(key, [])
        if not rows:
            continue
        header = ["setup", speed, "median step (s)", memory, "predicted (MiB)", "measured/predicted", "building the model, all ranks (MiB)", "trainable params"]
        header += ["base bytes/param"] if key == "methods" else []
        header += ["MFU"] if on_cuda else []
        lines += [f"## {title}: {results['model']}, {rows[0]['ranks']} ranks, batch {results['batch']} per rank", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in rows:
            ratio = r["peak_bytes_rank0"] / r["predicted_bytes"] if r["predicted_bytes"] else float("nan")
            tokens = r["tokens_per_s_per_gpu"] if on_cuda else r["tokens_per_s"]
            cells = [r["case"], f"{tokens:,.0f}", f"{r['median_step_s']:.2f}", fmt_mib(r["peak_bytes_rank0"]), fmt_mib(r["predicted_bytes"]), f"{ratio:.2f}", fmt_mib(r.get("build_bytes_sum")), f"{r['trainable_params']:,d}"]
            cells += [f"{r['base_bytes_per_param']:.2f}"] if key == "methods" else []
            cells += [f"{r['mfu']:.1%}" if r.get("mfu") else "-"] if on_cuda else []
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if "baseline" in results:
        b = results["baseline"]
        lines += ["## Estimator's CPU process baseline", "", f"measured {fmt_mib(b['measured_bytes'])} MiB; finetune.estimate.CPU_PROCESS_BYTES = {fmt_mib(b['constant_bytes'])} MiB", ""]
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    """plugins.png: throughput and peak memory (measured and predicted) per setup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["plugins"] + [r for r in results["methods"] if r["case"] != "full"]
    names = [r["case"] if r in results["plugins"] or r["case"].endswith("tp2") else f"{r['case']} (torch_ddp)" for r in rows]
    on_cuda = results["device"] == "cuda"
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    speed.bar(names, [r["tokens_per_s_per_gpu" if on_cuda else "tokens_per_s"] for r in rows], color="tab:blue")
    speed.set_ylabel("non-pad tokens/s" + (" per GPU" if on_cuda else " (all ranks)"))
    speed.set_title("throughput")
    x = range(len(rows))
    memory.bar([i - 0.2 for i in x], [r["peak_bytes_rank0"] / MIB for r in rows], width=0.4, label="measured (rank 0)", color="tab:orange")
    memory.bar([i + 0.2 for i in x], [(r["predicted_bytes"] or 0) / MIB for r in rows], width=0.4, label="finetune.estimate", color="tab:gray")
    memory.set_xticks(list(x), names)
    memory.set_ylabel("peak CUDA MiB" if on_cuda else "peak RSS MiB")
    memory.set_title("train_step_peak per rank")
    memory.legend()
    for axis in (speed, memory):
        axis.tick_params(axis="x", rotation=30)
        axis.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{results['model']}, {rows[0]['ranks']} ranks, batch {results['batch']}: {results['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_case(case: Case, key: str, device: str, results: Path) -> dict:
    """Train one case and report its row."""
    row = case_row(case, train(case, results / "runs" / f"{key}_{case.name}"), device == "cuda")
    print(f"{key} {case.name}: {row['tokens_per_s']:.0f} tokens/s, peak {fmt_mib(row['peak_bytes_rank0'])} MiB (predicted {fmt_mib(row['predicted_bytes'])})", flush=True)
    return row


def machine() -> tuple[str, str, int]:
    """(description, device, ranks to use): every GPU on CUDA, else 2 CPU processes."""
    import platform

    import torch

    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        return f"{gpus} x {torch.cuda.get_device_name()}", "cuda", gpus
    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}", "cpu", 2


# --smoke: every part of the benchmark once, as small as it runs: one timed step of a tiny model, one rank.
SMOKE = {"model": "tiny-gpt2", "steps": WARMUP_STEPS + 1, "batch_size": 1, "max_length": 64, "rounds": 1, "overhead_steps": 1}
SMOKE_CASES = {"torch_ddp"}  # one plugin row (it is also the methods table's "full" row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", help="named model for the plugin and method tables")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per plugin run (the first %d are warm-up)" % WARMUP_STEPS)
    parser.add_argument("--batch-size", type=int, default=2, help="per rank")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per sample (every sample fills it)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the overhead comparison")
    parser.add_argument("--overhead-steps", type=int, default=6, help="timed steps per run of the overhead comparison")
    parser.add_argument("--only", default="", help="comma-separated case names (e.g. lora,qlora): just these rows, without the overhead comparison and baseline; written to results-NAMES.md/.json")
    parser.add_argument("--as-pretrained", action="store_true", help="save the named --model as a safetensors model directory first and train from it (as from a pretrained checkpoint)")
    parser.add_argument("--smoke", action="store_true", help="every part once on a tiny model, one rank (%s)" % ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    parser.add_argument("--results", type=Path, help="where results and runs go (default bench/results; with --smoke a new temporary directory)")
    opts = parser.parse_args()
    if opts.smoke:
        vars(opts).update(SMOKE)
    only = set(filter(None, opts.only.split(",")))
    results_dir = opts.results or (Path(tempfile.mkdtemp(prefix="bench-smoke-")) if opts.smoke else RESULTS)
    started = time.perf_counter()
    results_dir.mkdir(parents=True, exist_ok=True)
    description, device, nproc = machine()
    nproc = 1 if opts.smoke else nproc
    results: dict = {"machine": description, "device": device, "model": opts.model + (" (saved as a pretrained directory)" if opts.as_pretrained else ""), "batch": f"{opts.batch_size} x {opts.max_length}", "date": time.strftime("%Y-%m-%d %H:%M"), "load_before": os.getloadavg()[0]}
    print(f"bench on {description}", flush=True)
    if device == "cpu" and not only:
        results["baseline"] = cpu_process_baseline(results_dir)
        print(f"CPU process baseline: {fmt_mib(results['baseline']['measured_bytes'])} MiB", flush=True)
    if not only:
        results["overhead"] = framework_overhead(opts.model, WARMUP_STEPS + opts.overhead_steps, opts.batch_size, opts.max_length, opts.rounds, results_dir)
        print(f"framework overhead ratio: {results['overhead']['ratio']:.3f}", flush=True)
    base = [*common_args(pretrained_copy(opts.model, results_dir) if opts.as_pretrained else opts.model, opts.steps, opts.batch_size, opts.max_length, results_dir), MEASURE_MEMORY]
    base += ["train.precision=bf16"] if device == "cuda" else []  # MFU is against the bf16 peak
    wanted = SMOKE_CASES if opts.smoke else only
    for key, cases in (("plugins", plugin_cases(base, nproc)), ("methods", method_cases(base, nproc))):
        results[key] = [run_case(case, key, device, results_dir) for case in cases if not wanted or case.name in wanted]
    ddp = [r for r in results["plugins"] if r["case"] == "torch_ddp"]
    results["methods"][:0] = [{**ddp[0], "case": "full"}] if ddp else []  # full fine-tuning is the torch_ddp row
    if results["plugins"]:
        chart(results, results_dir / "plugins.png")
    name = "results-" + "-".join(sorted(only)) if only else "results"  # a partial run never replaces the full one
    write_results(results, started, results_dir, name, markdown)


def comparison_parser(description: str, smoke: dict, *, model_help: str, steps: int, batch_size: int, batch_help: str, max_length: int, max_length_help: str, rounds: int = 1) -> argparse.ArgumentParser:
    """The options every side-by-side comparison takes (the job, the alternating rounds, --smoke, --results); a script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2-135m-instruct", help=model_help)
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per run (the first %d are dropped)" % WARMUP_STEPS)
    parser.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    parser.add_argument("--max-length", type=int, default=max_length, help=max_length_help)
    parser.add_argument("--rounds", type=int, default=rounds, help="alternating rounds (each runs every setting once)")
    parser.add_argument("--smoke", action="store_true", help="one short round on a tiny model (%s)" % ", ".join(f"{k}={v}" for k, v in smoke.items()))
    parser.add_argument("--results", type=Path, help="where results and runs go (default bench/results; with --smoke a new temporary directory)")
    return parser


def start_results(opts, smoke: dict, default_dir: Path) -> tuple[Path, float, dict]:
    """A comparison's start: --smoke's settings applied, its results directory (a new temporary one for a smoke), the
    clock, and the record of machine, job, date and load that write_results completes."""
    if opts.smoke:
        vars(opts).update(smoke)
    results_dir = opts.results or (Path(tempfile.mkdtemp(prefix="bench-smoke-")) if opts.smoke else default_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    started, (description, _, _) = time.perf_counter(), machine()
    job = {"model": opts.model, "batch": f"{opts.batch_size} x {opts.max_length}", "steps": opts.steps, "rounds": opts.rounds}
    return results_dir, started, {"machine": description, **job, "date": time.strftime("%Y-%m-%d %H:%M"), "load_before": os.getloadavg()[0]}


def write_results(results: dict, started: float, results_dir: Path, name: str, table: Callable[[dict], str]) -> None:
    """Stamp a benchmark's wall time and the load after it, write NAME.json and its table as NAME.md, print the table."""
    results["wall_s"] = time.perf_counter() - started
    results["load_after"] = os.getloadavg()[0]  # other work on the machine slows every timing alike
    (results_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (results_dir / f"{name}.md").write_text(table(results) + "\n")
    print(table(results))
    print(f"wrote {results_dir}/{name}.md, {name}.json in {results['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
