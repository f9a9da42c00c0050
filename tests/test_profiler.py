"""Memory profiler: stages, per-step peaks and the report line, on the CPU accelerator."""

from __future__ import annotations

import json

import pytest
import torch

from finetune import fixes
from finetune.profiler import GB, MemoryProfiler
from tests.conftest import run_fresh_python


def make_profiler() -> MemoryProfiler:
    fixes.apply()
    return MemoryProfiler()


@pytest.mark.e2e
def test_stages_and_step_peaks_see_real_allocations():
    out = run_fresh_python(
        "import json, torch\n"
        "from finetune import fixes\n"
        "fixes.apply()\n"
        "from finetune.profiler import MemoryProfiler\n"
        "p = MemoryProfiler()\n"
        "start = p.record('start')\n"
        "block = torch.ones(128 * 2**20 // 4); block += 1\n"
        "loaded = p.record('model_loaded')\n"
        "spike = torch.ones(256 * 2**20 // 4); spike += 1; del spike\n"
        "step = p.record_step(1)\n"
        "calm = p.record_step(2)\n"
        "top = p.record_train_peak()\n"
        "print(json.dumps([p.device] + [[s.name, s.current_bytes, s.peak_bytes] for s in (start, loaded, step, calm, top)]))\n"
    )
    device, start, loaded, step, calm, top = json.loads(out)
    assert device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert loaded[1] - start[1] > 100 * 2**20  # the 128 MiB block
    assert loaded[2] >= loaded[1]
    assert step[2] - step[1] > 200 * 2**20  # the spike is gone, but the step's peak saw it
    assert calm[2] - calm[1] < 100 * 2**20  # the peak window was reset after step 1
    assert top[0] == "train_step_peak" and top[2] == step[2]


def test_report_line_and_summary():
    profiler = make_profiler()
    stage = profiler.record("boosted")
    line = profiler.format(stage)
    assert line.startswith("boosted: memory usage: ") and "GB/" in line and ", max: " in line
    assert f"{stage.current_bytes / GB:.2f}GB" in line
    summary = profiler.summary()
    assert summary["device"] == profiler.device
    assert summary["stages"] == [{"name": "boosted", "current_bytes": stage.current_bytes, "peak_bytes": stage.peak_bytes}]


# A torch.cuda.memory_stats() dict in torch 2.5's key layout (the keys the profiler reads, plus one it
# ignores); values chosen to print round GiB. The live path runs where a GPU is present.
RECORDED_CUDA_STATS = {
    "allocated_bytes.all.current": 2_004_418_560,
    "allocated_bytes.all.peak": 5_368_709_120,
    "reserved_bytes.all.current": 6_442_450_944,
    "reserved_bytes.all.peak": 7_516_192_768,
    "num_alloc_retries": 3,
    "num_ooms": 1,
    "num_device_alloc": 211,
}


def test_cuda_report_line_and_summary_from_recorded_memory_stats():
    from finetune.profiler import MemoryStage, cuda_memory_fields, format_stage, stage_dict

    fields = cuda_memory_fields(RECORDED_CUDA_STATS, host_rss_bytes=3 * GB)
    stage = MemoryStage("train_step_peak", RECORDED_CUDA_STATS["allocated_bytes.all.current"], RECORDED_CUDA_STATS["allocated_bytes.all.peak"], **fields)
    line = format_stage(stage, "cuda", 80 * GB)
    assert line == (
        "train_step_peak: memory usage: 1.87GB/80.00GB, max: 5.00GB (cuda allocated); "
        "reserved 6.00GB, max: 7.00GB; alloc retries 3, OOMs 1; host RSS 3.00GB"
    )
    assert stage_dict(stage) == {
        "name": "train_step_peak",
        "current_bytes": 2_004_418_560,
        "peak_bytes": 5_368_709_120,
        "reserved_bytes": 6_442_450_944,
        "peak_reserved_bytes": 7_516_192_768,
        "num_alloc_retries": 3,
        "num_ooms": 1,
        "host_rss_bytes": 3 * GB,
    }
    cpu = MemoryStage("boosted", 2 * GB, 3 * GB)  # the CPU report keeps its fields and line
    assert stage_dict(cpu) == {"name": "boosted", "current_bytes": 2 * GB, "peak_bytes": 3 * GB}
    assert format_stage(cpu, "cpu", 16 * GB) == "boosted: memory usage: 2.00GB/16.00GB, max: 3.00GB (cpu process RSS)"
