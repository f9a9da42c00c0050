"""Process-group teardown (finetune.distributed.destroy_process_groups) cannot hang a rank after its work."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, free_port, run_env

# Rank 0 leaves a collective to its gloo worker thread and drops its tensor (the tensor's Python object is then
# freed by that thread, which takes the GIL for it); rank 1 joins the collective only once rank 0 is tearing
# down, so the worker finishes while rank 0 frees the group: under torch 2.5.1's own destroy_process_group, rank 0
# holds the GIL while it waits for the worker, and the worker waits for the GIL.
RANK = """
import sys, time, torch, torch.distributed as dist
from finetune.distributed import destroy_process_groups
rank = int(sys.argv[1])
dist.init_process_group("gloo", rank=rank, world_size=2)
store = dist.distributed_c10d._get_default_store()
if rank == 0:
    dist.all_reduce(torch.ones(4), async_op=True)
    store.set("tearing down", "1")
else:
    store.wait(["tearing down"])
    time.sleep(1)  # rank 0 is freeing its group by now
    dist.all_reduce(torch.ones(4))
destroy_process_groups()
print(f"rank {rank} done", flush=True)
"""

TEARDOWN_LIMIT_S = 90  # two interpreters importing torch on a loaded machine, plus the one-second wait


@pytest.mark.distributed
def test_teardown_does_not_wait_for_a_worker_that_needs_the_gil():
    env = {**run_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO)}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(rank)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        outputs = [rank.communicate(timeout=TEARDOWN_LIMIT_S)[0] for rank in ranks]
    except subprocess.TimeoutExpired:
        outputs = None
    finally:
        for rank in ranks:
            rank.kill()
    assert outputs is not None, f"a rank hung in its teardown for {TEARDOWN_LIMIT_S}s"
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert [out.strip().splitlines()[-1] for out in outputs] == ["rank 0 done", "rank 1 done"], outputs
