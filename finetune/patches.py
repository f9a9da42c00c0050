"""Fixes for bugs in the pinned stack that bite on every device (CPU repairs live in finetune/compat.py).

- HybridParallelModule.sync_shared_params all-reduces the gradient of every parameter shared across
  pipeline stages (GPT-2's tied embedding and LM head), even when it has none: during a forward-only
  pipeline pass (evaluation) and when the shared weight is frozen (LoRA), the gradient is None and
  torch.distributed raises TypeError. A None gradient is None on every stage alike, so skipping it is
  safe; the barrier that follows stays, so ranks stay in step.
- The hybrid-parallel optimizers compute the gradient norm for clipping by asking
  `is_distributed_tensor` whether a parameter is split over the tensor-parallel group; that says no
  for the "customized" split of GPT-2's fused q/k/v weights (and LoRA's split B on them), whose norm
  is then divided by tp_size as if it were replicated: clipping scales GPT-2's gradients wrongly under
  tensor parallelism. The optimizers' module now asks whether a tensor is split either way.
- torch 2.5.1's `new_group` gives a group created without a timeout (ColossalAI's ProcessGroupMesh makes
  its TP/PP/DP/SP groups so) torch's default, 30 minutes for gloo and 10 for NCCL, whatever the world
  group got: `launch.timeout_s` is made that default, so a rank stalled in a sub-group's collective
  fails the others in time too.
- peft 0.13.2 reads `MatmulLtState.memory_efficient_backward` when it puts LoRA on a bitsandbytes
  8-bit layer; bitsandbytes 0.45 removed that attribute (it was always False by then), so peft raises
  AttributeError. Fixed in peft 0.14; here the class attribute is given back with its old value.
"""

from __future__ import annotations

from datetime import timedelta

from finetune.errors import FinetuneError

SUPPORTED_COLOSSALAI = "0.5.0"


class PatchError(FinetuneError):
    """ColossalAI is not the version these fixes were written for."""


def _sync_shared_params(self) -> None:
    import torch.distributed as dist

    for shared_param, group in zip(self.shared_params, self.shared_param_process_groups):
        if self.stage_manager.stage in shared_param:
            param = shared_param[self.stage_manager.stage]
            if param.grad is not None:
                dist.all_reduce(param.grad, group=group)
        dist.barrier()


def _split_over_tensor_parallel(tensor) -> bool:
    from colossalai.tensor.d_tensor.api import is_customized_distributed_tensor, is_distributed_tensor

    return is_distributed_tensor(tensor) or is_customized_distributed_tensor(tensor)


_applied: list[str] = []


def apply(colossalai_version: str | None = None) -> list[str]:
    """Apply the fixes (once per process); return what was fixed."""
    import colossalai
    from colossalai.booster.plugin import hybrid_parallel_plugin
    from colossalai.booster.plugin.hybrid_parallel_plugin import HybridParallelModule

    version = colossalai_version or colossalai.__version__
    if version != SUPPORTED_COLOSSALAI:
        raise PatchError(f"finetune.patches fixes ColossalAI {SUPPORTED_COLOSSALAI}, found {version}: install the pinned stack")
    if not _applied:
        HybridParallelModule.sync_shared_params = _sync_shared_params
        _applied.append("HybridParallelModule.sync_shared_params")
        hybrid_parallel_plugin.is_distributed_tensor = _split_over_tensor_parallel
        _applied.append("hybrid_parallel_plugin.is_distributed_tensor (gradient norm of fused q/k/v splits)")
    return list(_applied)


SUPPORTED_TORCH = "2.5.1"


def set_group_timeout(timeout: timedelta, torch_version: str | None = None) -> None:
    """Make `timeout` the default of every process group created from now on (torch 2.5.1's _get_default_timeout reads these)."""
    import torch
    from torch.distributed import distributed_c10d

    version = (torch_version or torch.__version__).split("+")[0]
    if version != SUPPORTED_TORCH or not hasattr(distributed_c10d, "_get_default_timeout"):
        raise PatchError(f"finetune.patches sets sub-group timeouts for torch {SUPPORTED_TORCH}, found {version}: install the pinned stack")
    distributed_c10d.default_pg_timeout = timeout
    if distributed_c10d.default_pg_nccl_timeout is not None:  # None: torch built without NCCL
        distributed_c10d.default_pg_nccl_timeout = timeout


SUPPORTED_PEFT = "0.13.2"


def apply_quantization_fixes(peft_version: str | None = None) -> list[str]:
    """Give bitsandbytes' MatmulLtState the attribute peft 0.13.2 reads (a no-op on other versions)."""
    import peft
    from bitsandbytes.autograd._functions import MatmulLtState

    version = peft_version or peft.__version__
    if version != SUPPORTED_PEFT or hasattr(MatmulLtState, "memory_efficient_backward"):
        return []
    MatmulLtState.memory_efficient_backward = False
    return ["bitsandbytes MatmulLtState.memory_efficient_backward"]
