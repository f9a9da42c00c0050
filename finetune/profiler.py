"""Memory profiler that asks ColossalAI's accelerator where the run lives and what it uses.

On CUDA it reports allocated / peak-allocated memory from torch.cuda; on CPU the accelerator (with the
repairs in finetune.compat) reports the process's resident set and its high-water mark. Stages are
named points of the run (start, model_loaded, boosted, train_step_peak, after_training); each stage's
peak is the highest use since the previous stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import psutil
import torch

GB = 1024**3


@dataclass
class MemoryStage:
    name: str
    current_bytes: int
    peak_bytes: int


class MemoryProfiler:
    """Records memory at named stages of a run, on whatever device ColossalAI runs on."""

    def __init__(self) -> None:
        from colossalai.accelerator import get_accelerator

        self.accelerator = get_accelerator()
        self.device = self.accelerator.name  # "cuda" or "cpu"
        if self.device == "cuda":
            self.capacity_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        else:
            self.capacity_bytes = psutil.virtual_memory().total
        self.stages: list[MemoryStage] = []
        self._step_peaks: list[MemoryStage] = []

    def measure(self) -> tuple[int, int]:
        """(current, peak since the last reset) in bytes."""
        return self.accelerator.memory_allocated(), self.accelerator.max_memory_allocated()

    def reset_peak(self) -> None:
        """Start a new peak window."""
        self.accelerator.reset_peak_memory_stats()

    def record(self, name: str) -> MemoryStage:
        """Record a named stage (its peak covers everything since the previous reset) and reset the peak."""
        current, peak = self.measure()
        stage = MemoryStage(name, current, max(peak, current))
        self.stages.append(stage)
        self.reset_peak()
        return stage

    def record_step(self, step: int) -> MemoryStage:
        """Record one training step's peak (kept out of the stage list; its maximum becomes a stage)."""
        current, peak = self.measure()
        stage = MemoryStage(f"step_{step}", current, max(peak, current))
        self._step_peaks.append(stage)
        self.reset_peak()
        return stage

    def record_train_peak(self) -> MemoryStage | None:
        """Add the highest per-step peak as the stage 'train_step_peak'."""
        if not self._step_peaks:
            return None
        top = max(self._step_peaks, key=lambda s: s.peak_bytes)
        stage = MemoryStage("train_step_peak", top.current_bytes, top.peak_bytes)
        self.stages.append(stage)
        return stage

    def format(self, stage: MemoryStage) -> str:
        """One line a person reads at a glance: 'boosted: memory usage: 0.94GB/23.40GB, max: 1.20GB'."""
        what = "allocated" if self.device == "cuda" else "process RSS"
        return (
            f"{stage.name}: memory usage: {stage.current_bytes / GB:.2f}GB/{self.capacity_bytes / GB:.2f}GB, "
            f"max: {stage.peak_bytes / GB:.2f}GB ({self.device} {what})"
        )

    def summary(self) -> dict:
        """The memory section of summary.json."""
        return {
            "device": self.device,
            "measure": "torch.cuda allocated" if self.device == "cuda" else "process RSS / VmHWM",
            "capacity_bytes": self.capacity_bytes,
            "stages": [asdict(s) for s in self.stages],
        }
