"""The process group and rank-0 helpers every entry script shares."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
import uuid
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from finetune import assets, fixes
from finetune.fixes import glibc
from finetune.fixes.torch import set_group_timeout
from finetune.errors import RANK_LOST, FinetuneError
from finetune.outputs import tee_rank_output


# glibc's mmap threshold on CPU (finetune.fixes.glibc): a block at least this large gets its own mapping,
# returned to the system when freed; smaller ones come from the heap, which keeps freed pages resident.
BUILD_MMAP_THRESHOLD = 1 << 18  # from launch on; under train.cpu_allocator=exact for the whole run
STEP_MMAP_THRESHOLD = 4 << 20  # train.cpu_allocator=fast, once the model is boosted
STEP_TRIM_THRESHOLD = 256 << 20  # the free heap top kept under train.cpu_allocator=fast


def is_main() -> bool:
    """Whether this is rank 0 (the rank that prints and writes the run's files)."""
    return dist.get_rank() == 0


def log(message: str) -> None:
    """Print on rank 0 only."""
    if is_main():
        print(message, flush=True)


def launch(output_dir: str, rank_logs: bool, timeout_s: int, seed: int) -> torch.device:
    """Create the process group (gloo on CPU, nccl on CUDA) under torchrun, or alone for plain python."""
    if "RANK" not in os.environ:  # plain `python finetune/train.py`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if rank_logs:
        tee_rank_output(output_dir, int(os.environ["RANK"]))
    fixes.apply()  # before colossalai touches its CPU accelerator
    if not torch.cuda.is_available():
        # While the model is built, loaded and sharded, every block of 256 KiB or more gets its own mapping,
        # returned to the system when freed: left to glibc's adaptive threshold, the full model each rank
        # builds before sharding, the loaders' temporaries and gathered FSDP units stay in the heap, resident
        # for good (GPT-2 124M full FSDP, 2 ranks: 3.25 GiB peak instead of 2.32), and the memory report
        # would show the allocator's history instead of what the run holds. 1 MiB left SmolLM2's k/v
        # projections (384 KiB a micro-batch) in the heap: the quickstart measured 1.15x its prediction;
        # 256 KiB: 0.92x. The steps then run under allocate_for_steps' threshold.
        glibc.fix_mmap_threshold(BUILD_MMAP_THRESHOLD)
    from colossalai.accelerator import get_accelerator
    from colossalai.utils import set_seed

    # What colossalai.launch_from_torch does, plus the collective timeout it cannot take; the plugin's
    # TP/PP/DP groups, created later without a timeout, get it as torch's default.
    accelerator = get_accelerator()
    set_group_timeout(timedelta(seconds=timeout_s))
    if not dist.is_initialized():  # else a caller running several runs in one launch keeps its group
        dist.init_process_group(backend=accelerator.communication_backend, timeout=timedelta(seconds=timeout_s))
    if accelerator.support_set_device:
        accelerator.set_device(int(os.environ["LOCAL_RANK"]))
    set_seed(seed)
    check_shared_dirs({"output_dir": Path(output_dir), "the cache $FINETUNE_CACHE": assets.cache_dir()})
    return accelerator.get_current_device()


def allocate_for_steps(device: torch.device, cpu_allocator: str, quantized_base: bool) -> bool:
    """Once the model is boosted: give the heap the build freed back to the system and set the steps' CPU
    allocator (train.cpu_allocator); True where the steps' activations come from the heap (the stage
    boundaries then trim it)."""
    # The full model each rank built before the plugin sharded or cast it is freed now; glibc would keep
    # its heap pages resident for good (on CPU the run's memory; on GPU machines host memory).
    glibc.release_freed_heap()
    if device.type != "cpu":  # CUDA tensors never touch glibc's heap: the key has no effect there
        return False
    if cpu_allocator == "exact":  # launch's 256 KiB for the steps too, so RSS follows the live tensors
        # (a quantized base's load raised it to 1 MiB: model.load_quantized; its dequantized weight-sized
        # temporaries are mapped under either, while at 1 MiB the activations below it stayed resident in the
        # heap: GPT-2 124M QLoRA under fsdp x2 measured 1.18x the live tensors' prediction)
        glibc.fix_mmap_threshold(BUILD_MMAP_THRESHOLD)
        return False
    # fast: at 256 KiB every activation of every step is a fresh mmap/munmap, its pages faulted in and
    # zeroed again (SmolLM2-135M LoRA, batch 4 x 128, one thread: ~2.3 s of a ~5.5 s step in the kernel,
    # issue 24). From 4 MiB on the hidden states (1.2 MB) and MLP blocks (3.1 MB) reuse heap blocks and
    # nearly all faults are gone (32 MiB saves no more); the logits stay mapped. The heap keeps what a
    # step freed, so RSS is then above the live tensors (the report says so). Under a quantized base
    # model.load_quantized's 1 MiB threshold wins (it is left as it is): bitsandbytes' CPU kernels
    # dequantize each weight into a weight-sized temporary every call, which would fragment the heap.
    if not quantized_base:
        glibc.fix_mmap_threshold(STEP_MMAP_THRESHOLD)
    # and the freed top of the heap stays for the next step's activations (SmolLM2 as above: a third fewer page
    # faults a step); the stage boundaries' malloc_trim gives it back
    glibc.keep_heap_top(STEP_TRIM_THRESHOLD)
    return True


def destroy_process_groups() -> None:
    """Destroy every process group, joining gloo's worker threads with the GIL released."""
    # torch 2.5.1 frees a ProcessGroup holding the GIL, and freeing its gloo backend joins the backend's worker
    # threads. A worker can still be finishing the last collective whose completion the caller already saw;
    # dropping that collective's tensors (Python objects) takes the GIL: each waits for the other for good
    # (fixed upstream by pytorch#154976). Gloo backends release the GIL when they are freed from Python, so the
    # backends are held past their groups, and the joins happen when this list lets go of them.
    # (Nothing here may hold a group past destroy_process_group, or freeing it frees its backend.)
    backends = [_cpu_backend(group) for group in list(distributed_c10d._world.pg_map)]
    dist.destroy_process_group()
    backends.clear()


def _cpu_backend(group: dist.ProcessGroup):
    """The group's backend for CPU tensors (gloo), or None (NCCL only)."""
    try:
        return group._get_backend(torch.device("cpu"))
    except RuntimeError:
        return None


SHARED_WAIT_S = 5.0  # a network filesystem may show another node's new file a moment late


def check_shared_dirs(dirs: dict[str, Path]) -> None:
    """When the world spans several nodes, check that each node sees the files rank 0 writes into dirs.

    Rank 0 alone writes the run's outputs and fills the cache that the other ranks then read, so a
    multi-node run needs these directories on a filesystem every node mounts at the same path. Rank 0
    writes a token file into each, the first rank of every other node looks for it; all ranks fail
    with one line naming what is not shared, instead of failing later on a missing file.
    """
    if int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())) >= dist.get_world_size():
        return  # one node
    name = [f".shared_check_{uuid.uuid4().hex}" if is_main() else ""]
    dist.broadcast_object_list(name, src=0)
    tokens = {label: path / name[0] for label, path in dirs.items()}
    if is_main():
        for token in tokens.values():
            token.parent.mkdir(parents=True, exist_ok=True)
            token.touch()
    dist.barrier()
    unseen: list[str] = []
    if os.environ.get("LOCAL_RANK") == "0" and not is_main():
        deadline = time.monotonic() + SHARED_WAIT_S
        while any(not t.exists() for t in tokens.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        unseen = [label for label, token in tokens.items() if not token.exists()]
    reports: list = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (socket.gethostname(), os.environ.get("GROUP_RANK", "?"), unseen))
    if is_main():
        for token in tokens.values():
            token.unlink(missing_ok=True)
    missing = [f"node {node} ({host}) does not see the files rank 0 writes into {', '.join(f'{label} {dirs[label]}' for label in absent)}" for host, node, absent in reports if absent]
    if missing:
        raise FinetuneError(f"{'; '.join(missing)}: a multi-node run needs {' and '.join(dirs)} on a filesystem every node mounts at the same path (NFS, Lustre, ...)")


class CollectiveTimeout(FinetuneError):
    """A collective waited longer than launch.timeout_s for another rank; said by the rank that waited."""


# gloo: "Timed out waiting 20000ms for recv operation to complete"; NCCL: "... Timeout(ms)=20000)".
_TIMEOUT_MS = re.compile(r"Timed out waiting (\d+)ms|Timeout\(ms\)=(\d+)")


def collective_timeout(err: Exception) -> CollectiveTimeout | None:
    """The one-line user error for a collective's timeout, or None when err is something else."""
    match = _TIMEOUT_MS.search(str(err))
    if not match:
        return None
    seconds = int(match.group(1) or match.group(2)) // 1000
    return CollectiveTimeout(
        f"collective timed out after {seconds}s (launch.timeout_s): another rank stopped responding; its log in output_dir/logs/ "
        "says why (stalled, killed, out of memory, network); raise launch.timeout_s only if a step is that slow"
    )


class RankLost(FinetuneError):
    """Another rank died (killed, out of memory, its node gone) and took its end of a collective with it."""


# gloo: "Connection closed by peer [10.0.0.2]:1234", "... Connection reset by peer", "... Broken pipe";
# NCCL: "... remote process exited or there was a network error". The same in every plugin's collectives
# (DDP, ZeRO and Gemini all-reduces, TP sub-groups, pipeline send/recv).
_PEER_GONE = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|remote process exited", re.IGNORECASE)


def rank_lost(err: Exception) -> RankLost | None:
    """The one-line error for a collective whose peer died, or None when err is something else."""
    match = _PEER_GONE.search(str(err))
    if not match:
        return None
    return RankLost(f"{RANK_LOST} ({match.group(0)}): it died or was killed, its log in output_dir/logs/ says why; resume_from=latest continues from the last complete checkpoint")


@contextlib.contextmanager
def main_rank_first():
    """Rank 0 runs the block first (e.g. converting a model into the cache), then the others.

    A user error in rank 0's block is raised on every rank, so all stop with rank 0's one line
    instead of the others dying in a barrier.
    """
    failure: list[Exception | None] = [None]
    if not is_main():
        dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            raise failure[0]
        yield
        return
    try:
        yield
    except FinetuneError as err:
        failure[0] = err
        raise
    finally:
        dist.broadcast_object_list(failure, src=0)


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few numbers over all ranks."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def peak_bytes_per_rank(peak: int) -> list[int]:
    """Every rank's memory peak, on every rank (a collective)."""
    peaks: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)
    return peaks
