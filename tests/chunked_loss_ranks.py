"""Run by tests/distributed/test_fidelity.py under torchrun (2 ranks, tensor parallelism): for each case, one
training step with the loss over shardformer's full split logits (train.loss_chunks=off: its vocab-parallel
dist_cross_entropy) and one with the chunked loss (the vocabulary kept split per chunk), on the same ranks from the
same start; every rank compares its loss and its share of every gradient within 1e-6 and prints one line per case.
A rank that hangs (WORK_LIMIT_S) prints every thread's stack and exits.

    torchrun --nproc_per_node=2 tests/chunked_loss_ranks.py WORK_DIR CASE [CASE ...]
"""

from __future__ import annotations

import faulthandler
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

from finetune.distributed import destroy_process_groups, launch  # noqa: E402
from tests.conftest import REPO, write_instruction_file  # noqa: E402
from tests.unit.test_chunked_loss import CHUNK, first_step  # noqa: E402

WORK_LIMIT_S = 400  # the five cases take ~80 s alone on two cores
LLAMA_PROJECTIONS = "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
# case -> (booster config, model, method, overrides): a frozen head (LoRA) and one that trains (full), the chat task's
# prompt tokens left out, GPT-2's padded vocabulary (50,257 tokens in 2 x 25,152 rows: rank 1 holds 47 padding rows).
CASES = {
    "llama-lora": ("tp2_lora", "tiny-llama", "lora", [LLAMA_PROJECTIONS]),
    "llama-full": ("tp2", "tiny-llama", "full", []),
    "llama-chat-lora": ("tp2_lora", "tiny-llama", "lora", ["task=chat", "data.train_path=chatterbot-corpus:chat", LLAMA_PROJECTIONS]),
    "gpt2-full": ("tp2", "tiny-gpt2", "full", []),
    "gpt2-lora": ("tp2_lora", "tiny-gpt2", "lora", ["lora.target_modules=[c_attn,c_fc,c_proj]"]),
}


def compare(work: Path, case: str) -> str:
    """One step over the full split logits and one chunked, from the same start: the worst differences, or AssertionError."""
    config, model, method, extra = CASES[case]
    data = [] if any(a.startswith("data.train_path") for a in extra) else [f"data.train_path={work / 'train.jsonl'}"]
    args = ["--config", str(REPO / "booster_configs" / f"{config}.yaml"), f"model.name={model}", f"method={method}", *data, *extra]
    loss, grads, _, _, tokens = first_step(work / case / "off", args, "off", world_size=dist.get_world_size())
    assert tokens == 0, tokens
    chunked_loss, chunked_grads, _, _, tokens = first_step(work / case / "chunked", args, str(CHUNK), world_size=dist.get_world_size())
    assert tokens == CHUNK, tokens
    assert abs(chunked_loss - loss) <= 1e-6 * max(1.0, abs(loss)), f"{case}: chunked loss {chunked_loss} vs {loss} over the full logits"
    assert grads.keys() == chunked_grads.keys() and grads, sorted(grads.keys() ^ chunked_grads.keys())
    worst = 0.0
    for name, grad in grads.items():
        assert grad.abs().max() > 0, f"{case}: {name} has no gradient, the comparison would prove little"
        diff = (chunked_grads[name] - grad).abs().max().item()
        assert diff <= 1e-6, f"{case}: {name}: gradient differs by {diff}"
        worst = max(worst, diff)
    return f"loss {chunked_loss:.7f} vs {loss:.7f}, {len(grads)} gradients within {worst:.1e}"


def main(work: str, cases: list[str]) -> None:
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    faulthandler.dump_traceback_later(WORK_LIMIT_S, exit=True)
    launch(work, False, 300, 0)
    if dist.get_rank() == 0:  # one file: the ranks tokenize it together, meeting at its cache key
        write_instruction_file(Path(work) / "train.jsonl")
    dist.barrier()
    try:
        for case in cases:
            print(f"rank {dist.get_rank()} {case}: {compare(Path(work), case)}", flush=True)
    finally:
        destroy_process_groups()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
