"""Fixes for torch 2.5.1.

- Inductor's compile-worker pool, started at import by ColossalAI's fp8 module (`stop_compile_workers`,
  applied when this module is imported: import `finetune.fixes` before the first `import colossalai`).
- torch 2.5.1's `new_group` gives a group created without a timeout (ColossalAI's ProcessGroupMesh makes
  its TP/PP/DP/SP groups so) torch's default, 30 minutes for gloo and 10 for NCCL, whatever the world
  group got: `launch.timeout_s` is made that default (`set_group_timeout`, called by distributed.launch
  with the run's value), so a rank stalled in a sub-group's collective fails the others in time too.
- gloo lacks two collectives ColossalAI's sequence parallelism calls (shardformer/layer/_operation.py): the
  list `all_to_all` (`_all_to_all`: all_to_all mode at batch size > 1), run on gloo as one
  `all_to_all_single`, and `reduce_scatter` (the split_gather and ring modes' linear layers), run on
  gloo as an `all_reduce` of which each rank keeps its part (`apply`, from finetune.fixes.apply).
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



class _DoneWork:
    """The handle of a collective already finished (an async call done synchronously): wait() returns at once."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _all_to_all_by_single(input_tensor_list, output_tensor_list, group):
    """The list all_to_all as one all_to_all_single over the flattened tensors."""
    import torch.distributed as dist

    sent = torch.cat([t.reshape(-1) for t in input_tensor_list])
    received = sent.new_empty(sum(t.numel() for t in output_tensor_list))
    dist.all_to_all_single(received, sent, [t.numel() for t in output_tensor_list], [t.numel() for t in input_tensor_list], group=group)
    for out, part in zip(output_tensor_list, received.split([t.numel() for t in output_tensor_list])):
        out.copy_(part.view_as(out))


def _on_gloo(original, by_gloo):
    """`original` (a torch.distributed collective), run by `by_gloo` on gloo groups; async calls there finish before returning."""
    import torch.distributed as dist

    def collective(output, inputs, *args, group=None, async_op=False, **kwargs):
        if dist.get_backend(group) != "gloo":
            return original(output, inputs, *args, group=group, async_op=async_op, **kwargs)
        by_gloo(output, inputs, *args, group=group, **kwargs)
        return _DoneWork() if async_op else None

    collective.__wrapped__ = original
    collective.gloo_repair = True
    return collective


def _reduce_scatter_by_all_reduce(output, input_list, op=None, group=None):
    """reduce_scatter as an all_reduce of every rank's list, of which this rank keeps its entry."""
    import torch.distributed as dist

    summed = torch.stack(input_list)
    dist.all_reduce(summed, op=op if op is not None else dist.ReduceOp.SUM, group=group)
    output.copy_(summed[dist.get_rank(group)])


def apply(torch_version: str | None = None) -> list[str]:
    """Give gloo the collectives ColossalAI's sequence parallelism calls (once per process); return what was fixed."""
    import torch.distributed as dist

    GUARD.require("finetune.fixes.torch repairs", torch_version)
    repairs = {
        "all_to_all": lambda output, inputs, group=None: _all_to_all_by_single(inputs, output, group),
        "reduce_scatter": _reduce_scatter_by_all_reduce,
    }
    for name, by_gloo in repairs.items():
        if not getattr(getattr(dist, name), "gloo_repair", False):  # torch's own wrapper has a __wrapped__ too
            setattr(dist, name, _on_gloo(getattr(dist, name), by_gloo))
    return [f"torch.distributed.{name} (gloo)" for name in repairs]
