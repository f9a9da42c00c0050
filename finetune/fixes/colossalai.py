"""Fixes for ColossalAI 0.5.0: its CPU path (a no-op when CUDA is present) and bugs that bite on every device.

On CPU. ColossalAI's CpuAccelerator raises RuntimeError for most of its API (memory, seeds, streams,
synchronize) and gets two methods wrong (get_rng_state passes a device to torch.get_rng_state;
autocast returns the nullcontext class instead of an instance; max_memory_reserved is in KiB). Code
paths that are fine on CPU (seeding, memory reports, checkpoint loading) then fail. Each repair below
maps one method onto its CPU meaning; memory is the process's resident set (RSS), and its peak is the
kernel's high-water mark (VmHWM), which writing "5" to /proc/self/clear_refs resets.

Outside the accelerator: LowLevelZero asserts a CUDA/NPU device; the pipeline's p2p backend check reads
`Backend.HCCL`, which torch 2.5.1 lacks; shardformer's GPT-2 forward calls torch.cuda.set_device on
a CPU device; its fused-qkv gather moves tensors to CUDA; the FSDP plugin passes
torch.cuda.current_device() to FSDP. Each is repaired by the smallest wrapper that gives it the CPU.
Measured facts behind each repair: shared/notes/colossalai-cpu.md.

On every device.
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

`apply()` refuses to run on a ColossalAI version these fixes were not written for (their line-level
assumptions would be unchecked).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import psutil
import torch

from finetune.fixes.guard import VersionGuard

GUARD = VersionGuard("colossalai", "0.5.0")


def rss_bytes() -> int:
    """Resident memory of this process, in bytes."""
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """High-water mark of resident memory since start or the last reset (VmHWM), in bytes."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return rss_bytes()  # no procfs (macOS): current is the best lower bound we have


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux); elsewhere the peak keeps counting from process start."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


class _CpuStream:
    """Stands in for a CUDA stream on CPU, where every operation is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return event


def _no_op(self, *args, **kwargs) -> None:
    return None


def _manual_seed(self, seed: int) -> None:
    torch.manual_seed(seed)


# name -> replacement method of CpuAccelerator. Each entry is unit-tested in tests/unit/test_compat.py.
CPU_ACCELERATOR_REPAIRS = {
    "synchronize": _no_op,
    "empty_cache": _no_op,
    "device_count": lambda self: 1,
    "current_device": lambda self: 0,
    "manual_seed": _manual_seed,
    "manual_seed_all": _manual_seed,
    "initial_seed": lambda self: torch.initial_seed(),
    "get_rng_state": lambda self, device=None: torch.get_rng_state(),
    "get_rng_state_all": lambda self: [torch.get_rng_state()],
    "set_rng_state_all": lambda self, states: torch.set_rng_state(states[0]),
    "memory_allocated": lambda self, device=None: rss_bytes(),
    "max_memory_allocated": lambda self, device=None: peak_rss_bytes(),
    "max_memory_reserved": lambda self, device=None: peak_rss_bytes(),
    "reset_peak_memory_stats": lambda self, device=None: reset_peak_rss(),
    "reset_max_memory_allocated": lambda self, device=None: reset_peak_rss(),
    "Stream": lambda self, *args, **kwargs: _CpuStream(),
    "current_stream": lambda self, device=None: _CpuStream(),
    "default_stream": lambda self, device=None: _CpuStream(),
    "stream": lambda self, stream_: contextlib.nullcontext(),
    "autocast": lambda self, enabled=True, dtype=torch.bfloat16, cache_enabled=True: torch.autocast(
        "cpu", dtype=dtype, enabled=enabled, cache_enabled=cache_enabled
    ),
}


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    """Within the block, `tensor.cuda()` returns the tensor itself (there is no CUDA to move to)."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _without_cuda_moves(function):
    """Wrap a ColossalAI function that moves a tensor to CUDA only to run a collective on it."""

    def wrapper(*args, **kwargs):
        with _tensor_cuda_is_identity():
            return function(*args, **kwargs)

    wrapper.__wrapped__ = function
    return wrapper


def _fsdp_on_cpu(configure):
    """TorchFSDPPlugin.configure passes torch.cuda.current_device() to FSDP: give it the CPU instead."""

    def wrapper(*args, **kwargs):
        original = torch.cuda.current_device
        torch.cuda.current_device = lambda: torch.device("cpu")
        try:
            return configure(*args, **kwargs)
        finally:
            torch.cuda.current_device = original

    wrapper.__wrapped__ = configure
    return wrapper


def _zero_sanity_checks(self) -> None:
    """LowLevelZeroOptimizer._sanity_checks without its `device is required` (CUDA/NPU) assertion."""
    for group in self.optim.param_groups:
        for param in group["params"]:
            if not getattr(param, "skip_zero_check", False):
                assert param.dtype == self._dtype, f"Parameters are expected to have the same dtype `{self._dtype}`, but got `{param.dtype}`"


def _is_nccl_group(group) -> bool:
    """pipeline/p2p.py's backend check without `Backend.HCCL`, which torch 2.5.1 lacks (AttributeError)."""
    import torch.distributed.distributed_c10d as c10d

    return (group or c10d._get_default_group()).name() == "nccl"


def _set_cuda_device_unless_cpu(original):
    """torch.cuda.set_device that ignores CPU devices: shardformer's GPT-2 forward calls it per block."""

    def set_device(device) -> None:
        if isinstance(device, torch.device) and device.type == "cpu":
            return
        original(device)

    set_device.__wrapped__ = original
    return set_device


def _sync_shared_params(self) -> None:
    """HybridParallelModule.sync_shared_params that skips a shared parameter without a gradient (see the module's docstring)."""
    import torch.distributed as dist

    for shared_param, group in zip(self.shared_params, self.shared_param_process_groups):
        if self.stage_manager.stage in shared_param:
            param = shared_param[self.stage_manager.stage]
            if param.grad is not None:
                dist.all_reduce(param.grad, group=group)
        dist.barrier()


def _split_over_tensor_parallel(tensor) -> bool:
    """Whether a tensor is split over the tensor-parallel group, by ColossalAI's layout or a "customized" split (fused q/k/v)."""
    from colossalai.tensor.d_tensor.api import is_customized_distributed_tensor, is_distributed_tensor

    return is_distributed_tensor(tensor) or is_customized_distributed_tensor(tensor)


def _cpu_module_repairs() -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement) for ColossalAI code outside the accelerator that needs CUDA."""
    from colossalai.booster.plugin.torch_fsdp_plugin import TorchFSDPPlugin
    from colossalai.pipeline import p2p
    from colossalai.shardformer.layer import qkv_fused_linear
    from colossalai.zero.low_level.low_level_optim import LowLevelZeroOptimizer

    return [
        (LowLevelZeroOptimizer, "_sanity_checks", _zero_sanity_checks),
        (TorchFSDPPlugin, "configure", _fsdp_on_cpu(TorchFSDPPlugin.configure)),
        (p2p, "_check_for_nccl_hccl_backend", _is_nccl_group),
        (torch.cuda, "set_device", _set_cuda_device_unless_cpu(torch.cuda.set_device)),
        (qkv_fused_linear, "gather_fused_qkv_in_gpt2_style", _without_cuda_moves(qkv_fused_linear.gather_fused_qkv_in_gpt2_style)),
    ]


def _every_device_fixes() -> list[tuple[object, str, object, str]]:
    """(owner, attribute, replacement, what it fixes) for ColossalAI bugs on every device."""
    from colossalai.booster.plugin import hybrid_parallel_plugin

    return [
        (hybrid_parallel_plugin.HybridParallelModule, "sync_shared_params", _sync_shared_params, "HybridParallelModule.sync_shared_params"),
        (hybrid_parallel_plugin, "is_distributed_tensor", _split_over_tensor_parallel, "hybrid_parallel_plugin.is_distributed_tensor (gradient norm of fused q/k/v splits)"),
    ]


_applied: list[str] = []


def apply(colossalai_version: str | None = None) -> list[str]:
    """Fix ColossalAI's bugs on every device, and its CPU path when no CUDA device is present (once per process); return what was fixed."""
    GUARD.require("finetune.fixes.colossalai repairs", colossalai_version)
    if not _applied:  # once per process: the wrappers must not wrap themselves
        for owner, name, fix, what in _every_device_fixes():
            setattr(owner, name, fix)
            _applied.append(what)
        if not torch.cuda.is_available():
            from colossalai.accelerator.cpu_accelerator import CpuAccelerator

            for name, repair in CPU_ACCELERATOR_REPAIRS.items():
                setattr(CpuAccelerator, name, repair)
            for owner, name, repair in _cpu_module_repairs():
                setattr(owner, name, repair)
                _applied.append(f"{getattr(owner, '__name__', owner)}.{name}")
            _applied.extend(f"CpuAccelerator.{name}" for name in CPU_ACCELERATOR_REPAIRS)
    return sorted(_applied)
