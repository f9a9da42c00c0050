"""Memory profiler that asks ColossalAI's accelerator where the run lives and what it uses.

On CUDA it reports allocated / peak-allocated memory from torch.cuda and, beside them, what a GPU user
needs to read an out-of-memory (torch.cuda.memory_stats): reserved memory and its peak (fragmentation
shows only there), the allocator's retries and OOM count, and the process's host RSS (CPU offload lives
in host memory). On CPU the accelerator (with the repairs in finetune.fixes.colossalai) reports the process's
resident set and its high-water mark, and nothing else, under the glibc allocator train.cpu_allocator set
(finetune.distributed.allocate_for_steps: under `fast` the steps' heap keeps freed memory resident, so RSS is
above the live tensors; `exact` returns it). Stages are
named points of the run (start, model_loaded, boosted, train_step_peak, after_training); each stage's
peak is the highest use since the previous stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import psutil
import torch

GB = 1024**3


@dataclass
class MemoryStage:
    name: str
    current_bytes: int
    peak_bytes: int
    # CUDA only (None on CPU, and left out of summary.json there):
    reserved_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    num_alloc_retries: int | None = None
    num_ooms: int | None = None
    host_rss_bytes: int | None = None


def cuda_memory_fields(stats: dict, host_rss_bytes: int) -> dict:
    """MemoryStage's CUDA fields from a torch.cuda.memory_stats() dict and the process's RSS."""
    return {
        "reserved_bytes": stats.get("reserved_bytes.all.current", 0),
        "peak_reserved_bytes": stats.get("reserved_bytes.all.peak", 0),
        "num_alloc_retries": stats.get("num_alloc_retries", 0),
        "num_ooms": stats.get("num_ooms", 0),
        "host_rss_bytes": host_rss_bytes,
    }


def stage_dict(stage: MemoryStage) -> dict:
    """A stage as summary.json holds it: the CUDA fields only where they were measured."""
    return {key: value for key, value in asdict(stage).items() if value is not None}


def format_stage(stage: MemoryStage, device: str, capacity_bytes: int) -> str:
    """One line a person reads at a glance: 'boosted: memory usage: 0.94GB/23.40GB, max: 1.20GB (cpu process RSS)'."""
    what = "allocated" if device == "cuda" else "process RSS"
    line = (
        f"{stage.name}: memory usage: {stage.current_bytes / GB:.2f}GB/{capacity_bytes / GB:.2f}GB, "
        f"max: {stage.peak_bytes / GB:.2f}GB ({device} {what})"
    )
    if stage.reserved_bytes is None:
        return line
    return (
        f"{line}; reserved {stage.reserved_bytes / GB:.2f}GB, max: {stage.peak_reserved_bytes / GB:.2f}GB; "
        f"alloc retries {stage.num_alloc_retries}, OOMs {stage.num_ooms}; host RSS {stage.host_rss_bytes / GB:.2f}GB"
    )


def memory_heading(memory: dict) -> str:
    """The report's memory heading: on CPU, the allocator its figures were taken under (summary.json's memory)."""
    allocator = memory.get("cpu_allocator")
    return f"memory (process RSS under train.cpu_allocator={allocator}):" if allocator else "memory:"


def prediction_line(memory: dict) -> str | None:
    """The report's predicted train-step peak beside the measured one (summary.json's memory); None without a ratio."""
    estimate = memory.get("estimate", {})
    ratio = estimate.get("ratio_measured_to_predicted")
    if not ratio:
        return None
    # The estimator predicts the live tensors; under the fast allocator RSS also holds what the heap kept.
    caveat = "; heap allocator: RSS above live memory, train.cpu_allocator=exact to measure" if memory.get("cpu_allocator") == "fast" else ""
    return f"predicted train_step_peak: {estimate['predicted_train_step_peak_bytes'] / GB:.2f}GB (measured/predicted {ratio:.2f}{caveat})"


class MemoryProfiler:
    """Records memory at named stages of a run, on whatever device ColossalAI runs on."""

    def __init__(self, cpu_allocator: str) -> None:
        """cpu_allocator: train.cpu_allocator of the run (what its CPU figures are taken under)."""
        from colossalai.accelerator import get_accelerator

        self.accelerator = get_accelerator()
        self.device = self.accelerator.name  # "cuda" or "cpu"
        if self.device == "cuda":
            self.capacity_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        else:
            self.capacity_bytes = psutil.virtual_memory().total
        self.cpu_allocator = cpu_allocator
        self.stages: list[MemoryStage] = []
        self._step_peaks: list[MemoryStage] = []

    def measure(self) -> tuple[int, int]:
        """(current, peak since the last reset) in bytes."""
        return self.accelerator.memory_allocated(), self.accelerator.max_memory_allocated()

    def reset_peak(self) -> None:
        """Start a new peak window."""
        self.accelerator.reset_peak_memory_stats()

    def _stage(self, name: str) -> MemoryStage:
        current, peak = self.measure()
        extra = cuda_memory_fields(torch.cuda.memory_stats(), psutil.Process().memory_info().rss) if self.device == "cuda" else {}
        return MemoryStage(name, current, max(peak, current), **extra)

    def record(self, name: str) -> MemoryStage:
        """Record a named stage (its peak covers everything since the previous reset) and reset the peak."""
        stage = self._stage(name)
        self.stages.append(stage)
        self.reset_peak()  # torch.cuda.reset_peak_memory_stats: allocated and reserved peaks both
        return stage

    def record_step(self, step: int) -> MemoryStage:
        """Record one training step's peak (kept out of the stage list; its maximum becomes a stage)."""
        stage = self._stage(f"step_{step}")
        self._step_peaks.append(stage)
        self.reset_peak()
        return stage

    def record_train_peak(self) -> MemoryStage | None:
        """Add the highest per-step peak as the stage 'train_step_peak'."""
        if not self._step_peaks:
            return None
        top = max(self._step_peaks, key=lambda s: s.peak_bytes)
        stage = dataclasses.replace(top, name="train_step_peak")
        self.stages.append(stage)
        return stage

    def build_bytes(self) -> int:
        """What building the model took: the highest use from `start` through `boosted` (built, sharded,
        weights loaded) above `start`'s (the process before any model existed)."""
        names = [s.name for s in self.stages]
        upto = self.stages[: names.index("boosted") + 1] if "boosted" in names else self.stages
        return max(s.peak_bytes for s in upto) - self.stages[0].current_bytes

    def format(self, stage: MemoryStage) -> str:
        """The stage's report line (format_stage)."""
        return format_stage(stage, self.device, self.capacity_bytes)

    def summary(self) -> dict:
        """The memory section of summary.json (on CPU with the allocator its figures were taken under)."""
        if self.device == "cuda":
            return {"device": self.device, "measure": "torch.cuda allocated (+ reserved, allocator retries and OOMs, host RSS)", "capacity_bytes": self.capacity_bytes, "stages": [stage_dict(s) for s in self.stages]}
        kept = " (includes freed memory glibc's heap keeps for the steps)" if self.cpu_allocator == "fast" else ""
        return {
            "device": self.device,
            "measure": f"process RSS / VmHWM{kept}",
            "cpu_allocator": self.cpu_allocator,
            "capacity_bytes": self.capacity_bytes,
            "stages": [stage_dict(s) for s in self.stages],
        }
