"""DPO with LoRA on 2 gloo ranks under torch_ddp, ZeRO-2, FSDP and tensor parallelism (tp2), and a LoRA reward model
under torch_ddp, match a plain single-process PyTorch loop.

Each case trains test_fidelity's STEPS steps through finetune/train.py's main (one shared torchrun launch:
tests/run_many.py). The reference repeats the same global batches (the distributed samplers' shards, put
together) in this process: the policy is the base with a peft adapter, the reference a second copy of the
base, DPO's loss written here (tests/unit/test_preference.paper_formula); a reward model's is Bradley-Terry on a plain
HF classifier's scores (tests/unit/test_preference.plain_scores); AdamW, the same schedule and
clipping. A pair loss is a mean over pairs and every rank holds as many pairs, so the data-parallel mean is
the global one whatever the pairs' lengths. Losses, the pair metrics of every step and the saved adapter
must match.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from finetune.config import load_config
from finetune.data import build_data, collate, load_splits
from finetune.model import build_lora_config, build_model
from tests.conftest import read_metrics, run_grouped, selected_params, write_pairs
from tests.distributed.test_fidelity import LLAMA_PROJECTIONS, STEPS, run_args
from tests.unit.test_preference import paper_formula, plain_logps, plain_scores

pytestmark = pytest.mark.distributed

DPO = ["task=preference", "preference.beta=0.5", "preference.label_smoothing=0.1", "data.eval_fraction=0.2"]
REWARD = ["task=reward", "data.eval_fraction=0.2"]
# case -> (booster config, overrides, data-parallel size). tp2: the two ranks split every layer and the vocabulary
# (the log-probabilities from the vocab-parallel chunked loss, the reference with the sharded adapters off).
CASES = {
    "ddp": ("torch_ddp", DPO, 2),
    "zero2": ("zero2", DPO, 2),
    "fsdp": ("fsdp", DPO, 2),
    "tp2": ("tp2_lora", [*DPO, f"lora.target_modules=[{LLAMA_PROJECTIONS}]"], 1),
    "ddp_reward": ("torch_ddp", REWARD, 2),
}


def pair_loss(cfg, policy, reference_model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward) per pair: DPO on log-probabilities, or (no reference model) a reward
    model's Bradley-Terry on its scores."""
    if reference_model is None:
        scores = plain_scores(policy, batch)
        return -F.logsigmoid(scores[0::2] - scores[1::2]), scores[0::2], scores[1::2]
    with torch.no_grad():
        reference_sums, _ = plain_logps(reference_model, batch)
    sums, counts = plain_logps(policy, batch)
    return paper_formula("dpo", cfg.preference, ((sums[0::2], sums[1::2]), (counts[0::2], counts[1::2])), (reference_sums[0::2], reference_sums[1::2]))


def pair_reference(args: list[str], dp_size: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The plain single-process loop on the same global batches: per step {loss, margin, accuracy}, and the trained adapter."""
    from peft import get_peft_model, get_peft_model_state_dict
    from torch.utils.data import DistributedSampler
    from transformers import get_scheduler

    cfg = load_config(args, world_size=2)
    splits = load_splits(cfg.data, cfg.train.seed, cfg.task)
    base, tokenizer = build_model(cfg.model, cfg.train.seed, labels=splits.task.labels_or_none)
    torch.manual_seed(cfg.train.seed)
    policy = get_peft_model(base, build_lora_config(base, cfg.lora))
    reference_model = None if splits.task.scalar_head else build_model(cfg.model, cfg.train.seed)[0]
    data = build_data(cfg.data, tokenizer, splits)
    shards = [list(DistributedSampler(data.train, num_replicas=dp_size, rank=r, shuffle=True, seed=cfg.train.seed)) for r in range(dp_size)]
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=STEPS)
    steps, size = [], cfg.train.batch_size
    policy.train()
    for step in range(STEPS):
        batch = collate([data.train[i] for shard in shards for i in shard[step * size : (step + 1) * size]], tokenizer.pad_token_id)
        per_pair, good, bad = pair_loss(cfg, policy, reference_model, batch)
        loss = per_pair.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        steps.append({"loss": loss.item(), "margin": (good - bad).mean().item(), "accuracy": (good > bad).float().mean().item()})
    return steps, get_peft_model_state_dict(policy)


@pytest.fixture(scope="module")
def pair_runs(request, tmp_path_factory) -> dict[str, tuple[list[str], object]]:
    root = tmp_path_factory.mktemp("preference")
    data = write_pairs(root / "pairs.jsonl", 64)  # every step within the first epoch: the reference does not reshuffle
    selected = selected_params(request, "test_lora_pairs_match_the_single_process_reference")
    runs = {case: (2, run_args(CASES[case][0], "tiny-llama", "lora", CASES[case][1], data, root / case)) for case in selected}
    results = run_grouped(runs, root / "launches")
    return {case: (args, results[case]) for case, (_, args) in runs.items()}


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("case", list(CASES))
def test_lora_pairs_match_the_single_process_reference(case, pair_runs):
    args, result = pair_runs[case]
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    out = Path(load_config(args, world_size=2).output_dir)
    logged = [m for m in read_metrics(out) if "loss" in m]
    expected, adapter = pair_reference(args, dp_size=CASES[case][2])
    assert len(logged) == STEPS
    for step, (got, want) in enumerate(zip(logged, expected), start=1):
        for key in ("loss", "margin", "accuracy"):
            assert abs(got[key] - want[key]) <= 1e-5 * max(1.0, abs(want[key])), f"step {step}: {key} {got[key]} vs reference {want[key]}"
    moved = max(value.abs().max().item() for key, value in adapter.items() if "lora_B" in key)  # lora_B starts at 0: the policy starts as the reference
    assert moved > 1e-3 and len({round(s["loss"], 4) for s in expected}) > 2, "the policy did not move off the reference: the comparison would prove little"
    saved = load_file(out / "final" / "adapter_model.safetensors")
    assert saved.keys() == adapter.keys()
    worst = max((saved[k] - adapter[k]).abs().max().item() for k in saved)
    assert worst <= 1e-4, f"the saved adapter differs from the reference's by {worst}"


@pytest.mark.timeout(900)
def test_full_fine_tuning_under_tp2_reads_the_starting_models_reference(tmp_path):
    """tp2, method=full: the reference log-probabilities are the starting model's (attach_reference through the vocab-parallel
    chunked loss, before training), so at step 1 the policy is its reference: DPO's loss is log 2 and every reward 0; then they move."""
    import math

    data = write_pairs(tmp_path / "pairs.jsonl", 64)
    args = run_args("tp2", "tiny-llama", "full", DPO, data, tmp_path / "out")
    result = run_grouped({"tp2_full": (2, args)}, tmp_path / "launches")["tp2_full"]
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "reference log-probabilities: " in result.stdout and "loss in chunks of 1024 label tokens" in result.stdout
    logged = [m for m in read_metrics(tmp_path / "out") if "loss" in m]
    assert len(logged) == STEPS
    first = logged[0]
    assert abs(first["loss"] - math.log(2)) <= 1e-6, first
    assert max(abs(first[key]) for key in ("reward_chosen", "reward_rejected", "margin")) <= 1e-6, first
    assert max(abs(m["margin"]) for m in logged[1:]) > 1e-3, "the policy never left its reference: the check would prove little"
