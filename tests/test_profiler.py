"""Memory profiler: stages, per-step peaks and the report line, on the CPU accelerator."""

from __future__ import annotations

import torch

from finetune import compat
from finetune.profiler import GB, MemoryProfiler


def make_profiler() -> MemoryProfiler:
    compat.apply()
    return MemoryProfiler()


def test_stages_see_real_allocations():
    profiler = make_profiler()
    assert profiler.device == ("cuda" if torch.cuda.is_available() else "cpu")
    start = profiler.record("start")
    block = torch.ones(128 * 1024 * 1024 // 4)  # 128 MiB
    block += 1
    loaded = profiler.record("model_loaded")
    assert loaded.current_bytes - start.current_bytes > 100 * 2**20
    assert loaded.peak_bytes >= loaded.current_bytes
    del block


def test_peak_window_catches_a_transient_spike():
    profiler = make_profiler()
    profiler.record("start")
    spike = torch.ones(256 * 1024 * 1024 // 4)
    spike += 1
    del spike
    step = profiler.record_step(1)
    assert step.peak_bytes - step.current_bytes > 200 * 2**20  # gone now, but the peak saw it
    calm = profiler.record_step(2)
    assert calm.peak_bytes - calm.current_bytes < 100 * 2**20  # the window was reset
    top = profiler.record_train_peak()
    assert top.name == "train_step_peak" and top.peak_bytes == step.peak_bytes


def test_report_line_and_summary():
    profiler = make_profiler()
    stage = profiler.record("boosted")
    line = profiler.format(stage)
    assert line.startswith("boosted: memory usage: ") and "GB/" in line and ", max: " in line
    assert f"{stage.current_bytes / GB:.2f}GB" in line
    summary = profiler.summary()
    assert summary["device"] == profiler.device
    assert summary["stages"] == [{"name": "boosted", "current_bytes": stage.current_bytes, "peak_bytes": stage.peak_bytes}]
