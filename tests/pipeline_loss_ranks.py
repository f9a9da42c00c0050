"""Run by tests/distributed/test_pipeline_loss.py under torchrun (a LAYOUT: 2 ranks, a 2-stage pipeline; or 4, each stage
split over 2 tensor-parallel ranks, the last stage's head over the vocabulary): one training step of each
case (tests/unit/test_chunked_loss.first_step) over the full logits (train.loss_chunks=off) and with the last stage's
loss in chunks of CHUNK label tokens. Rank 0 writes, per case, what the two steps gave: the loss difference (last stage),
every rank's gradient names and largest gradient difference, and the most logit rows the last stage's head held.
A rank that hangs (WORK_LIMIT_S, or TEARDOWN_LIMIT_S once its work is done) prints every thread's stack and exits.

    torchrun --nproc_per_node=2 tests/pipeline_loss_ranks.py OUT.json WORK_DIR pp2
    torchrun --nproc_per_node=4 tests/pipeline_loss_ranks.py OUT.json WORK_DIR tp2_pp2
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from finetune.distributed import destroy_process_groups, launch  # noqa: E402
from tests.unit.test_chunked_loss import CHUNK, HEAD_ADAPTED, first_step, task_args  # noqa: E402

WORK_LIMIT_S = 420  # ten pipeline builds and steps: ~60 s alone, several times that on two cores shared with other runs
TEARDOWN_LIMIT_S = 30
PP2 = ["plugin.name=hybrid_parallel", "plugin.pp_size=2", "plugin.num_microbatches=2"]
# case -> (task, method, model, extra): the instruction and chat tasks (prompt tokens never reach the head), DPO with
# LoRA (the reference a forward-only pass of the schedule, adapters off) and with full fine-tuning (the starting
# model's log-probabilities through the pipeline, in the batch), a frozen head and heads that train.
CASES = {
    "instruction-lora-llama": ("instruction", "lora", "tiny-llama", []),
    "instruction-full-gpt2": ("instruction", "full", "tiny-gpt2", []),
    "chat-lora-gpt2": ("chat", "lora", "tiny-gpt2", []),
    "instruction-lora-llama-head": ("instruction", "lora", "tiny-llama", HEAD_ADAPTED),
    "preference-lora-llama": ("preference", "lora", "tiny-llama", []),
    "preference-full-llama": ("preference", "full", "tiny-llama", []),
}
# layout -> (plugin options, world size, its cases). tp2 x pp2: pairs refuse the full logits under TP (their DPO run is
# checked against one process in tests/distributed/test_preference.py, case tp2_pp2)
LAYOUTS = {
    "pp2": (PP2, 2, CASES),
    "tp2_pp2": ([*PP2, "plugin.tp_size=2"], 4, {case: CASES[case] for case in ("instruction-lora-llama", "instruction-full-gpt2")}),
}


def compare_case(work: Path, layout: str, task: str, method: str, model: str, extra: list[str]) -> dict:
    """This case's two steps under `layout` compared on this rank."""
    data = [task_args(work, task) if dist.get_rank() == 0 else None]  # one rank writes the data files: tokenization shares them by path
    dist.broadcast_object_list(data, src=0)
    options, world_size, _ = LAYOUTS[layout]
    args = [*data[0], f"model.name={model}", f"method={method}", *options, *extra]
    loss, grads, head_off, _, chunk_off = first_step(work, args, "off", world_size=world_size)
    chunked_loss, chunked_grads, head, positions, chunk = first_step(work, args, str(CHUNK), world_size=world_size)
    return {
        "loss": [loss, chunked_loss],
        "names": sorted(grads),
        "chunked_names": sorted(chunked_grads),
        "zero": sorted(name for name, grad in grads.items() if not grad.abs().max() > 0),
        "grad_diff": max((float((chunked_grads[n] - g).abs().max()) for n, g in grads.items() if n in chunked_grads), default=float("nan")),
        "chunk": [chunk_off, chunk],
        "head_rows": [head_off.rows, head.rows] if head is not None else None,  # the stage holding the head
        "positions": positions,
    }


def main(out: str, work: str, layout: str) -> None:
    """One rank's run, watched: a hang in its work or in its teardown dumps its stacks and exits."""
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    faulthandler.dump_traceback_later(WORK_LIMIT_S, exit=True)
    launch(work, False, 300, 0)
    try:
        results = {}
        for case, spec in LAYOUTS[layout][2].items():
            case_dir = Path(work) / case
            case_dir.mkdir(parents=True, exist_ok=True)
            os.environ["FINETUNE_CACHE"] = str(case_dir / "cache")  # one cache per case, shared: every rank hits it or none
            mine = compare_case(case_dir, layout, *spec)
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
            results[case] = ranks
        if dist.get_rank() == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        faulthandler.dump_traceback_later(TEARDOWN_LIMIT_S, exit=True)  # replaces the work's limit
        destroy_process_groups()


if __name__ == "__main__":
    torch.manual_seed(0)
    main(*sys.argv[1:4])
