"""The output contract under output_dir, written by rank 0 only.

    config.yaml      the resolved config
    metrics.jsonl    one line per logged step: step, loss, lr, grad_norm, tokens_per_s, memory
    tensorboard/     the same records as TensorBoard scalars (logging.tensorboard=true; finetune.tracking)
    summary.json     parameters, plugin, method, world size, memory stages, throughput, eval, artifacts
    generations.json fixed held-out prompts, before and after training
    loss.png         training loss (and eval loss) over steps
    final/           a peft adapter dir (LoRA) or a Hugging Face model dir (full fine-tuning)
    logs/            every rank's output, appended per launch
    .finetune-run.json  the marker: this directory is a run of this tool, and which of its entries are the run's
    .lock            the host and pid of the run writing here (refuses a second run; removed at exit)
    .previous-run/   with overwrite_output_dir=true, the replaced run's results until this run's final/ is written

A run writes only into a directory that is absent, empty, or marked as a run of this tool; overwriting
a run moves aside only the entries its marker lists (files a user added beside them stay). The same
rule for the user-named outputs of finetune.export: staged_output.

    python -m finetune.outputs restore OUT_DIR   # put a set-aside run back (an unfinished overwrite's files go)
    python -m finetune.outputs adopt OUT_DIR     # mark a run written before runs were marked
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import yaml

from finetune.errors import FinetuneError
from finetune.tracking import TENSORBOARD_DIR, Tracker

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
    path = Path(output_dir) / LOGS / f"rank_{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.open("a", buffering=1)
    log.write(f"===== launch {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()} pid {os.getpid()}: {' '.join(sys.argv)}\n")
    sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
    return path


# --- the run's records, written by rank 0 --------------------------------------------------------


class OutputDirInUse(FinetuneError):
    """Another live run writes into this output_dir."""


class OutputRefused(FinetuneError):
    """Writing there would replace what is not this tool's, or a run set aside to restore."""


LOCK = ".lock"
PREVIOUS = ".previous-run"
RUN_MARKER = ".finetune-run.json"
MARKER_STAGING = f"{RUN_MARKER}.partial"  # _mark writes here, then renames: rank 0 may be between the two
TOOL = "colossal-finetune"
LOGS = "logs"  # appended by every launch (a failed overwrite's log included): never set aside
RANK_LOG = re.compile(r"rank_\d+\.log")  # tee_rank_output's files in logs/
# What a run writes at the top of output_dir besides logs/ and its dot-files: what an overwrite sets aside.
RESULTS = ("final", "final.partial", "checkpoints", "summary.json", "generations.json", "metrics.jsonl", "loss.png", "config.yaml", TENSORBOARD_DIR, "wandb")
RUN_ENTRIES = (*RESULTS, LOGS)  # what the marker lists as the run's: anything else in output_dir is the user's
FINISHED = ("summary.json", "checkpoints", "final")  # a run with any of these is replaced only when asked


def run_entries(out: Path) -> list[str] | None:
    """The entries of output_dir its marker lists as the run's; None without a (readable) marker: not a run of this tool."""
    try:
        marker = json.loads((out / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("tool") != TOOL or not isinstance(marker.get("entries"), list):
        return None
    return [name for name in marker["entries"] if name in RUN_ENTRIES]  # never a name this tool does not write


def output_problems(cfg: Config, writer: bool = True) -> list[str]:
    """output_dir must be writable, absent, empty or a run of this tool, and not hold another run unless resuming or told to overwrite.

    Checked at launch (train.py, finetune.launch), not by validate(): a finished run's own config.yaml
    must stay loadable. writer: whether this process is rank 0 (occupancy_problem).
    """
    out = Path(cfg.output_dir)
    existing = next((p for p in [out, *out.parents] if p.exists()), Path("/"))
    if existing == out and not out.is_dir():
        return [f"output_dir: {out} is a file, not a directory; choose another output_dir"]
    if not existing.is_dir():
        return [f"output_dir: {existing} is a file, so {out} cannot be created; choose another output_dir"]
    # The run writes into these later (a checkpoint after many steps): refuse now, not at the first save.
    for path in (existing, *(out / name for name in ("checkpoints", "logs", "final"))):
        if path.is_dir() and not os.access(path, os.W_OK):
            return [f"output_dir: {path} is not writable; fix its permissions or choose another output_dir"]
    if cfg.resume_from and cfg.overwrite_output_dir:
        return ["resume_from and overwrite_output_dir=true contradict each other; drop one"]
    if cfg.resume_from and cfg.resume_from != "latest" and not Path(cfg.resume_from).is_dir():
        return [f"resume_from: no such checkpoint directory: {cfg.resume_from}"]
    problem = occupancy_problem(cfg, writer)  # absent, empty, or a run of this tool (its marker), replaced only when asked
    return [problem] if problem else []


def occupancy_problem(cfg: Config, writer: bool = True) -> str | None:
    """Why this run may not write into output_dir: neither absent, empty nor a run of this tool; a run there that
    would be replaced unasked; or the run an unfinished overwrite set aside, which only a resume of that overwrite may follow.

    Args:
        writer: whether this process writes output_dir (rank 0). The other ranks may check after rank 0 has set
            the old run aside: they leave the set-aside run to rank 0, which checks it before and under its lock.
    """
    out = Path(cfg.output_dir)
    if not out.is_dir():
        return None
    entries = run_entries(out)
    if entries is None:
        # The lock is the lock's to judge; the marker's staging is rank 0 marking this very run (the other ranks check meanwhile).
        found = sorted(p.name for p in out.iterdir() if p.name not in (LOCK, MARKER_STAGING) and not _launch_logs(p))
        if not found:
            return None
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        return (f"output_dir: {out} is neither empty nor a run of this tool (it holds {shown}, and no {RUN_MARKER}); choose a new or empty directory "
                f"(overwrite_output_dir replaces only runs of this tool; a run written before runs were marked: python -m finetune.outputs adopt {out})")
    if writer and (out / PREVIOUS).exists() and not cfg.resume_from:
        return (f"output_dir: {out / PREVIOUS} holds the run an unfinished overwrite set aside; put it back with python -m finetune.outputs restore {out} "
                f"(the unfinished run's results go) or discard it with rm -rf {out / PREVIOUS}, then run again")
    finished = [name for name in FINISHED if name in entries and (out / name).exists()]
    if finished and not cfg.resume_from and not cfg.overwrite_output_dir:
        return f"output_dir: {out} holds another run ({', '.join(finished)}); use resume_from=latest to continue it, overwrite_output_dir=true to replace it, or another output_dir"
    return None


def _launch_logs(path: Path) -> bool:
    """Whether path is logs/ holding only rank_N.log files: the other ranks of this launch may start theirs
    (tee_rank_output) before rank 0 has checked output_dir. Appended to, never replaced."""
    return path.name == LOGS and path.is_dir() and all(RANK_LOG.fullmatch(p.name) and p.is_file() for p in path.iterdir())


@contextlib.contextmanager
def own_output_dir(cfg: Config) -> Iterator[None]:
    """Rank 0, before anything is written: lock output_dir, mark it as a run; with overwrite_output_dir=true set the old run aside.

    The old run's results come back if this run fails before its final/ is written (drop_previous); a
    preempted run keeps them aside, for its resume to finish the overwrite. The lock goes at exit, errors
    included; a SIGKILLed run leaves it, and the next run takes it over.
    """
    from finetune.preemption import Preempted

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _take_lock(out / LOCK)
    set_aside = False
    try:
        # Again under the lock: another run may have finished here since output_problems.
        problem = occupancy_problem(cfg)
        if problem:
            raise OutputRefused(problem)
        if cfg.overwrite_output_dir:
            set_aside = _set_previous_aside(out)
        elif (out / PREVIOUS).exists():  # a resume of the overwrite that set it aside
            print(f"this run resumes an overwrite: the replaced run's results in {out / PREVIOUS} go once this run's final/ is written", flush=True)
        _mark(out)
        yield
    except Preempted:
        raise
    except BaseException:
        if set_aside and (out / PREVIOUS).is_dir():
            _restore_previous(out)
            print(f"this run failed: the previous run's results are back in {out}", flush=True)
        raise
    finally:
        (out / LOCK).unlink(missing_ok=True)


def _mark(out: Path) -> None:
    """Write the marker (atomically): output_dir is a run of this tool, and RUN_ENTRIES are the run's."""
    staging = out / MARKER_STAGING
    staging.write_text(json.dumps({"tool": TOOL, "entries": list(RUN_ENTRIES)}) + "\n")
    staging.replace(out / RUN_MARKER)


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
    """Move what the marker lists of the run being replaced (less logs/) into .previous-run/; whether there was any.

    Only a marked run gets here (occupancy_problem), and never with a .previous-run/ already there.
    """
    found = [out / name for name in run_entries(out) or [] if name != LOGS and os.path.lexists(out / name)]
    if not found:
        return False
    previous = out / PREVIOUS
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
    """Put the replaced run's results back, in place of the replacing run's."""
    _remove_results(out)
    for path in (out / PREVIOUS).iterdir():
        path.rename(out / path.name)
    (out / PREVIOUS).rmdir()


def drop_previous(output_dir: str) -> None:
    """Rank 0, once final/ is written: the replaced run's results go for good."""
    shutil.rmtree(Path(output_dir) / PREVIOUS, ignore_errors=True)


def restore(output_dir: str) -> None:
    """Put back the run an unfinished overwrite set aside in .previous-run/ (the unfinished run's results go), under the lock."""
    out = Path(output_dir)
    if run_entries(out) is None:  # restoring deletes what lies at the run's names: only in a run of this tool
        raise OutputRefused(f"{out}: not a run of this tool (no {RUN_MARKER}); a run written before runs were marked: python -m finetune.outputs adopt {out} first")
    if not (out / PREVIOUS).is_dir():
        raise OutputRefused(f"{out}: holds no {PREVIOUS}/ to restore")
    _take_lock(out / LOCK)
    try:
        _restore_previous(out)
    finally:
        (out / LOCK).unlink(missing_ok=True)
    print(f"the run set aside is back in {out}")


def adopt(output_dir: str) -> None:
    """Mark a run written before runs were marked: its entries named in RUN_ENTRIES become the run's (an overwrite replaces them)."""
    out = Path(output_dir)
    if not out.is_dir():
        raise OutputRefused(f"{out}: no such directory")
    if run_entries(out) is None:
        _mark(out)
    print(f"{out} is a run of this tool: an overwrite sets aside its {', '.join(name for name in RUN_ENTRIES if name != LOGS)} (those of them there), nothing else")


@contextlib.contextmanager
def staged_output(out: Path, directory: bool) -> Iterator[Path]:
    """A user-named output (an export's) written whole or not at all, and never over anything; checked before any heavy work.

    Yields the staging path OUT.partial, created here (a user's file of that name is never replaced): renamed
    to `out` when the block succeeds, removed when it fails.

    Raises:
        OutputRefused: out exists (a directory may be empty), or OUT.partial does.
    """
    what = "an empty directory" if directory else "a new file"

    def taken() -> bool:  # anything there but an empty directory (for a directory output)
        return os.path.lexists(out) and not (directory and out.is_dir() and not any(out.iterdir()))

    if taken():
        raise OutputRefused(f"{out}: exists; choose {what} to export to")
    staging = out.with_name(out.name + ".partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a parent that is a file, or not writable
        raise OutputRefused(f"{out}: cannot be created ({err.strerror}: {err.filename}); choose another output path") from None
    try:
        staging.mkdir() if directory else staging.touch(exist_ok=False)
    except FileExistsError:
        raise OutputRefused(f"{staging}: exists (a killed export leaves one; delete it if it is) and is never replaced; choose another output name") from None
    try:
        yield staging
        if taken():  # made while the export ran
            raise OutputRefused(f"{out}: appeared while the export ran and is never replaced; choose {what} to export to")
        staging.replace(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True) if staging.is_dir() else staging.unlink(missing_ok=True)
        raise


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


def step_metrics(step: int, epoch: int, loss: float, lr: float, tokens: int, elapsed: float, memory, grad_norm: float | None = None, pairs: dict | None = None) -> dict:
    """A metrics.jsonl line of a training step (a step skipped for a non-finite loss says so).

    grad_norm: the global gradient norm clipping saw (before clipping); None without clipping (train.max_grad_norm=0).
    pairs: preference runs: the step's pair metrics (finetune.preference.pair_means; its loss is `loss`).
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
        **{k: v for k, v in (pairs or {}).items() if k != "loss"},
    }


def eval_metrics(step: int, result: dict) -> dict:
    """A metrics.jsonl line of an eval result."""
    return {"step": step, **{f"eval_{k}": v for k, v in result.items() if k not in ("tokens", "samples", "pairs")}}


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
    memory["estimate"] = compare_with_run(cfg, dist.get_world_size(), facts["seq_len"], memory, facts.get("label_len", 0))
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
    from finetune.profiler import memory_heading, prediction_line

    ev = summary["eval"]
    print("\n" + "=" * 78)
    print(f"{summary['method']} fine-tune of {summary['model']} with {summary['plugin']} on {summary['world_size']} rank(s), {summary['steps']} steps")
    print(trainable_line(summary["trainable_params"], summary["all_params"]))
    best = f"{eval_line(ev['best'])} (step {ev['best']['step']})" if ev["best"] else "none: no eval was finite"
    print(f"eval before: {eval_line(ev['before'])}\neval after:  {eval_line(ev['after'])}\neval best:   {best}")
    print(f"throughput: {summary['throughput']['tokens_per_s']:.0f} non-pad tokens/s over all ranks")
    print(memory_heading(summary["memory"]))
    for stage in profiler.stages:
        print("  " + profiler.format(stage))
    if predicted := prediction_line(summary["memory"]):
        print("  " + predicted)
    for g in generations:
        print(f"\nprompt:    {g['prompt']}\nreference: {g['reference']}\nbefore:    {g['before']}\nafter:     {g['after']}")
    reload = summary["reload"]
    size = sum(v for k, v in summary["artifacts"].items() if k.startswith("final/"))
    print(f"\nsaved: {summary['final_dir']} ({size / 1e6:.1f} MB)")
    verdict = "ok" if reload["ok"] else "MISMATCH"
    print(f"reloaded with {reload['loader']}: probe loss {reload['probe_loss']:.6f} vs trained {reload['trained_probe_loss']:.6f} ({verdict})")
    print(f"outputs: {Path(summary['final_dir']).parent}/ (summary.json, metrics.jsonl, loss.png, generations.json, config.yaml)")
    print(f"wall time: {summary['wall_s']:.0f} s")


def main(argv: list[str]) -> int:
    """python -m finetune.outputs restore|adopt OUT_DIR; a refusal is one error: line and exit 2."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m finetune.outputs", description="restore: put back the run an unfinished overwrite set aside in OUT_DIR/.previous-run/; "
                                     "adopt: mark OUT_DIR, a run written before runs were marked, as a run of this tool")
    parser.add_argument("action", choices=("restore", "adopt"))
    parser.add_argument("output_dir")
    args = parser.parse_args(argv)
    try:
        {"restore": restore, "adopt": adopt}[args.action](args.output_dir)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
