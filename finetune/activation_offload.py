"""train.activation_offload: the tensors autograd saves for backward wait in host memory between forward and backward.

A saved_tensors_hooks context that the training step enters around forward and backward (Plugin.forward_backward):
each saved tensor of the compute device, of at least MIN_OFFLOAD_BYTES and not a parameter (nor a view of one), is
copied to a host buffer when autograd saves it, and brought back when backward asks for it. Offloading starts with
each forward of the decoder body and stops at the end of its last transformer block: what is saved after it (the
final norm, the head and the loss, which backward needs first) stays on the device, as offloading it would only send
it out and straight back (torchtune leaves its output layer out for that reason).

With gradient checkpointing (non-reentrant, as build_run enables it) autograd saves only each block's inputs (the
checkpoint's own hooks take the block's inner tensors, and recompute them in backward): those inputs are offloaded.

The structure follows torchtune's OffloadActivations (torchtune/training/_activation_offloading.py) and torch's
save_on_cpu. On CUDA: pinned host buffers (torch's caching host allocator reuses them step after step), the copies
on a side stream that waits for the compute stream, an event per copy; the device tensor is kept alive until its copy
is done (a bounded forward stash: the compute stream waits on the event of the oldest before letting it go), and all
of it is released when the last block has run. In backward a tensor still in the stash is used as it is; the others
come back on the side stream, the compute stream waits for it, and record_stream tells the caching allocator that
the compute stream uses the copy. UNVERIFIED: this project has no GPU, so the CUDA branch (streams, events, pinned
memory, the overlap it buys) has not run; the CPU branch, which runs the same hooks, is tested.

On CPU the device is host memory: the hooks copy each saved tensor into a new host tensor (which replaces the
original, freed once nothing else holds it), so the losses and gradients are checked for real, but the peak cannot
go down (docs/estimator.md says what the CPU measurement shows).
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.multiprocessing.reductions import StorageWeakRef

# Smaller saved tensors (masks, indices, norms' per-token statistics) stay on the device: a transfer per tensor
# costs more than the bytes it frees (torchtune's threshold).
MIN_OFFLOAD_BYTES = 1024
# Offloaded device tensors kept alive until their copy is done, at most (torchtune's max_fwd_stash_size): more lets
# the copies overlap more forward compute, at the cost of that many tensors' device memory.
FORWARD_STASH_TENSORS = 5


@dataclass
class OffloadStats:
    """What the hooks did in the last forward: tensors and bytes copied to the host, and the saved bytes kept on the device."""

    offloaded_tensors: int = 0
    offloaded_bytes: int = 0
    kept_bytes: int = 0


@dataclass
class _Offloaded:
    """A saved tensor's host copy; `device` is the original, still alive, while it sits in the forward stash."""

    host: torch.Tensor
    device: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None


@dataclass
class _SeenStorage:
    """A host copy (weakly: backward frees each once used) and the storage it was taken of: several ops that save one
    tensor (q, k and v read one input) share one copy. Weak on both sides, so a freed storage whose address is reused
    is not mistaken for the one copied."""

    storage: StorageWeakRef
    packed: weakref.ref


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)


def _is_parameter(t: torch.Tensor) -> bool:
    """A parameter, or a view of one (FSDP hands modules views of its flat parameter): weights, not activations."""
    return isinstance(t, nn.Parameter) or isinstance(getattr(t, "_base", None), nn.Parameter)


def block_stack(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(the module that runs the transformer blocks, the last block) of a Hugging Face model, through any wrapper: the
    blocks are a ModuleList of its _no_split_modules classes (each maybe in an FSDP unit), the runner its parent (the
    decoder body, which every forward calls as a module); None where there is no such list."""
    names = next((set(m._no_split_modules) for m in model.modules() if getattr(m, "_no_split_modules", None)), set())
    unwrapped = lambda m: getattr(m, "_fsdp_wrapped_module", m)  # noqa: E731
    for parent in model.modules():
        for child in parent.children():
            if isinstance(child, nn.ModuleList) and len(child) and type(unwrapped(child[0])).__name__ in names:
                return parent, unwrapped(child[-1])
    return None


class ActivationOffload(saved_tensors_hooks):
    """The saved-tensor hooks of train.activation_offload for a model on `device` (see the module's docstring).

    Enter it around a micro-batch's forward and backward; `stats` tells what the last forward offloaded.
    """

    def __init__(self, device: torch.device, blocks: tuple[nn.Module, nn.Module] | None = None) -> None:
        self.device = device
        self.stats = OffloadStats()
        self._offloading = True
        self._seen: dict[tuple, _SeenStorage] = {}
        self._stash: deque[_Offloaded] = deque()
        cuda = device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(device) if cuda else None
        self._compute_stream = torch.cuda.current_stream(device) if cuda else None
        if blocks:  # (block_stack) from the start of each forward's blocks (a step may run several forwards: a
            # preference reference pass) to the end of the last block: what is saved after it (head, loss) is what
            # backward needs first
            runner, last = blocks
            runner.register_forward_pre_hook(lambda *_: self._start_offloading())
            last.register_forward_hook(lambda *_: self._stop_offloading())
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> ActivationOffload:
        self._offloading, self.stats = True, OffloadStats()  # (no blocks found: everything from here on)
        super().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._release_stash()
        self._seen.clear()

    def _start_offloading(self) -> None:
        self._offloading = True

    def _stop_offloading(self) -> None:
        self._offloading = False
        self._release_stash()
        self._seen.clear()

    def _pack(self, t: torch.Tensor):
        size = t.numel() * t.element_size()
        on_device = t.device.type == self.device.type  # (a CUDA run's CPU tensors are in host memory already)
        if not self._offloading or not on_device or size < MIN_OFFLOAD_BYTES or _is_parameter(t):
            self.stats.kept_bytes += size if on_device and not _is_parameter(t) else 0
            return t
        key = _storage_key(t)
        seen = self._seen.get(key)
        shared = seen.packed() if seen is not None and not seen.storage.expired() and seen.storage == StorageWeakRef(t.untyped_storage()) else None
        if shared is not None:
            return shared
        packed = self._copy_to_host(t)
        self._seen[key] = _SeenStorage(StorageWeakRef(t.untyped_storage()), weakref.ref(packed))
        self.stats.offloaded_tensors += 1
        self.stats.offloaded_bytes += size
        return packed

    def _copy_to_host(self, t: torch.Tensor) -> _Offloaded:
        if self._copy_stream is None:  # CPU: a plain copy into a new host tensor
            return _Offloaded(host=t.detach().clone())
        self._copy_stream.wait_stream(self._compute_stream)  # the copy reads t after the kernels that wrote it
        with torch.cuda.stream(self._copy_stream):
            host = torch.empty_like(t, device="cpu", pin_memory=True)
            host.copy_(t, non_blocking=True)
            packed = _Offloaded(host=host, device=t, copied=self._copy_stream.record_event())
        self._stash.append(packed)
        while len(self._stash) > FORWARD_STASH_TENSORS:
            self._release(self._stash.popleft())
        return packed

    def _release(self, packed: _Offloaded) -> None:
        """Let go of the device original once its copy is done (later compute-stream work waits for the copy)."""
        if packed.device is not None:
            self._compute_stream.wait_event(packed.copied)
            packed.device = None

    def _release_stash(self) -> None:
        while self._stash:
            self._release(self._stash.popleft())

    def _unpack(self, packed):
        if not isinstance(packed, _Offloaded):
            return packed
        if packed.device is not None:  # still in the forward stash: the original is on the device
            return packed.device
        if self._copy_stream is None:
            return packed.host
        with torch.cuda.stream(self._copy_stream):
            back = packed.host.to(self.device, non_blocking=True)
        self._compute_stream.wait_stream(self._copy_stream)
        back.record_stream(self._compute_stream)  # allocated on the copy stream, used and freed on the compute stream
        return back
