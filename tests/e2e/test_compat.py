"""ColossalAI 0.5.0's CPU accelerator in fresh interpreters: the gaps the repairs fill are real, and memory is process RSS."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import run_fresh_python
from tests.unit.test_compat import pytestmark  # noqa: F401 (the same skip: repairs are a no-op on CUDA)


@pytest.mark.e2e
def test_the_gaps_are_real_in_stock_colossalai():
    # A fresh process: apply() patches the class for the rest of this one.
    probe = "from colossalai.accelerator.cpu_accelerator import CpuAccelerator as A; a = A()\n"
    for call in ("a.synchronize()", "a.memory_allocated()", "a.manual_seed(1)", "a.get_rng_state()"):
        result = subprocess.run([sys.executable, "-c", probe + call], capture_output=True, text=True, timeout=120)
        assert result.returncode != 0, f"{call} works in stock ColossalAI: its repair is unneeded"


@pytest.mark.e2e
def test_memory_is_process_rss_in_bytes():
    out = run_fresh_python(
        "import torch\n"
        "from finetune import fixes\n"
        "fixes.apply()\n"
        "from colossalai.accelerator.cpu_accelerator import CpuAccelerator\n"
        "acc = CpuAccelerator()\n"
        "acc.reset_peak_memory_stats()\n"
        "before = acc.memory_allocated()\n"
        "block = torch.ones(64 * 2**20 // 4)\n"
        "block += 1\n"
        "during, peak, reserved = acc.memory_allocated(), acc.max_memory_allocated(), acc.max_memory_reserved()\n"
        "del block\n"
        "acc.reset_max_memory_allocated()\n"
        "print(before, during, peak, reserved, acc.max_memory_allocated())\n"
    )
    before, during, peak, reserved, after_reset = map(int, out.split())
    assert during >= before + 48 * 2**20  # the 64 MiB block shows up in RSS
    assert peak >= during - 4 * 2**20
    assert reserved == pytest.approx(peak, rel=0.05)  # bytes, not KiB
    assert after_reset < peak  # the high-water mark was reset
