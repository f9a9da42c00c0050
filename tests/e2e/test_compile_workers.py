"""Importing ColossalAI through finetune starts no torch inductor compile workers (issue 15, item 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from finetune.fixes.torch import COMPILE_THREADS
from tests.conftest import REPO, run_env

pytestmark = pytest.mark.e2e

CHILDREN_AFTER_IMPORT = (
    "import json, psutil\n"
    "{first}"
    "import colossalai.booster, colossalai.quantization.fp8\n"  # fp8 applies torch.compile at import
    "print(json.dumps([p.name() for p in psutil.Process().children(recursive=True)]))\n"
)


def children_after_colossalai(first: str) -> list[str]:
    # This process has imported finetune.fixes, which set the variable: the child must start without it.
    env = {k: v for k, v in run_env().items() if k != COMPILE_THREADS}
    result = subprocess.run([sys.executable, "-c", CHILDREN_AFTER_IMPORT.format(first=first)], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.timeout(300)
def test_no_compile_workers_after_importing_colossalai_through_finetune():
    from torch.utils._triton import has_triton_package

    if not has_triton_package():
        pytest.skip("without triton, torch starts no compile pool: nothing to stop")
    assert children_after_colossalai("") != []  # stock torch + ColossalAI: the worker pool is there
    assert children_after_colossalai("import finetune.fixes\n") == []
    assert os.environ[COMPILE_THREADS] == "1"  # and the ranks a launcher starts inherit the switch
