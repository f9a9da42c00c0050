"""The output contract under output_dir, written by rank 0 only.

    config.yaml      the resolved config
    metrics.jsonl    one line per logged step: step, loss, lr, tokens_per_s, memory
    summary.json     parameters, plugin, method, world size, memory stages, throughput, eval, artifacts
    generations.json fixed held-out prompts, before and after training
    loss.png         training loss (and eval loss) over steps
    final/           a peft adapter dir (LoRA) or a Hugging Face model dir (full fine-tuning)
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml


class RunOutputs:
    """Writes one run's files. Create it on rank 0 only."""

    def __init__(self, output_dir: str, resume_step: int | None = None) -> None:
        """A new run starts a new metrics log; a resumed one keeps its records up to the resumed step."""
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        kept = [r for r in self.read_metrics() if r["step"] <= resume_step] if resume_step is not None else []
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl (none if it does not exist), less a torn last line, which is reported."""
        if not self.metrics_path.is_file():
            return []
        lines = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        try:
            last = [json.loads(lines[-1])] if lines else []
        except json.JSONDecodeError:  # the process died mid-write; every earlier line was complete
            print(f"{self.metrics_path}: ignored a torn last line (a run stopped while writing it): {lines[-1][:80]!r}", flush=True)
            last = []
        return [json.loads(line) for line in lines[:-1]] + last

    def write_config(self, config: dict[str, Any]) -> None:
        """config.yaml: the resolved config, reusable as --config."""
        (self.dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def write_json(self, name: str, data: Any) -> Path:
        """Write a JSON file into the run dir."""
        path = self.dir / name
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    def artifacts(self) -> dict[str, int]:
        """Every file of the run dir with its size in bytes."""
        return {str(p.relative_to(self.dir)): p.stat().st_size for p in sorted(self.dir.rglob("*")) if p.is_file()}

    def plot_loss(self, steps: list[int], losses: list[float], evals: list[tuple[int, float]]) -> Path:
        """loss.png: training loss per step, eval loss as points."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, losses, label="train loss", color="tab:blue", alpha=0.35)
        if len(losses) >= 10:  # small batches make the raw curve noisy: show a moving average too
            window = max(3, len(losses) // 10)
            smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
            ax.plot(steps, smooth, label=f"train loss ({window}-step mean)", color="tab:blue")
        if evals:
            ax.plot([s for s, _ in evals], [l for _, l in evals], "o--", label="eval loss", color="tab:orange")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.dir / "loss.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


class _Tee(io.TextIOBase):
    """A text stream that writes to the original stream and to a log file."""

    def __init__(self, stream, log) -> None:
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def isatty(self) -> bool:  # progress bars ask
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


def tee_rank_output(output_dir: str, rank: int) -> Path:
    """Copy this rank's stdout and stderr into output_dir/logs/rank_N.log (every rank, not only rank 0).

    Appended, with a header line per launch: a resumed run keeps the log of the launch that crashed.
    """
    path = Path(output_dir) / "logs" / f"rank_{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.open("a", buffering=1)
    log.write(f"===== launch {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()} pid {os.getpid()}: {' '.join(sys.argv)}\n")
    sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
    return path
