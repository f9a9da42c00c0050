"""Memory profiler in a fresh interpreter: stages and per-step peaks see real allocations; the CPU allocator's
phases (train.cpu_allocator) on glibc's real heap."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_fresh_python


@pytest.mark.e2e
def test_stages_and_step_peaks_see_real_allocations():
    out = run_fresh_python(
        "import json, torch\n"
        "from finetune import fixes\n"
        "fixes.apply()\n"
        "from finetune.profiler import MemoryProfiler\n"
        "p = MemoryProfiler('exact')\n"
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


@pytest.mark.e2e
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU allocator's phases (on CUDA launch leaves glibc alone)")
@pytest.mark.parametrize("allocator", ["fast", "exact"])
def test_fast_steps_reuse_heap_blocks_that_the_build_maps_and_returns(allocator):
    """Issue 24: while the model is built, a block of 256 KiB or more gets its own mapping (returned when
    freed); once it is boosted, under fast a step's 1 MiB activations come from the heap instead of a fresh
    mmap/munmap each (~40% of a LoRA step), blocks above 4 MiB (the logits) are still mapped; exact keeps
    256 KiB for the whole run."""
    out = run_fresh_python(
        "import ctypes, json, tempfile, torch\n"
        "from finetune import distributed\n"
        "class Info(ctypes.Structure):\n"
        "    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]\n"
        "libc = ctypes.CDLL(None); libc.mallinfo2.restype = Info\n"
        "def mapped(nbytes):\n"
        "    before = libc.mallinfo2().hblks\n"
        "    block = torch.empty(nbytes // 4)\n"
        "    return libc.mallinfo2().hblks > before\n"
        "sizes = [512 * 2**10, 2**20, 16 * 2**20]\n"
        "device = distributed.launch(tempfile.mkdtemp(), False, 60, 0)\n"
        "build = [mapped(n) for n in sizes]\n"
        f"distributed.allocate_for_steps(device, {allocator!r}, quantized_base=False)\n"
        "steps = [mapped(n) for n in sizes]\n"
        "print(json.dumps([build, steps]))\n"
    )
    build, steps = json.loads(out)
    assert build == [True, True, True]
    assert steps == ([False, False, True] if allocator == "fast" else [True, True, True])
