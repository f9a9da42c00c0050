"""Fixes for torch 2.5.1.

- Inductor's compile-worker pool, started at import by ColossalAI's fp8 module (`stop_compile_workers`,
  applied when this module is imported: import `finetune.fixes` before the first `import colossalai`).
- torch 2.5.1's `new_group` gives a group created without a timeout (ColossalAI's ProcessGroupMesh makes
  its TP/PP/DP/SP groups so) torch's default, 30 minutes for gloo and 10 for NCCL, whatever the world
  group got: `launch.timeout_s` is made that default (`set_group_timeout`, called by distributed.launch
  with the run's value), so a rank stalled in a sub-group's collective fails the others in time too.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from finetune.fixes.guard import VersionGuard

GUARD = VersionGuard("torch", "2.5.1")
COMPILE_THREADS = "TORCHINDUCTOR_COMPILE_THREADS"


def stop_compile_workers() -> bool:
    """Keep torch inductor from starting its compile-worker pool; False where the user chose a thread count.

    ColossalAI's fp8 module decorates functions with torch.compile at import, which imports
    torch._inductor.async_compile; with triton installed that module warms a pool of compile_threads
    worker processes (about 640 MB resident each) at import. Nothing in this tool compiles. One
    compile thread makes inductor compile in-process and skip the pool (AsyncCompile.warm_pool). `import
    torch` has already read the variable into torch._inductor.config, hence the config assignment;
    the variable itself reaches child processes.
    """
    if COMPILE_THREADS in os.environ:
        return False
    os.environ[COMPILE_THREADS] = "1"
    if GUARD.matches(torch.__version__):  # the config attribute this was checked against (torch/_inductor/config.py)
        from torch._inductor import config as inductor_config

        inductor_config.compile_threads = 1
    return True


stop_compile_workers()


def set_group_timeout(timeout: timedelta, torch_version: str | None = None) -> None:
    """Make `timeout` the default of every process group created from now on (torch 2.5.1's _get_default_timeout reads these)."""
    from torch.distributed import distributed_c10d

    GUARD.require("finetune.fixes.torch sets sub-group timeouts", torch_version)
    distributed_c10d.default_pg_timeout = timeout
    if distributed_c10d.default_pg_nccl_timeout is not None:  # None: torch built without NCCL
        distributed_c10d.default_pg_nccl_timeout = timeout
