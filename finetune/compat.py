"""CPU repairs for ColossalAI 0.5.0, the one place where we patch ColossalAI.

ColossalAI's CpuAccelerator raises RuntimeError for most of its API (memory, seeds, streams,
synchronize) and gets two methods wrong (get_rng_state passes a device to torch.get_rng_state;
autocast returns the nullcontext class instead of an instance; max_memory_reserved is in KiB). Code
paths that are fine on CPU (seeding, memory reports, checkpoint loading) then fail. Each repair below
maps one method onto its CPU meaning; memory is the process's resident set (RSS), and its peak is the
kernel's high-water mark (VmHWM), which writing "5" to /proc/self/clear_refs resets.

Outside the accelerator: LowLevelZero asserts a CUDA/NPU device; the pipeline's p2p backend check reads
`Backend.HCCL`, which torch 2.5.1 lacks; shardformer's GPT-2 forward calls torch.cuda.set_device on
a CPU device; its fused-qkv gather moves tensors to CUDA; the FSDP plugin passes
torch.cuda.current_device() to FSDP. Each is repaired by the smallest wrapper that gives it the CPU.

`apply()` is a no-op when a CUDA device is present, and refuses to run on a ColossalAI version these
repairs were not written for (their line-level assumptions would be unchecked).
Measured facts behind each repair: shared/notes/colossalai-cpu.md.

On every device, importing this module stops torch inductor's compile workers from starting (see
`stop_compile_workers`): import it before the first `import colossalai`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from pathlib import Path

import psutil
import torch

from finetune.errors import FinetuneError

SUPPORTED_COLOSSALAI = "0.5.0"
# The torch whose inductor this module reads (torch/_inductor/config.py and async_compile.py of 2.5.1).
SUPPORTED_TORCH = "2.5."
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
    if torch.__version__.startswith(SUPPORTED_TORCH):  # the config attribute this was checked against
        from torch._inductor import config as inductor_config

        inductor_config.compile_threads = 1
    return True


stop_compile_workers()


class CompatError(FinetuneError):
    """ColossalAI is not the version these repairs were written for."""


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


def release_freed_heap() -> bool:
    """Give the heap pages of freed memory back to the system (glibc's malloc_trim); False where there is no glibc.

    Tensors below glibc's mmap threshold (up to 32 MiB once it has adapted) live in the heap; when they
    are freed, glibc keeps their pages, still resident, unless they lie at the heap's top. After a large
    short-lived model is dropped the process then holds its memory for good.
    """
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):  # no C library found, or not glibc (musl, macOS)
        return False
    trim(0)
    return True


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)


def fix_mmap_threshold(threshold_bytes: int) -> bool:
    """Serve every allocation of at least `threshold_bytes` with its own mmap (returned to the system when
    freed) and stop glibc from raising that threshold; False where there is no glibc.

    glibc raises its mmap threshold to the size of the largest block freed so far (up to 32 MiB); after
    that, blocks up to that size come from the heap, and short-lived ones between long-lived ones leave
    holes that stay resident.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return mallopt(M_MMAP_THRESHOLD, threshold_bytes) == 1


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


# name -> replacement method of CpuAccelerator. Each entry is unit-tested in tests/test_compat.py.
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


def _module_repairs() -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement) for ColossalAI code outside the accelerator."""
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


_applied: list[str] = []


def apply(colossalai_version: str | None = None) -> list[str]:
    """Repair ColossalAI's CPU path when no CUDA device is present; return what was repaired."""
    if torch.cuda.is_available():
        return []
    import colossalai
    from colossalai.accelerator.cpu_accelerator import CpuAccelerator

    version = colossalai_version or colossalai.__version__
    if version != SUPPORTED_COLOSSALAI:
        raise CompatError(
            f"finetune.compat repairs ColossalAI {SUPPORTED_COLOSSALAI} on CPU, found {version}: "
            f"install the pinned stack (pip install -r requirements.txt -c constraints.txt)"
        )
    if not _applied:  # once per process: the wrappers must not wrap themselves
        for name, repair in CPU_ACCELERATOR_REPAIRS.items():
            setattr(CpuAccelerator, name, repair)
        for owner, name, repair in _module_repairs():
            setattr(owner, name, repair)
            _applied.append(f"{getattr(owner, '__name__', owner)}.{name}")
        _applied.extend(f"CpuAccelerator.{name}" for name in CPU_ACCELERATOR_REPAIRS)
    return sorted(_applied)


# --- bitsandbytes on CPU (method=qlora) ---------------------------------------------------------
# transformers 4.51.3 accepts bitsandbytes on CPU only with Intel's IPEX installed, although
# bitsandbytes >= 0.45 ships its own CPU backend (it lists "cpu" in supported_torch_devices, and
# quantizes, runs forward/backward and steps on CPU). transformers 4.53 dropped the IPEX requirement.
SUPPORTED_TRANSFORMERS = "4.51.3"


def _bnb_backend_available(raise_exception: bool = False) -> bool:
    """transformers' multi-backend check, trusting bitsandbytes' own list of devices it supports."""
    import bitsandbytes as bnb

    if "cpu" in getattr(bnb, "supported_torch_devices", set()):
        return True
    if raise_exception:
        raise RuntimeError(f"bitsandbytes {bnb.__version__} has no CPU backend; install the pinned bitsandbytes (requirements.txt)")
    return False


def apply_quantization_repairs(transformers_version: str | None = None) -> list[str]:
    """Let transformers quantize with bitsandbytes on CPU; a no-op on CUDA and on other transformers versions."""
    import transformers
    import transformers.integrations.bitsandbytes as hf_bnb

    version = transformers_version or transformers.__version__
    if torch.cuda.is_available() or version != SUPPORTED_TRANSFORMERS:
        return []
    hf_bnb._validate_bnb_multi_backend_availability = _bnb_backend_available
    return ["transformers.integrations.bitsandbytes._validate_bnb_multi_backend_availability"]


# bitsandbytes 0.50.2 on CPUs with AVX512-BF16: the first forward of a 4-bit layer in eval mode
# without grad repacks its weight into an inference-only layout and keeps it. Every later forward,
# in training too, then takes the inference kernel, which has no backward: training after an
# evaluation fails ("a view of a leaf Variable ... in-place") or loses the gradient through the layer.
SUPPORTED_BITSANDBYTES = "0.50.2"


def keep_4bit_weights_trainable(model: torch.nn.Module, bitsandbytes_version: str | None = None) -> int:
    """Turn off bitsandbytes' CPU inference repacking in the model's 4-bit layers; return how many."""
    import bitsandbytes as bnb

    version = bitsandbytes_version or bnb.__version__
    if torch.cuda.is_available() or version != SUPPORTED_BITSANDBYTES:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)
