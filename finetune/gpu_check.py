"""A first check on a new machine: a few training steps of every example plugin config on a tiny model, as a table.

    python -m finetune.gpu_check                     # every booster_configs/*.yaml this machine can run
    python -m finetune.gpu_check --only torch_ddp.yaml,zero2.yaml --precision bf16 --steps 2

Each row is a real run of finetune/train.py (torchrun, one process per GPU, or per CPU core pair) into a
temporary directory: pass, fail (with the run's own error line) or skip (with the one-line reason: the config
refused on this machine, or too few GPUs). Paste the table into a bug report; `--json PATH` writes it too.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "booster_configs"

# Each example config with what makes it a small run: extra overrides and the processes it needs.
EXAMPLE_RUNS: dict[str, tuple[list[str], int]] = {
    "torch_ddp.yaml": ([], 2),
    "zero1.yaml": ([], 2),
    "zero2.yaml": ([], 2),
    "zero2_cpu_offload.yaml": ([], 2),
    "gemini.yaml": (["method=full"], 2),
    "gemini_auto.yaml": (["method=full"], 2),
    "fsdp.yaml": ([], 2),
    "fsdp_cpu_offload.yaml": ([], 2),
    "tp2.yaml": (["method=full", "model.name=tiny-gpt2"], 2),
    "pp2.yaml": ([], 2),
    "pp2_interleaved.yaml": ([], 2),  # the quickstart's 30 layers fill 4 chunks
    "tp2_pp2.yaml": (["method=full", "model.name=tiny-llama"], 4),
    "tp2_lora.yaml": (["model.name=tiny-gpt2"], 2),
    "sp2_lora.yaml": (["model.name=tiny-llama"], 2),  # heads must divide by sp_size (SmolLM2: 3 key/value heads)
    "pp2_zero1.yaml": ([], 2),
}
# A tiny model and a few steps: the check is whether the path runs, not what it learns.
SMALL_RUN = ["data.max_length=64", "train.batch_size=4", "eval.every_steps=0", "eval.num_generation_prompts=1", "eval.max_new_tokens=2", "checkpoint.every_steps=0"]


def row_args(name: str, precision: str, steps: int, data: Path, output_dir: Path) -> list[str]:
    """train.py's arguments for one example config's row."""
    extra, _ = EXAMPLE_RUNS[name]
    model = [] if any(a.startswith("model.name=") for a in extra) else ["model.name=tiny-llama"]
    return ["--config", str(CONFIGS / name), *extra, *model, *SMALL_RUN, f"train.precision={precision}", f"train.max_steps={steps}",
            f"data.train_path={data}", f"output_dir={output_dir}"]


def refusal(args: list[str], world_size: int, has_cuda: bool) -> str:
    """The config's one-line refusal on this machine ('' if it would start)."""
    from finetune.config import ConfigError, load_config

    try:
        load_config(args, world_size=world_size, has_cuda=has_cuda)
    except ConfigError as err:
        return str(err).splitlines()[0]
    return ""


def run_row(args: list[str], nproc: int, timeout_s: int) -> tuple[str, str, float]:
    """Run train.py under torchrun: (pass|fail, the error line or '', seconds)."""
    with socket.socket() as s:  # a free port for this run's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}", str(REPO / "finetune" / "train.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), "HF_HUB_OFFLINE": "1"}
    start = time.monotonic()
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "fail", f"no result within {timeout_s} s", time.monotonic() - start
    seconds = time.monotonic() - start
    if result.returncode == 0:
        return "pass", "", seconds
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    error = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else f"exit {result.returncode}")
    return "fail", error[:300], seconds


def write_data(path: Path, n: int = 64) -> Path:
    """A small instruction file (the check needs data, not a data set)."""
    words = ["apple", "river", "stone", "cloud"]
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"Repeat {words[i % 4]}.", "input": "", "output": " ".join([words[i % 4]] * 3)}) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the table; exit 1 if any row failed."""
    import torch

    parser = argparse.ArgumentParser(prog="python -m finetune.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated config files (default: all of booster_configs/)")
    parser.add_argument("--precision", default="", help="bf16, fp16 or fp32 (default: bf16 and fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--timeout_s", type=int, default=600, help="per run")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or sorted(EXAMPLE_RUNS)
    unknown = [n for n in names if n not in EXAMPLE_RUNS]
    if unknown:
        print(f"error: --only: unknown config(s) {', '.join(unknown)}; choose from {', '.join(sorted(EXAMPLE_RUNS))}", file=sys.stderr)
        return 2
    has_cuda = torch.cuda.is_available()
    precisions = [args.precision] if args.precision else (["bf16", "fp16"] if has_cuda else ["fp32"])
    devices = torch.cuda.device_count() if has_cuda else max(1, (os.cpu_count() or 1))
    machine = f"{torch.cuda.get_device_name(0)} x{devices}" if has_cuda else f"CPU ({devices} cores)"
    print(f"gpu_check on {machine}: torch {torch.__version__}, {len(names)} config(s) x {', '.join(precisions)}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        data = write_data(Path(tmp) / "train.jsonl")
        for name in names:
            nproc = EXAMPLE_RUNS[name][1]
            for precision in precisions:
                run_args = row_args(name, precision, args.steps, data, Path(tmp) / f"{name}-{precision}")
                reason = refusal(run_args, nproc, has_cuda)
                if not reason and has_cuda and nproc > devices:
                    reason = f"needs {nproc} GPUs, {devices} present"
                status, error, seconds = ("skip", reason, 0.0) if reason else run_row(run_args, nproc, args.timeout_s)
                rows.append({"config": name, "precision": precision, "processes": nproc, "status": status, "seconds": round(seconds, 1), "detail": error})
                print(f"{name:24} {precision:5} x{nproc}  {status:4}  {seconds:6.1f} s  {error}", flush=True)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pass", "fail", "skip")}
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "torch": torch.__version__, "rows": rows}, indent=1))
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
