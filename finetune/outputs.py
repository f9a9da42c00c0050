"""The output contract under output_dir, written by rank 0 only.

    config.yaml      the resolved config
    metrics.jsonl    one line per logged step: step, loss, lr, grad_norm, tokens_per_s, memory
    tensorboard/     the same records as TensorBoard scalars (logging.tensorboard=true; finetune.tracking)
    summary.json     parameters, plugin, method, world size, memory stages, throughput, eval, artifacts
    generations.json fixed held-out prompts, before and after training
    loss.png         training loss (and eval loss) over steps
    final/           a peft adapter dir (LoRA) or a Hugging Face model dir (full fine-tuning)
    .lock            the host and pid of the run writing here (refuses a second run; removed at exit)
    .previous-run/   with overwrite_output_dir=true, the replaced run's results until this run's final/ is written
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import yaml

from finetune.errors import FinetuneError
from finetune.tracking import Tracker

if TYPE_CHECKING:
    from finetune.config import Config
    from finetune.run import Run


class RunOutputs:
    """Writes one run's files. Create it on rank 0 only."""

    def __init__(self, output_dir: str, resume_step: int | None = None, tracker: Tracker | None = None) -> None:
        """A new run starts a new metrics log; a resumed one keeps its records up to the resumed step.

        Args:
            tracker: gets every record appended to metrics.jsonl (TensorBoard, wandb).
        """
        self.tracker = tracker
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
        """Append one line to metrics.jsonl (and hand it to the trackers)."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log(record)

    def write_json(self, name: str, data: Any) -> Path:
        """Write a JSON file into the run dir."""
        path = self.dir / name
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    def artifacts(self) -> dict[str, int]:
        """Every file of the run dir with its size in bytes."""
        files = (p for p in sorted(self.dir.rglob("*")) if p.is_file() and not p.relative_to(self.dir).parts[0].startswith("."))  # not .lock
        return {str(p.relative_to(self.dir)): p.stat().st_size for p in files}

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


# --- the run's records, written by rank 0 --------------------------------------------------------


class OutputDirInUse(FinetuneError):
    """Another live run writes into this output_dir."""


LOCK = ".lock"
PREVIOUS = ".previous-run"
# What a run writes at the top of output_dir (logs/ is appended to, never replaced).
RESULTS = ("final", "final.partial", "checkpoints", "summary.json", "generations.json", "metrics.jsonl", "loss.png", "config.yaml")


@contextlib.contextmanager
def own_output_dir(cfg: Config) -> Iterator[None]:
    """Rank 0, before anything is written: lock output_dir; with overwrite_output_dir=true set the old run aside.

    The old run's results come back if this run fails before its final/ is written (drop_previous).
    The lock goes at exit, errors included; a SIGKILLed run leaves it, and the next run takes it over.
    """
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _take_lock(out / LOCK)
    set_aside = False
    try:
        if cfg.overwrite_output_dir:
            set_aside = _set_previous_aside(out)
        yield
    except BaseException:
        if set_aside and (out / PREVIOUS).is_dir():
            _restore_previous(out)
        raise
    finally:
        (out / LOCK).unlink(missing_ok=True)


def _take_lock(lock: Path) -> None:
    """Create the lock file naming this host and pid; a stale one (its pid gone on this host) is taken over."""
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text())
            except (OSError, json.JSONDecodeError):
                owner = {}  # torn by a crash while it was written: nobody can be named as its owner
            if owner and (owner.get("host") != mine["host"] or _alive(owner.get("pid"))):
                raise OutputDirInUse(f"output_dir: {lock.parent} is in use by the run of host {owner.get('host')} pid {owner.get('pid')} (since {owner.get('since')}); "
                                     f"wait for it to end or choose another output_dir (if that run is gone, delete {lock})") from None
            print(f"{lock}: taking over the lock of a run that is gone (host {owner.get('host')} pid {owner.get('pid')})", flush=True)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(mine) + "\n")
        return


def _alive(pid: Any) -> bool:
    """Whether a process with this pid runs on this host (another user's counts)."""
    try:
        if int(pid) <= 0:  # 0 and negatives address process groups, not a run
            return False
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (TypeError, ValueError):
        return False  # not a pid: a lock no run can own
    return True


def _set_previous_aside(out: Path) -> bool:
    """Move the results of the run being replaced into .previous-run/; whether this run set any aside.

    A .previous-run/ already there was left by an overwrite run that never finished: what lies next to
    it is that unfinished run's, and the finished one stays set aside.
    """
    previous = out / PREVIOUS
    if previous.is_dir():
        _remove_results(out)
        return True
    found = [out / name for name in RESULTS if (out / name).exists()]
    if not found:
        return False
    previous.mkdir()
    for path in found:
        path.rename(previous / path.name)
    print(f"overwrite_output_dir: the previous run's results are in {previous} until this run's final/ is written", flush=True)
    return True


def _remove_results(out: Path) -> None:
    for name in RESULTS:
        path = out / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _restore_previous(out: Path) -> None:
    """This run failed: put the replaced run's results back."""
    _remove_results(out)
    for path in (out / PREVIOUS).iterdir():
        path.rename(out / path.name)
    (out / PREVIOUS).rmdir()
    print(f"this run failed: the previous run's results are back in {out}", flush=True)


def drop_previous(output_dir: str) -> None:
    """Rank 0, once final/ is written: the replaced run's results go for good."""
    shutil.rmtree(Path(output_dir) / PREVIOUS, ignore_errors=True)


def start_outputs(cfg: Config, resume_state: dict | None) -> RunOutputs:
    """Rank 0: the run dir (an overwritten run's results already set aside by own_output_dir), with the resolved config written."""
    from finetune.config import to_dict

    resume_step = resume_state["step"] if resume_state else None
    writer = RunOutputs(cfg.output_dir, resume_step, Tracker(cfg, resume_step))
    writer.write_config(to_dict(cfg))
    return writer


def resumed_history(writer: RunOutputs, start_step: int) -> tuple[list[int], list[float], list[dict]]:
    """Steps, losses and evals a resumed run had logged before its checkpoint (empty for a new run)."""
    records = [r for r in writer.read_metrics() if 0 < r["step"] <= start_step] if start_step else []
    train = [r for r in records if "loss" in r]
    evals = [{"step": r["step"], **{k.removeprefix("eval_"): v for k, v in r.items() if k.startswith("eval_") and k != "eval_best"}} for r in records if "eval_loss" in r]
    return [r["step"] for r in train], [r["loss"] for r in train], evals


def step_metrics(step: int, epoch: int, loss: float, lr: float, tokens: int, elapsed: float, memory, grad_norm: float | None = None) -> dict:
    """A metrics.jsonl line of a training step (a step skipped for a non-finite loss says so).

    grad_norm: the global gradient norm clipping saw (before clipping); None without clipping (train.max_grad_norm=0).
    """
    import math

    if not math.isfinite(loss):
        return {"step": step, "epoch": epoch, "skipped": "non-finite loss"}
    return {
        "step": step,
        "epoch": epoch,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": tokens,
        "tokens_per_s": tokens / elapsed,
        "step_s": elapsed,
        "memory": {"current_bytes": memory.current_bytes, "peak_bytes": memory.peak_bytes},
    }


def eval_metrics(step: int, result: dict) -> dict:
    """A metrics.jsonl line of an eval result."""
    return {"step": step, **{f"eval_{k}": v for k, v in result.items() if k not in ("tokens", "samples")}}


def first_eval(writer: RunOutputs, result: dict, start_step: int) -> dict:
    """The eval "before training": logged now for a new run; a resumed run keeps the one its first launch logged."""
    logged = [r for r in writer.read_metrics() if r["step"] == 0 and "eval_loss" in r] if start_step else []
    if logged:
        return {k.removeprefix("eval_"): v for k, v in logged[0].items() if k.startswith("eval_")}
    writer.log_metrics(eval_metrics(0, result))
    return result


def finish(writer: RunOutputs, run: Run, data, history: dict, evals: tuple[dict, dict], memory: dict, reload: dict, parameter_changes: dict, digests: list, final: Path, facts: dict, profiler, packed_dataloader) -> None:
    """Rank 0 after training: generations.json, the last and best eval, loss.png, summary.json and the closing report."""
    import torch.distributed as dist

    from finetune.config import to_dict
    from finetune.estimate import compare_with_run
    from finetune.evaluation import best_eval

    cfg = run.cfg
    eval_before, eval_after = evals
    generations = reload.pop("generations")
    writer.write_json("generations.json", generations)
    all_evals = [{"step": 0, **eval_before}, *history["eval_history"], {"step": facts["total_steps"], **eval_after}]
    best, last = best_eval(all_evals), all_evals[-1]
    writer.log_metrics({**eval_metrics(facts["total_steps"], eval_after), "eval_best": best})  # the last eval, and the best
    writer.plot_loss(history["steps"], history["losses"], [(e["step"], e["loss"]) for e in all_evals])
    memory["estimate"] = compare_with_run(cfg, dist.get_world_size(), facts["seq_len"], memory)
    summary = {
        "model": cfg.model.name,
        "task": cfg.task,
        "method": cfg.method,
        "plugin": cfg.plugin.name,
        "plugin_options": to_dict(cfg)["plugin"],
        "world_size": dist.get_world_size(),
        "data_parallel_size": run.layout.dp_size,
        "precision": cfg.train.precision,
        "trainable_params": facts["trainable"],
        "all_params": facts["total"],
        "steps": facts["total_steps"],
        "epochs": facts["total_steps"] / facts["steps_per_epoch"],
        "final_loss": history["losses"][-1] if history["losses"] else None,  # None: a resumed run with no finite step logged
        "eval": {"before": eval_before, "after": eval_after, "history": history["eval_history"], "best": best, "last": last},
        "throughput": history["throughput"],
        "memory": memory,
        "checks": {**parameter_changes, "replica_digests": digests, "replicas_identical": len(set(digests)) == 1 if digests else None},
        "reload": reload,
        "data": {
            "train_samples": len(data.train),
            "eval_samples": len(data.eval),
            "truncated": data.truncated,
            "dropped": data.dropped,
            "packed_rows": len(packed_dataloader.dataset) if packed_dataloader is not None else None,
            "labels": data.labels,
            "cache": data.cache,
            "sources": data.sources or None,  # a mixture: per source, its weight, training samples, how many were drawn, eval samples
        },
        "final_dir": str(final),
        "resumed_from": {"checkpoint": str(facts["resume"]), "step": facts["start_step"]} if facts["resume"] else None,
        "checkpoints": [str(path) for path in _complete_checkpoints(cfg.output_dir)],
        "wall_s": time.perf_counter() - facts["wall_start"],
    }
    summary["artifacts"] = writer.artifacts()
    writer.write_json("summary.json", summary)
    if writer.tracker is not None:
        writer.tracker.log_memory(profiler.stages, facts["total_steps"])
        writer.tracker.close()
    print_report(summary, generations, profiler)


def _complete_checkpoints(output_dir: str) -> list[Path]:
    from finetune.checkpoint import complete_checkpoints

    return complete_checkpoints(output_dir)


def print_report(summary: dict, generations: list[dict], profiler) -> None:
    """The closing report on rank 0."""
    from finetune.evaluation import eval_line
    from finetune.model import trainable_line
    from finetune.profiler import GB

    ev = summary["eval"]
    print("\n" + "=" * 78)
    print(f"{summary['method']} fine-tune of {summary['model']} with {summary['plugin']} on {summary['world_size']} rank(s), {summary['steps']} steps")
    print(trainable_line(summary["trainable_params"], summary["all_params"]))
    best = f"{eval_line(ev['best'])} (step {ev['best']['step']})" if ev["best"] else "none: no eval was finite"
    print(f"eval before: {eval_line(ev['before'])}\neval after:  {eval_line(ev['after'])}\neval best:   {best}")
    print(f"throughput: {summary['throughput']['tokens_per_s']:.0f} non-pad tokens/s over all ranks")
    print("memory:")
    for stage in profiler.stages:
        print("  " + profiler.format(stage))
    estimate = summary["memory"]["estimate"]
    if estimate.get("ratio_measured_to_predicted"):
        print(f"  predicted train_step_peak: {estimate['predicted_train_step_peak_bytes'] / GB:.2f}GB (measured/predicted {estimate['ratio_measured_to_predicted']:.2f})")
    for g in generations:
        print(f"\nprompt:    {g['prompt']}\nreference: {g['reference']}\nbefore:    {g['before']}\nafter:     {g['after']}")
    reload = summary["reload"]
    size = sum(v for k, v in summary["artifacts"].items() if k.startswith("final/"))
    print(f"\nsaved: {summary['final_dir']} ({size / 1e6:.1f} MB)")
    verdict = "ok" if reload["ok"] else "MISMATCH"
    print(f"reloaded with {reload['loader']}: probe loss {reload['probe_loss']:.6f} vs trained {reload['trained_probe_loss']:.6f} ({verdict})")
    print(f"outputs: {Path(summary['final_dir']).parent}/ (summary.json, metrics.jsonl, loss.png, generations.json, config.yaml)")
    print(f"wall time: {summary['wall_s']:.0f} s")
