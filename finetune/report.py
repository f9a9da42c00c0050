"""Compare finished runs side by side: a markdown table and a PNG of bar charts.

    python -m finetune.report RUN_DIR [RUN_DIR ...] [--out DIR] [--name STEM] [--overwrite] [--evaluation EVAL.json ...]

Reads each run's summary.json (written by finetune/train.py at the end of a run) and writes
DIR/STEM.md and DIR/STEM.png (default ./report.md, ./report.png); a file already there is
replaced only with --overwrite. Works for every task: the best eval
is accuracy (with macro-F1) for classification, preference accuracy (with the reward margin) for preference
pairs and loss (with perplexity) for language modelling.
--evaluation adds the table of a `python -m finetune.evaluate --json` file (models side by side on one data file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import FinetuneError

GB = 1024**3


class ReportError(FinetuneError):
    """A run directory cannot be reported on."""


@dataclass(frozen=True)
class Row:
    """One run, as the table shows it."""

    run: str
    setting: str
    method: str
    world_size: int
    epochs: float | None
    steps: int
    metric_name: str  # "accuracy", "preference accuracy" or "eval loss"
    metric: float
    metric_detail: str  # macro-F1 or perplexity, and the step of the best eval
    peak_gb_per_rank: list[float]  # one entry per rank; rank 0's alone for runs written before per-rank peaks
    heap_kept: bool  # a CPU run under train.cpu_allocator=fast: its peak includes freed memory glibc's heap kept
    wall_s: float
    tokens_per_s: float
    sequences_per_s: float | None
    trainable_params: int
    artifact_mb: float


def read_summary(run_dir: Path) -> dict:
    """A finished run's summary.json, or one clear error."""
    path = run_dir / "summary.json"
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory")
    if not path.is_file():
        raise ReportError(f"{run_dir}: no summary.json (not a finished run of finetune/train.py)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None


def setting_name(summary: dict) -> str:
    """The plugin and its layout in a few characters: 'single', 'ddp x2', 'zero2 x2', 'tp2', 'pp2 1f1b', ... (the plugin says)."""
    from finetune.core.plugins import SPECS

    plugin, options, world = summary["plugin"], summary.get("plugin_options", {}), summary["world_size"]
    if plugin not in SPECS:
        return f"{plugin} x{world}"
    return SPECS[plugin].setting_label(options, world, summary.get("data_parallel_size", 1))


def best_metric(summary: dict) -> tuple[str, float, str]:
    """(name, value, detail) of the run's best eval: accuracy for classification and preference pairs, loss for LM tasks."""
    best = summary["eval"]["best"]
    if best is None:  # every eval of the run was non-finite
        return "eval loss", float("nan"), "no finite eval"
    step = f"step {best['step']}" if "step" in best else ""
    step += "".join(f"; {key.removeprefix('loss/')} loss {value:.3f}" for key, value in best.items() if key.startswith("loss/"))  # a mixture's sources
    if "margin" in best:  # preference pairs
        return "preference accuracy", best["accuracy"], f"margin {best['margin']:.3f}, {step}"
    if "accuracy" in best:
        return "accuracy", best["accuracy"], f"macro-F1 {best['macro_f1']:.3f}, {step}"
    return "eval loss", best["loss"], f"ppl {best['perplexity']:.2f}, {step}"


def row_of(run_dir: Path, summary: dict) -> Row:
    """The table row of one run."""
    try:
        memory = summary["memory"]
        peaks = memory.get("peak_bytes_per_rank") or [max(s["peak_bytes"] for s in memory["stages"])]  # older runs: rank 0's
        metric_name, metric, detail = best_metric(summary)
        throughput = summary["throughput"]
        return Row(
            run=run_dir.name,
            setting=setting_name(summary),
            method=summary["method"],
            world_size=summary["world_size"],
            epochs=summary.get("epochs"),
            steps=summary["steps"],
            metric_name=metric_name,
            metric=metric,
            metric_detail=detail,
            peak_gb_per_rank=[p / GB for p in peaks],
            heap_kept=memory.get("cpu_allocator") == "fast",
            wall_s=summary["wall_s"],
            tokens_per_s=throughput["tokens_per_s"],
            sequences_per_s=throughput.get("sequences_per_s"),
            trainable_params=summary["trainable_params"],
            artifact_mb=sum(size for name, size in summary.get("artifacts", {}).items() if name.startswith("final/")) / 1e6,
        )
    except KeyError as err:
        raise ReportError(f"{run_dir / 'summary.json'}: missing {err}; was it written by finetune/train.py?") from None


def markdown_table(rows: list[Row]) -> str:
    """The comparison as a markdown table, one run per line."""
    header = ["run", "setting", "method", "ranks", "epochs / steps", "best eval", "peak memory per rank (GB)", "wall (s)", "tokens/s", "seq/s", "trainable params", "artifact (MB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        epochs = f"{r.epochs:.2f} / {r.steps}" if r.epochs is not None else f"- / {r.steps}"
        cells = [
            r.run,
            r.setting,
            r.method,
            str(r.world_size),
            epochs,
            f"{r.metric_name} {r.metric:.4f} ({r.metric_detail})",
            " / ".join(f"{gb:.2f}" for gb in r.peak_gb_per_rank) + (" (rank 0)" if len(r.peak_gb_per_rank) < r.world_size else "") + (HEAP_MARK if r.heap_kept else ""),
            f"{r.wall_s:.0f}",
            f"{r.tokens_per_s:.0f}",
            f"{r.sequences_per_s:.1f}" if r.sequences_per_s is not None else "-",
            f"{r.trainable_params:,d}",
            f"{r.artifact_mb:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.heap_kept for r in rows):
        lines += ["", f"{HEAP_MARK.strip()} CPU RSS under train.cpu_allocator=fast: includes freed memory glibc's heap keeps (above the live tensors); train.cpu_allocator=exact measures what the run holds."]
    return "\n".join(lines) + "\n"


HEAP_MARK = " (heap)"  # marks a peak taken under train.cpu_allocator=fast


def evaluation_table(models: list[dict]) -> str:
    """finetune.evaluate's results as one markdown table, a model per row (its metrics in their order)."""
    columns = [key for key in models[0] if key != "model"]
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for result in models:
        cells = [f"{result[key]:.4f}" if isinstance(result[key], float) else str(result[key]) for key in columns]
        lines.append(f"| {result['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluation_section(path: Path) -> str:
    """The report's section for a finetune.evaluate --json file: what was scored, and the table; or one clear error."""
    try:
        evaluation = json.loads(path.read_text())
        heading = f"\n## Evaluated on {evaluation['data']} (task {evaluation['task']}, max_length {evaluation['max_length']})\n\n"
        return heading + evaluation_table(evaluation["models"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, IndexError, AttributeError):
        raise ReportError(f"{path}: not a results file of python -m finetune.evaluate --json") from None


def plot(rows: list[Row], path: Path) -> None:
    """Bar charts of the best eval, peak memory (highest rank), wall time and throughput per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.setting}\n{r.method}" for r in rows]
    metric_names = sorted({r.metric_name for r in rows})
    panels = [
        (" / ".join(f"best {m}" for m in metric_names), [r.metric for r in rows]),
        ("peak memory, highest rank (GB)", [max(r.peak_gb_per_rank) for r in rows]),
        ("wall time (s)", [r.wall_s for r in rows]),
        ("throughput (non-pad tokens/s)", [r.tokens_per_s for r in rows]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8 + 0.1 * len(rows)))
    for ax, (title, values) in zip(axes, panels):
        bars = ax.bar(range(len(rows)), values, color="tab:blue")
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dirs: list[Path], out_dir: Path, name: str = "report", overwrite: bool = False, evaluations: list[Path] = ()) -> tuple[Path, Path]:
    """Read every run and evaluation (all checked before anything is written), then write STEM.md and STEM.png (existing ones only with overwrite)."""
    rows = [row_of(d, read_summary(d)) for d in run_dirs]
    sections = [evaluation_section(path) for path in evaluations]
    table, image = out_dir / f"{name}.md", out_dir / f"{name}.png"
    existing = [str(path) for path in (table, image) if os.path.lexists(path)]
    if existing and not overwrite:
        raise ReportError(f"{' and '.join(existing)}: exists; pass --overwrite to replace it, or choose another --out or --name")
    out_dir.mkdir(parents=True, exist_ok=True)
    table.write_text(markdown_table(rows) + "".join(sections))
    plot(rows, image)
    return table, image


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.report", description="Compare finished runs (their summary.json) in a markdown table and a PNG.")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="output_dir of a finished run")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the report files (default: .)")
    parser.add_argument("--name", default="report", help="file stem: writes STEM.md and STEM.png (default: report)")
    parser.add_argument("--overwrite", action="store_true", help="replace STEM.md and STEM.png if they exist (refused otherwise)")
    parser.add_argument("--evaluation", type=Path, nargs="+", default=[], metavar="EVAL.json", help="add the results of python -m finetune.evaluate --json")
    args = parser.parse_args(argv)
    try:
        table, image = write_report(args.runs, args.out, args.name, args.overwrite, args.evaluation)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table.read_text(), end="")
    print(f"wrote {table} and {image}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
