"""Memory profiler in a fresh interpreter: stages and per-step peaks see real allocations."""

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
