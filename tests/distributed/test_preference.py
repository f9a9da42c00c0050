"""DPO with LoRA on 2 gloo ranks under torch_ddp, ZeRO-2, FSDP, tensor parallelism (tp2: the log-probabilities from the
vocab-parallel chunked loss, the reference with the sharded adapters off) and a 2-stage pipeline (pp2: the reference a
forward-only pass of the schedule with every stage's adapters off), and on 4 ranks under both (tp2_pp2); full
fine-tuning DPO under pp2 (reference log-probabilities computed by the starting model through the pipeline before
training), and a LoRA reward model under torch_ddp, match a plain single-process PyTorch loop.

Each case trains test_fidelity's STEPS steps through finetune/train.py's main (one shared torchrun launch:
tests/run_many.py). The reference repeats the same global batches (the distributed samplers' shards, put
together) in this process: the policy is the base with a peft adapter, the reference a second copy of the
base (full fine-tuning: the policy is the base itself), DPO's loss written here (tests/unit/test_preference.paper_formula); a reward model's is Bradley-Terry on a plain
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

from finetune.config import load_config
from finetune.data import build_data, collate, load_splits
from finetune.model import build_lora_config, build_model
from tests.conftest import read_metrics, read_summary, run_grouped, selected_params, write_pairs
from tests.distributed.test_fidelity import LLAMA_PROJECTIONS, RANKS, STEPS, run_args, saved_weights
from tests.unit.test_preference import paper_formula, plain_logps, plain_scores

pytestmark = pytest.mark.distributed

DPO = ["task=preference", "preference.beta=0.5", "preference.label_smoothing=0.1", "data.eval_fraction=0.2"]
REWARD = ["task=reward", "data.eval_fraction=0.2"]
# case -> (config, overrides, method, data-parallel size); TP cases adapt every projection, so each split kind carries an adapter
ALL_PROJECTIONS = f"lora.target_modules=[{LLAMA_PROJECTIONS}]"
CASES = {
    "ddp": ("torch_ddp", DPO, "lora", 2),
    "zero2": ("zero2", DPO, "lora", 2),
    "fsdp": ("fsdp", DPO, "lora", 2),
    "tp2": ("tp2_lora", [*DPO, ALL_PROJECTIONS], "lora", 1),
    "pp2": ("pp2", DPO, "lora", 1),
    "pp2_full": ("pp2", DPO, "full", 1),
    "tp2_pp2": ("tp2_pp2", [*DPO, ALL_PROJECTIONS], "lora", 1),  # 4 ranks: the last stage's head split over the vocabulary
    "ddp_reward": ("torch_ddp", REWARD, "lora", 2),
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


def pair_reference(args: list[str], dp_size: int, method: str, world_size: int) -> tuple[list[dict], dict[str, torch.Tensor], dict]:
    """The plain single-process loop on the same global batches: per step {loss, margin, accuracy}, the trained
    adapter (full fine-tuning: the trained model's weights), and the trained model's {loss, margin, accuracy} over the
    held-out pairs."""
    from peft import get_peft_model, get_peft_model_state_dict
    from torch.utils.data import DistributedSampler
    from transformers import get_scheduler

    cfg = load_config(args, world_size=world_size)
    splits = load_splits(cfg.data, cfg.train.seed, cfg.task)
    base, tokenizer = build_model(cfg.model, cfg.train.seed, labels=splits.task.labels_or_none)
    torch.manual_seed(cfg.train.seed)
    policy = get_peft_model(base, build_lora_config(base, cfg.lora)) if method == "lora" else base
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
    policy.eval()
    with torch.no_grad():
        per_pair, good, bad = pair_loss(cfg, policy, reference_model, collate(data.eval, tokenizer.pad_token_id))
    held_out = {"loss": per_pair.mean().item(), "margin": (good - bad).mean().item(), "accuracy": (good > bad).float().mean().item()}
    return steps, get_peft_model_state_dict(policy) if method == "lora" else policy.state_dict(), held_out


@pytest.fixture(scope="module")
def pair_runs(request, tmp_path_factory) -> dict[str, tuple[list[str], object]]:
    root = tmp_path_factory.mktemp("preference")
    data = write_pairs(root / "pairs.jsonl", 64)  # every step within the first epoch: the reference does not reshuffle
    selected = selected_params(request, "test_lora_pairs_match_the_single_process_reference")
    runs = {case: (RANKS.get(CASES[case][0], 2), run_args(CASES[case][0], "tiny-llama", CASES[case][2], CASES[case][1], data, root / case)) for case in selected}
    results = run_grouped(runs, root / "launches")
    return {case: (args, results[case]) for case, (_, args) in runs.items()}


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("case", list(CASES))
def test_lora_pairs_match_the_single_process_reference(case, pair_runs):
    _, _, method, dp_size = CASES[case]
    args, result = pair_runs[case]
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    # DPO's log-probabilities come from the chunked loss on every plugin here (tp x pp: on the last stage, the vocabulary split)
    assert ("loss in chunks of 1024 label tokens" in result.stdout) != (CASES[case][1] is REWARD), result.stdout[-2000:]
    world_size = RANKS.get(CASES[case][0], 2)
    out = Path(load_config(args, world_size=world_size).output_dir)
    logged = [m for m in read_metrics(out) if "loss" in m]
    expected, weights, held_out = pair_reference(args, dp_size, method, world_size)
    assert len(logged) == STEPS
    for step, (got, want) in enumerate(zip(logged, expected), start=1):
        for key in ("loss", "margin", "accuracy"):
            assert abs(got[key] - want[key]) <= 1e-5 * max(1.0, abs(want[key])), f"step {step}: {key} {got[key]} vs reference {want[key]}"
    assert len({round(s["loss"], 4) for s in expected}) > 2, "the policy did not move off the reference: the comparison would prove little"
    evaluated = read_summary(out)["eval"]["after"]  # through the plugin's eval forward (a pipeline: its schedule, the last stage's sums)
    for key, want in held_out.items():
        assert abs(evaluated[key] - want) <= 1e-5 * max(1.0, abs(want)), f"eval after training: {key} {evaluated[key]} vs reference {want}"
    if method == "lora":
        moved = max(value.abs().max().item() for key, value in weights.items() if "lora_B" in key)  # lora_B starts at 0: the policy starts as the reference
        assert moved > 1e-3, "the adapter did not move: the comparison would prove little"
    saved = saved_weights(out / "final", method)
    assert saved.keys() == weights.keys()
    worst = max((saved[k] - weights[k]).abs().max().item() for k in saved)
    assert worst <= 1e-4, f"the saved {'adapter' if method == 'lora' else 'model'} differs from the reference's by {worst}"


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
