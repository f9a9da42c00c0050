"""Memory profiler: the report line and summary, on the CPU accelerator and from recorded CUDA memory stats;
the CPU allocator the steps run under (train.cpu_allocator) and how the report names it."""

from __future__ import annotations

import pytest
import torch

from finetune import distributed, fixes
from finetune.fixes import glibc
from finetune.profiler import GB, MemoryProfiler, memory_heading, prediction_line


def make_profiler(cpu_allocator: str = "exact") -> MemoryProfiler:
    fixes.apply()
    return MemoryProfiler(cpu_allocator)


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


@pytest.mark.parametrize(
    "device, allocator, quantized, threshold, heap",
    [
        ("cpu", "fast", False, distributed.STEP_MMAP_THRESHOLD, True),  # the steps' activations from the heap
        ("cpu", "exact", False, distributed.BUILD_MMAP_THRESHOLD, False),  # launch's 256 KiB for the whole run
        ("cpu", "exact", True, distributed.BUILD_MMAP_THRESHOLD, False),  # also after a quantized base's load raised it
        ("cpu", "fast", True, None, True),  # model.load_quantized's 1 MiB wins; the heap is still trimmed
        ("cuda", "fast", False, None, False),  # no effect on CUDA
        ("cuda", "exact", False, None, False),
    ],
)
def test_the_steps_allocator_is_decided_once_the_model_is_boosted(monkeypatch, device, allocator, quantized, threshold, heap):
    """Issue 24: train.cpu_allocator=fast raises glibc's mmap threshold once the model is boosted (a step's
    activations reuse heap blocks instead of a fresh mmap each); exact sets launch's 256 KiB again (a quantized base's
    load raised it), fast under a quantized base and CUDA leave it.
    The heap the build freed is handed back in every case."""
    calls = []
    monkeypatch.setattr(glibc, "fix_mmap_threshold", lambda nbytes: calls.append(("mmap_threshold", nbytes)) or True)
    monkeypatch.setattr(glibc, "release_freed_heap", lambda: calls.append(("trim",)) or True)
    assert distributed.allocate_for_steps(torch.device(device), allocator, quantized_base=quantized) is heap
    assert calls == [("trim",)] + ([("mmap_threshold", threshold)] if threshold else [])
    assert distributed.BUILD_MMAP_THRESHOLD < distributed.STEP_MMAP_THRESHOLD <= 32 << 20  # glibc's ceiling


def test_the_cpu_report_names_its_allocator_and_marks_a_heap_peak_against_the_prediction():
    """Under fast the RSS peak includes freed memory the heap keeps: the measured/predicted ratio says so; under
    exact (and on CUDA) the line is the plain comparison. summary.json names the allocator of CPU figures."""
    fast, exact = make_profiler("fast").summary(), make_profiler("exact").summary()
    assert (fast["cpu_allocator"], exact["cpu_allocator"]) == ("fast", "exact")
    assert fast["measure"] == "process RSS / VmHWM (includes freed memory glibc's heap keeps for the steps)" and exact["measure"] == "process RSS / VmHWM"
    estimate = {"predicted_train_step_peak_bytes": 2 * GB, "ratio_measured_to_predicted": 1.2345}
    assert prediction_line({**fast, "estimate": estimate}) == "predicted train_step_peak: 2.00GB (measured/predicted 1.23; heap allocator: RSS above live memory, train.cpu_allocator=exact to measure)"
    assert prediction_line({**exact, "estimate": estimate}) == "predicted train_step_peak: 2.00GB (measured/predicted 1.23)"
    cuda = {"device": "cuda", "stages": [], "estimate": estimate}
    assert prediction_line(cuda) == "predicted train_step_peak: 2.00GB (measured/predicted 1.23)"
    assert prediction_line({**fast, "estimate": {"error": "ValueError: x"}}) is None
    assert memory_heading(fast) == "memory (process RSS under train.cpu_allocator=fast):"
    assert memory_heading(exact) == "memory (process RSS under train.cpu_allocator=exact):"
    assert memory_heading(cuda) == "memory:"


def test_the_estimate_beside_a_peak_is_asked_about_the_widest_batch_drawn():
    """summary.json's prediction is for the widest batch the rank drew (a batch is padded to its longest row; under the
    chunked loss only its label tokens reach the head), not for rows of the data's longest length: the DPO demo's pairs
    (up to 128 tokens, most far shorter) measured 0.59x a prediction for 128-token rows, 0.99x one for what it drew."""
    from finetune.data import IGNORE_INDEX
    from finetune.train import widest_batch

    def batch(width: int, scored: list[int]) -> dict:
        labels = torch.full((len(scored), width), IGNORE_INDEX)
        for row, count in enumerate(scored):
            labels[row, width - count :] = 1
        return {"input_ids": torch.zeros(len(scored), width, dtype=torch.long), "labels": labels}

    assert widest_batch([batch(16, [3, 5])], (0, 0), True) == (16, 4)  # 8 label tokens over 2 rows
    assert widest_batch([batch(8, [7, 7, 7]), batch(12, [1, 2, 2])], (16, 4), True) == (16, 7)  # each the most of any batch
    assert widest_batch([{"input_ids": torch.zeros(4, 32, dtype=torch.long), "labels": torch.tensor([0, 1, 0, 1])}], (0, 0), False) == (32, 0)  # class labels
    first_token_label = batch(6, [6])  # position 0's label predicts nothing (labels shift left by one)
    assert widest_batch([first_token_label], (0, 0), True) == (6, 5)
