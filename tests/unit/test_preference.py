"""task=preference: pair records and their checks, tokenization and truncation, pair collation and the cache,
the `preference` config section, and each objective's first training step against its paper's formula.

The formula tests compute loss, rewards and accuracy from plain PyTorch models (the policy: the base with the
run's adapter; the reference: a second, untouched copy of the base) with each paper's formula written here, and
compare the tool's first step (build_run, the plugin's forward_backward) within 1e-5 in fp32 with dropout 0.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from finetune.assets import gpt2_tokenizer
from finetune.config import DataConfig, build_config, load_config, parse_args, validate
from finetune.core.loss_chunks import LOG_SOFTMAX_ROWS
from finetune.data import DataError, Tokenized, build_data, collate, load_records, load_splits, masked, read_cache, write_cache
from finetune.tasks import IGNORE_INDEX, build_task
from tests.conftest import write_pairs
from tests.unit.test_gpu_paths import one_rank  # noqa: F401 (a fixture: one in-process gloo rank)

WORDS = ["the", "cat", "dog", "red", "blue", "sun", "one", "two"]  # single GPT-2 tokens


@pytest.fixture(scope="module")
def gpt2():
    tokenizer = gpt2_tokenizer()
    build_task("preference", DataConfig()).prepare_tokenizer(tokenizer)
    return tokenizer


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"chosen": "a", "rejected": "b"}, "row 2: missing field 'prompt'"),
        ({"prompt": "p", "rejected": "b"}, "row 2: missing field 'chosen'"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "row 2: fields 'chosen' and 'rejected' are the same text"),
        ({"prompt": "p", "chosen": "a", "rejected": "  "}, "row 2: field 'rejected' is empty"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "row 2: field 'chosen' must be a string, got int"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "chosen": "a", "rejected": "b"}, "row 2: the conversation must end with a user message"),
        ({"messages": [{"role": "user", "content": 5}], "chosen": "a", "rejected": "b"}, "row 2: message 1 field 'content' must be a string"),
        ({"messages": [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}, "row 2: the conversation must open with a user message"),
    ],
)
def test_bad_rows_name_the_file_and_row(tmp_path, row, problem):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "fine", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        load_records(str(path), build_task("preference", DataConfig()))
    assert str(err.value).startswith(f"{path} {problem}"), str(err.value)
    assert "\n" not in str(err.value)


def test_plain_and_chat_pairs_score_only_the_replies(gpt2):
    task = build_task("preference", DataConfig())
    sample, length = task.tokenize(gpt2, {"prompt": "Say hi.\n", "chosen": "hi", "rejected": "no"}, max_length=64)
    prompt = ids(gpt2, "Say hi.\n")
    for prefix, reply in (("", "hi"), ("rejected_", "no")):
        tokens = ids(gpt2, reply) + [gpt2.eos_token_id]
        assert sample[f"{prefix}input_ids"] == prompt + tokens
        assert sample[f"{prefix}labels"] == [IGNORE_INDEX] * len(prompt) + tokens
    messages = [{"role": "user", "content": "Say hi."}]
    sample, _ = task.tokenize(gpt2, {"messages": messages, "chosen": "hi", "rejected": "no"}, max_length=64)
    prompt = gpt2.apply_chat_template(messages, add_generation_prompt=True)
    full = gpt2.apply_chat_template([*messages, {"role": "assistant", "content": "hi"}])
    assert sample["input_ids"] == full and sample["labels"] == [IGNORE_INDEX] * len(prompt) + full[len(prompt) :]
    assert gpt2.decode(full[len(prompt) :]) == "hi" + gpt2.eos_token


def test_long_prompts_keep_their_end_and_pairs_whose_reply_does_not_fit_are_dropped(gpt2):
    task = build_task("preference", DataConfig())
    prompt = ids(gpt2, " ".join(WORDS * 4))  # 32 tokens
    reply = ids(gpt2, "one two three") + [gpt2.eos_token_id]
    sample, length = task.tokenize(gpt2, {"prompt": " ".join(WORDS * 4), "chosen": "one two three", "rejected": "no"}, max_length=12)
    assert length == len(prompt) + len(reply) > 12
    assert sample["input_ids"] == prompt[-(12 - len(reply)) :] + reply and len(sample["input_ids"]) == 12  # the prompt's end, then the whole reply
    assert sample["rejected_input_ids"][: 12 - len(reply)] == prompt[-(12 - len(reply)) :]  # the same prompt tokens for both replies
    assert task.tokenize(gpt2, {"prompt": "p", "chosen": "one two three", "rejected": "no"}, max_length=len(reply))[0] is None  # no room for a prompt token


def test_dropped_pairs_are_counted_and_cut_prompts_too(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Question {i}: " + "why " * (30 if i % 3 == 0 else 1), "chosen": "because " * (20 if i % 4 == 1 else 1), "rejected": "no"} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(["task=preference", f"data.train_path={path}", "model.name=tiny-gpt2", "data.max_length=16", "data.eval_fraction=0.2"], world_size=1)
    splits = load_splits(cfg.data, cfg.train.seed, cfg.task)
    data = build_data(cfg.data, gpt2_tokenizer(), splits)
    too_long_reply = sum(1 for r in rows if "because because" in r["chosen"])
    cut_prompt = sum(1 for r in rows if "why why" in r["prompt"] and "because because" not in r["chosen"])
    assert data.dropped == too_long_reply and data.truncated == cut_prompt
    assert len(data.train) + len(data.eval) == len(rows) - too_long_reply
    assert all(len(s["input_ids"]) <= 16 and len(s["rejected_input_ids"]) <= 16 for s in data.train + data.eval)
    again = build_data(cfg.data, gpt2_tokenizer(), splits)  # from the cache: the pairs as tokenized
    assert again.cache.startswith("hit") and again.train == data.train and again.eval == data.eval


def test_pairs_collate_side_by_side_and_filler_pairs_weigh_nothing(tmp_path):
    pairs = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "rejected_input_ids": [1, 2, 4, 5], "rejected_labels": [-100, 2, 4, 5]}, {"input_ids": [7, 8], "labels": [-100, 8], "rejected_input_ids": [7, 9], "rejected_labels": [-100, 9]}]
    batch = collate(pairs, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [1, 2, 4, 5], [7, 8, 0, 0], [7, 9, 0, 0]]  # pair i: rows 2i (chosen) and 2i+1 (rejected)
    assert batch["labels"][0].tolist() == [-100, 2, 3, -100] and batch["attention_mask"][2].tolist() == [1, 1, 0, 0]
    filler = masked(pairs[0])
    assert filler["input_ids"] == pairs[0]["input_ids"] and set(filler["labels"] + filler["rejected_labels"]) == {IGNORE_INDEX}
    write_cache(tmp_path / "c.npz", Tokenized(pairs, [0, 0], torch.zeros(1, 4, dtype=torch.int64).numpy()))
    assert read_cache(tmp_path / "c.npz").samples == pairs


def config_problems(*overrides: str, world_size: int = 1, has_cuda: bool = False) -> list[str]:
    return validate(build_config(parse_args(["task=preference", "data.train_path=x.jsonl", "model.name=tiny-gpt2", *overrides])), world_size, has_cuda)


@pytest.mark.parametrize(
    "task, overrides, line",
    [
        ("preference", ["preference.loss=dpx"], "preference.loss: unknown value 'dpx' (did you mean 'dpo'?); choose from dpo, ipo, hinge, simpo, orpo"),
        ("preference", ["preference.beta=0"], "preference.beta: must be positive, got 0.0"),
        ("preference", ["preference.beta=inf"], "preference.beta: must be a finite number, got inf"),
        ("preference", ["preference.label_smoothing=0.5"], "preference.label_smoothing: must be in [0, 0.5), got 0.5"),
        ("preference", ["preference.orpo_lambda=-1", "preference.loss=orpo"], "preference.orpo_lambda: must not be negative, got -1.0"),
        ("preference", ["preference.loss=ipo", "preference.label_smoothing=0.1"], "preference.label_smoothing: preference.loss=ipo does not use it; drop it or choose an objective that does"),
        ("preference", ["preference.loss=dpo", "preference.simpo_gamma=1"], "preference.simpo_gamma: preference.loss=dpo does not use it; drop it or choose an objective that does"),
        ("preference", ["data.packing=true"], "data.packing=true with task=preference: a pair's two sequences are scored whole, side by side; set data.packing=false"),
        ("preference", ["--config", "booster_configs/tp2.yaml", "train.loss_chunks=off"], "task=preference with plugin.tp_size>1 and train.loss_chunks=off: the pair log-probabilities are taken from the chunked loss"),
        ("preference", ["--config", "booster_configs/tp2_pp2.yaml", "train.loss_chunks=off"], "task=preference with plugin.tp_size>1 and train.loss_chunks=off: the pair log-probabilities are taken from the chunked loss"),
        ("preference", ["--config", "booster_configs/tp2.yaml", "model.name=tiny-llama", "plugin.sp_mode=split_gather"], "task=preference with sequence parallelism"),
        ("preference", ["--config", "booster_configs/pp2_interleaved.yaml"], "task=preference with plugin.pp_style=interleaved: the reference and eval passes run the schedule forward-only"),
        # the schedule slices rows: 3 of a 6-row batch (3 pairs) would put pair 1's chosen and rejected in different micro-batches
        ("preference", ["--config", "booster_configs/pp2.yaml", "train.batch_size=3", "plugin.num_microbatches=0", "plugin.microbatch_size=3"], "plugin.microbatch_size=3 with task=preference: the schedule slices rows, 2 per sample"),
        ("preference", ["--config", "booster_configs/pp2.yaml", "train.batch_size=3", "plugin.num_microbatches=0", "plugin.microbatch_size=4"], "train.batch_size=3 (6 rows) must be divisible by plugin.microbatch_size=4"),
        ("preference", ["plugin.name=gemini", "train.precision=bf16"], "task=preference under gemini is not built yet"),
        ("reward", ["preference.loss=ipo"], "preference.loss: task=reward trains with the Bradley-Terry loss, which reads no preference setting; drop it"),
        ("reward", ["preference.beta=0.5", "preference.simpo_gamma=1"], "preference.beta, preference.simpo_gamma: task=reward trains with the Bradley-Terry loss"),
        ("reward", ["data.packing=true"], "data.packing=true with task=reward: a pair's two sequences are scored whole"),
        ("reward", ["--config", "booster_configs/tp2.yaml"], "task=reward with plugin.tp_size>1: ColossalAI 0.5.0 splits the sequence-classification head"),
        ("reward", ["--config", "booster_configs/pp2.yaml"], "task=reward with plugin.pp_size>1 is not built: the pipeline's last stage would need the one-output score head's forward"),
        ("reward", ["plugin.name=gemini", "train.precision=bf16"], "task=reward under gemini is not built yet"),
    ],
)
def test_config_problems_are_one_line_each(task, overrides, line, monkeypatch):
    from tests.conftest import REPO

    monkeypatch.chdir(REPO)
    problems = config_problems(f"task={task}", *overrides, world_size=2, has_cuda="plugin.name=gemini" in overrides)
    assert any(p.startswith(line) for p in problems), problems
    assert all("\n" not in p for p in problems)


TP2, TP2_LORA, PP2, TP2_PP2 = (["--config", f"booster_configs/{name}.yaml"] for name in ("tp2", "tp2_lora", "pp2", "tp2_pp2"))


@pytest.mark.parametrize(
    "overrides",
    [
        [], ["method=full"], ["preference.loss=simpo", "method=full"], ["preference.loss=orpo", "method=full"], ["plugin.name=torch_fsdp"], ["plugin.name=low_level_zero", "plugin.stage=2"],
        TP2_LORA, [*TP2_LORA, "model.name=tiny-llama", "preference.loss=ipo"], [*TP2, "method=full"], [*TP2_LORA, "method=qlora", "model.name=tiny-llama-wide", "quantization.double_quant=false"],
        [*PP2], [*PP2, "method=full"], [*PP2, "preference.loss=ipo"], [*PP2, "plugin.num_microbatches=0", "plugin.microbatch_size=4"],  # 4 rows: 2 whole pairs per micro-batch
        [*TP2_PP2, "method=lora", "model.name=tiny-llama"], [*TP2_PP2, "method=full"],  # 4 ranks
    ],
)
def test_supported_setups_have_no_problems(overrides, tmp_path, monkeypatch):
    from tests.conftest import REPO

    monkeypatch.chdir(REPO)
    data = write_pairs(tmp_path / "pairs.jsonl")
    world_size = 4 if overrides[:2] == TP2_PP2 else 2  # tp x pp needs tp_size * pp_size ranks
    assert config_problems(*overrides, f"data.train_path={data}", world_size=world_size) == []


# --- each objective's first step against its paper's formula --------------------------------------------------


def plain_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's reply tokens, their count), from the model's logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets, scored = batch["labels"][:, 1:], batch["labels"][:, 1:] != -100
    token_logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
    return (token_logps * scored).sum(1), scored.sum(1)


def paper_formula(loss: str, s, policy: tuple, reference: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen reward, rejected reward) as each paper writes it (see docs/preference.md)."""
    (pc, pr), (nc, nr), (rc, rr) = policy[0], policy[1], reference
    if loss in ("dpo", "ipo", "hinge"):
        chosen_reward, rejected_reward = s.beta * (pc - rc), s.beta * (pr - rr)
        h = (pc - rc) - (pr - rr)  # log [pi(yw|x) pi_ref(yl|x) / (pi(yl|x) pi_ref(yw|x))]
        if loss == "dpo":  # Rafailov et al. 2023 (Eq. 7); conservative DPO's label smoothing eps
            per_pair = -(1 - s.label_smoothing) * F.logsigmoid(s.beta * h) - s.label_smoothing * F.logsigmoid(-s.beta * h)
        elif loss == "ipo":  # Azar et al. 2023 (Eq. 17): (h - 1/(2 tau))^2
            per_pair = (h - 1 / (2 * s.beta)) ** 2
        else:  # SLiC-HF's calibration hinge on the log-ratio margin: max(0, 1 - beta h)
            per_pair = torch.clamp(1 - s.beta * h, min=0)
        return per_pair, chosen_reward, rejected_reward
    mean_c, mean_r = pc / nc, pr / nr
    if loss == "simpo":  # Meng et al. 2024 (Eq. 6): -log sigma(beta/|yw| log pi(yw|x) - beta/|yl| log pi(yl|x) - gamma)
        return -F.logsigmoid(s.beta * mean_c - s.beta * mean_r - s.simpo_gamma), s.beta * mean_c, s.beta * mean_r
    # ORPO, Hong et al. 2024 (Eq. 6-7): L_SFT + lambda * L_OR, odds(y|x) = P / (1 - P), P the mean token likelihood
    odds_c, odds_r = torch.exp(mean_c) / (1 - torch.exp(mean_c)), torch.exp(mean_r) / (1 - torch.exp(mean_r))
    return -mean_c - s.orpo_lambda * F.logsigmoid(torch.log(odds_c / odds_r)), s.beta * mean_c, s.beta * mean_r


OBJECTIVE_SETTINGS = {
    "dpo": ["preference.label_smoothing=0.1"],
    "ipo": [],
    "hinge": [],
    "simpo": ["preference.simpo_gamma=0.3"],
    "orpo": ["preference.orpo_lambda=0.5"],
}


@pytest.mark.parametrize("loss", list(OBJECTIVE_SETTINGS))
def test_first_step_matches_the_papers_formula(loss, one_rank, tmp_path, monkeypatch):  # noqa: F811
    from peft import get_peft_model

    from finetune.data import batches_forever
    from finetune.faults import Faults
    from finetune.model import build_lora_config, build_model
    from finetune.preference import pair_means
    from finetune.run import build_run

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    args = ["task=preference", f"data.train_path={write_pairs(tmp_path / 'pairs.jsonl')}", "model.name=tiny-gpt2", "method=lora", "lora.dropout=0",
            f"preference.loss={loss}", "preference.beta=0.5", "train.batch_size=4", "data.max_length=48", f"output_dir={tmp_path / 'out'}", *OBJECTIVE_SETTINGS[loss]]  # fmt: skip
    cfg = load_config(args, world_size=1)
    splits = load_splits(cfg.data, cfg.train.seed, cfg.task)
    model, tokenizer = build_model(cfg.model, cfg.train.seed)
    data = build_data(cfg.data, tokenizer, splits)
    run, dataloader = build_run(cfg, world_size=1, device=torch.device("cpu"), task=splits.task, model=model, pending=None, samples=data.train,
                                pad_token_id=tokenizer.pad_token_id, faults=Faults(""), preemption=None)  # fmt: skip
    # A fresh adapter is the identity (lora_B = 0): the policy would equal the reference. Give it weights.
    generator = torch.Generator().manual_seed(1)
    for name, parameter in run.model.unwrap(unwrap_peft=False).named_parameters():
        if "lora_B" in name:
            parameter.data.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    _, micro_batches = next(batches_forever(dataloader, 1, run.steps_per_epoch))
    loss_value = run.plugin.forward_backward(run, micro_batches)
    got = pair_means(run.objective.take_step_sums())

    policy_base, _ = build_model(cfg.model, cfg.train.seed)
    policy = get_peft_model(policy_base, build_lora_config(policy_base, cfg.lora))
    policy.load_state_dict(run.model.unwrap(unwrap_peft=False).state_dict())
    reference_model, _ = build_model(cfg.model, cfg.train.seed)  # a second copy of the base: the reference
    batch = micro_batches[0]
    with torch.no_grad():
        reference_sums, _ = plain_logps(reference_model, batch)
    sums, counts = plain_logps(policy, batch)
    expected, chosen_reward, rejected_reward = paper_formula(loss, cfg.preference, ((sums[0::2], sums[1::2]), (counts[0::2], counts[1::2])), (reference_sums[0::2], reference_sums[1::2]))
    expected.mean().backward()  # the gradients the tool's step applies must be the formula's too
    tool_grads = {name: p.grad for name, p in run.model.unwrap(unwrap_peft=False).named_parameters() if p.requires_grad}
    for name, parameter in policy.named_parameters():
        if parameter.requires_grad:
            assert torch.allclose(tool_grads[name], parameter.grad, atol=1e-6, rtol=1e-4), f"{name}: gradient differs by {(tool_grads[name] - parameter.grad).abs().max()}"
    sums, chosen_reward, rejected_reward = sums.detach(), chosen_reward.detach(), rejected_reward.detach()
    assert got["pairs"] == cfg.train.batch_size
    assert abs(loss_value - expected.mean().item()) <= 1e-5 * max(1.0, abs(expected.mean().item())), (loss_value, expected.mean().item())
    assert got["loss"] == pytest.approx(expected.mean().item(), abs=1e-5, rel=1e-5)
    assert got["reward_chosen"] == pytest.approx(chosen_reward.mean().item(), abs=1e-5, rel=1e-5)
    assert got["reward_rejected"] == pytest.approx(rejected_reward.mean().item(), abs=1e-5, rel=1e-5)
    assert got["margin"] == pytest.approx((chosen_reward - rejected_reward).mean().item(), abs=1e-5, rel=1e-5)
    assert got["accuracy"] == (chosen_reward > rejected_reward).float().mean().item()
    assert got["logp_chosen"] == pytest.approx(sums[0::2].mean().item(), abs=1e-4, rel=1e-5)
    assert got["logp_rejected"] == pytest.approx(sums[1::2].mean().item(), abs=1e-4, rel=1e-5)
    assert abs(got["reward_chosen"] - got["reward_rejected"]) > 1e-3, "policy and reference agree: the comparison would prove little"


def test_injected_adapters_switch_off_for_the_reference_and_back_on():
    """hybrid_parallel injects adapters without a PeftModel (no disable_adapter): lora_tp.adapters_disabled gives the base
    model's output inside, the adapted one after, and leaves what trains as it was."""
    from finetune.config import LoraConfig
    from finetune.lora_tp import adapters_disabled
    from finetune.model import build_lora_config, build_model, inject_lora

    cfg = load_config(["model.name=tiny-llama"], world_size=1)
    base, _ = build_model(cfg.model, 0)
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model = inject_lora(base, build_lora_config(base, LoraConfig(dropout=0.0)))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter)  # a fresh adapter is the identity: give it weights
    trains = {name for name, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with adapters_disabled(model):
            off = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert torch.equal(off, want) and not torch.allclose(adapted, want) and torch.equal(again, adapted)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trains


def test_log_sigmoid_matches_torch_in_value_and_gradient_at_zero_and_far_out():
    """A first DPO step under LoRA has every margin exactly 0 (the adapter starts as the identity): the gradient there must be 1/2."""
    from finetune.tasks.objectives import log_sigmoid

    x = torch.tensor([0.0, 1e-3, -1e-3, 5.0, -5.0, 80.0, -80.0, 200.0, -200.0], dtype=torch.float64, requires_grad=True)
    ours = log_sigmoid(x)
    (grad,) = torch.autograd.grad(ours.sum(), x)
    y = x.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(F.logsigmoid(y).sum(), y)
    assert torch.allclose(ours, F.logsigmoid(x), atol=1e-12) and torch.allclose(grad, want, atol=1e-12)
    assert grad[0].item() == 0.5


def test_full_fine_tuning_with_stored_reference_matches_the_two_model_computation(one_rank, tmp_path, monkeypatch):  # noqa: F811
    """Full fine-tuning holds one model: the starting model's log-probabilities are computed once (attach_reference),
    cached and read per batch. Three DPO steps must match a plain loop that holds a second, frozen model copy."""
    from finetune.data import batches_forever
    from finetune.faults import Faults
    from finetune.model import build_model
    from finetune.preference import attach_reference, stores_reference
    from finetune.run import build_run, build_scheduler

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    args = ["task=preference", f"data.train_path={write_pairs(tmp_path / 'pairs.jsonl')}", "model.name=tiny-gpt2", "method=full", "preference.beta=0.5",
            "train.batch_size=4", "data.max_length=48", "train.lr=1e-3", "train.warmup_steps=0", "train.max_steps=3", f"output_dir={tmp_path / 'out'}"]  # fmt: skip
    cfg = load_config(args, world_size=1)
    splits = load_splits(cfg.data, cfg.train.seed, cfg.task)
    model, tokenizer = build_model(cfg.model, cfg.train.seed)
    data = build_data(cfg.data, tokenizer, splits)
    run, dataloader = build_run(cfg, world_size=1, device=torch.device("cpu"), task=splits.task, model=model, pending=None, samples=data.train,
                                pad_token_id=tokenizer.pad_token_id, faults=Faults(""), preemption=None)  # fmt: skip
    assert stores_reference(run.objective)
    assert attach_reference(cfg, run.model, run.layout, data.train + data.eval, 3, tokenizer.pad_token_id, torch.device("cpu")).startswith("computed by the starting model, cached")
    stored = [s["reference_logps"] for s in data.train + data.eval]
    fresh = [dict(s) for s in data.train + data.eval]
    assert attach_reference(cfg, run.model, run.layout, fresh, 5, tokenizer.pad_token_id, torch.device("cpu")).startswith("cache hit")
    assert [s["reference_logps"] for s in fresh] == stored

    policy, _ = build_model(cfg.model, cfg.train.seed)
    reference_model, _ = build_model(cfg.model, cfg.train.seed)  # the second copy the tool does without
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.train.lr, fused=True)
    scheduler = build_scheduler(optimizer, cfg, cfg.train.max_steps)
    steps = batches_forever(dataloader, 1, run.steps_per_epoch)
    for step in range(cfg.train.max_steps):
        _, micro_batches = next(steps)
        got = run.plugin.forward_backward(run, micro_batches)
        run.plugin.step(run, cfg.train.max_grad_norm)
        run.optimizer.zero_grad()
        run.scheduler.step()
        batch = micro_batches[0]
        with torch.no_grad():
            reference_sums, _ = plain_logps(reference_model, batch)
        sums, counts = plain_logps(policy, batch)
        expected, _, _ = paper_formula("dpo", cfg.preference, ((sums[0::2], sums[1::2]), (counts[0::2], counts[1::2])), (reference_sums[0::2], reference_sums[1::2]))
        expected.mean().backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        assert abs(got - expected.mean().item()) <= 1e-5, f"step {step + 1}: loss {got} vs two-model {expected.mean().item()}"
    assert got < 0.69, "DPO did not move the policy off the reference: the comparison would prove little"


ONE_LOG_SOFTMAX_BLOCK = LOG_SOFTMAX_ROWS * 4 * 50257  # fp32 rows of tiny-gpt2's vocabulary


def test_the_estimator_counts_both_sequences_of_a_pair_and_the_reference_pass():
    """A pair batch of B samples holds 2B rows; an objective with a reference adds a no-grad forward of them."""
    from finetune.estimate.memory import estimate

    def activations(*overrides: str):
        cfg = build_config(parse_args(["model.name=tiny-gpt2", "train.batch_size=4", "eval.batch_size=1", *overrides]))
        est = estimate(cfg, world_size=1, seq_len=64, device="cpu")
        return est.activations, est.eval_activations

    # Beside the tokens' terms, each peak holds log_softmax's output for 64 rows of tiny-gpt2's vocabulary: once, however
    # many tokens (finetune.chunked_loss._log_softmax_in_place)
    sft_train, sft_eval = (value - ONE_LOG_SOFTMAX_BLOCK for value in activations("task=instruction"))
    pair_train, pair_eval = (value - ONE_LOG_SOFTMAX_BLOCK for value in activations("task=preference", "preference.loss=dpo"))
    simpo_train, simpo_eval = (value - ONE_LOG_SOFTMAX_BLOCK for value in activations("task=preference", "preference.loss=simpo"))
    assert pair_train == pytest.approx(2 * sft_train, abs=2) == simpo_train
    assert simpo_eval == pytest.approx(2 * sft_eval, abs=2)  # eval scores both sequences of each pair
    assert pair_eval == pytest.approx(8 * sft_eval, abs=8)  # the reference forward: the whole train batch (4 pairs, 8 rows) without gradients


def test_pair_metrics_reach_metrics_jsonl_and_the_trackers():
    from types import SimpleNamespace

    from finetune.outputs import eval_metrics, step_metrics
    from finetune.preference import PAIR_METRICS, pair_means
    from finetune.tracking import scalars

    means = pair_means([1.2, 0.4, -0.2, 0.6, 1.0, -30.0, -40.0, 2.0])  # sums over 2 pairs
    assert means == {"loss": 0.6, "reward_chosen": 0.2, "reward_rejected": -0.1, "margin": 0.3, "accuracy": 0.5, "logp_chosen": -15.0, "logp_rejected": -20.0, "pairs": 2}
    record = step_metrics(3, 0, 0.6, 1e-3, 100, 2.0, SimpleNamespace(current_bytes=1, peak_bytes=2), 0.5, means)
    assert {key: record[key] for key in PAIR_METRICS if key != "loss"} == {key: means[key] for key in PAIR_METRICS if key != "loss"}
    tags = scalars(record) | scalars(eval_metrics(3, means))
    assert tags["train/margin"] == 0.3 and tags["train/accuracy"] == 0.5 and tags["eval/margin"] == 0.3 and tags["eval/logp_rejected"] == -20.0


@pytest.mark.parametrize("loss", list(OBJECTIVE_SETTINGS))
def test_eval_filler_pairs_count_nowhere(loss, tmp_path, monkeypatch):
    """Eval pads a rank's last batch with filler pairs (no reply token): they must not change any metric, not even
    ORPO's, whose odds of an empty reply are infinite."""
    from finetune.evaluation import evaluate_pairs
    from finetune.model import build_model
    from finetune.preference import pair_objective

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    cfg = load_config(["task=preference", f"data.train_path={write_pairs(tmp_path / 'pairs.jsonl')}", "model.name=tiny-gpt2", "method=full", f"preference.loss={loss}"], world_size=1)
    model, tokenizer = build_model(cfg.model, cfg.train.seed)
    samples = build_data(cfg.data, tokenizer, load_splits(cfg.data, cfg.train.seed, cfg.task)).train[:5]
    for sample in samples:  # the reference, as attach_reference leaves it: here the policy's own log-probs shifted
        sample["reference_logps"] = [-30.0, -20.0]
    objective = pair_objective(cfg, build_task("preference", cfg.data), model.eval(), None)
    forward = lambda batch: objective.batch_sums(batch)[1]  # noqa: E731
    whole = evaluate_pairs(forward, samples, 5, tokenizer.pad_token_id, torch.device("cpu"), None)
    padded = evaluate_pairs(forward, samples, 3, tokenizer.pad_token_id, torch.device("cpu"), None)  # a second batch of 2 pairs and a filler
    assert whole["pairs"] == padded["pairs"] == 5
    assert all(math.isfinite(whole[key]) and whole[key] == pytest.approx(padded[key], rel=1e-5, abs=1e-6) for key in whole), (whole, padded)


# --- task=reward: a one-output sequence classifier trained on the same pairs with Bradley-Terry ----------------


def plain_scores(model, batch: dict) -> torch.Tensor:
    """Each row's score: a plain HF sequence classifier's one output (its own pooling at the last non-pad token)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_reward_first_step_matches_bradley_terry_on_a_plain_classifier(method, one_rank, tmp_path, monkeypatch):  # noqa: F811
    from peft import get_peft_model

    from finetune.data import batches_forever
    from finetune.faults import Faults
    from finetune.model import build_lora_config, build_model
    from finetune.preference import REWARD_METRICS, pair_means
    from finetune.run import build_run

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    args = ["task=reward", f"data.train_path={write_pairs(tmp_path / 'pairs.jsonl')}", "model.name=tiny-gpt2", f"method={method}", "lora.dropout=0",
            "train.batch_size=4", "data.max_length=48", f"output_dir={tmp_path / 'out'}"]  # fmt: skip
    cfg = load_config(args, world_size=1)
    splits = load_splits(cfg.data, cfg.train.seed, cfg.task)
    model, tokenizer = build_model(cfg.model, cfg.train.seed, labels=splits.task.labels_or_none)
    assert type(model).__name__ == "GPT2ForSequenceClassification" and model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id  # HF's pooling finds each row's last token by it
    data = build_data(cfg.data, tokenizer, splits)
    run, dataloader = build_run(cfg, world_size=1, device=torch.device("cpu"), task=splits.task, model=model, pending=None, samples=data.train,
                                pad_token_id=tokenizer.pad_token_id, faults=Faults(""), preemption=None)  # fmt: skip
    trained = run.model.unwrap(unwrap_peft=False)
    if method == "lora":
        assert trained.peft_config["default"].task_type == "SEQ_CLS" and trained.score.modules_to_save["default"].weight.requires_grad  # the head trains
        generator = torch.Generator().manual_seed(1)
        for name, parameter in trained.named_parameters():
            if "lora_B" in name:  # a fresh adapter is the identity: give it weights, so the comparison covers it
                parameter.data.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    _, micro_batches = next(batches_forever(dataloader, 1, run.steps_per_epoch))
    batch = micro_batches[0]
    assert (batch["input_ids"] == tokenizer.pad_token_id).any(), "no padded row: the pooling would not be tested"
    loss_value = run.plugin.forward_backward(run, micro_batches)
    got = pair_means(run.objective.take_step_sums())

    plain, _ = build_model(cfg.model, cfg.train.seed, labels=splits.task.labels_or_none)
    if method == "lora":
        plain = get_peft_model(plain, build_lora_config(plain, cfg.lora))
    plain.load_state_dict(trained.state_dict())
    scores = plain_scores(plain, batch)
    chosen, rejected = scores[0::2], scores[1::2]
    expected = -F.logsigmoid(chosen - rejected)  # Bradley-Terry: P(chosen preferred) = sigmoid(score difference)
    expected.mean().backward()
    tool_grads = {name: p.grad for name, p in trained.named_parameters() if p.requires_grad}
    for name, parameter in plain.named_parameters():
        if parameter.requires_grad:
            assert torch.allclose(tool_grads[name], parameter.grad, atol=1e-6, rtol=1e-4), f"{name}: gradient differs by {(tool_grads[name] - parameter.grad).abs().max()}"
    chosen, rejected = chosen.detach(), rejected.detach()
    assert set(got) == {*REWARD_METRICS, "pairs"} and got["pairs"] == cfg.train.batch_size
    assert abs(loss_value - expected.mean().item()) <= 1e-5, (loss_value, expected.mean().item())
    assert got["loss"] == pytest.approx(expected.mean().item(), abs=1e-5, rel=1e-5)
    assert got["reward_chosen"] == pytest.approx(chosen.mean().item(), abs=1e-5, rel=1e-5)
    assert got["reward_rejected"] == pytest.approx(rejected.mean().item(), abs=1e-5, rel=1e-5)
    assert got["margin"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-5, rel=1e-5)
    assert got["accuracy"] == (chosen > rejected).float().mean().item()
    assert (chosen - rejected).abs().min() > 1e-4, "tied scores: the accuracy would prove little"


@pytest.mark.parametrize("overrides", [[], ["method=full"], ["plugin.name=torch_fsdp"], ["plugin.name=low_level_zero", "plugin.stage=2"]])
def test_reward_supported_setups_have_no_problems(overrides, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    assert config_problems("task=reward", *overrides, f"data.train_path={data}", world_size=2) == []


def test_the_estimator_counts_no_reference_pass_for_a_reward_model():
    from finetune.estimate.memory import estimate

    def eval_activations(task: str, batch_size: int) -> float:
        cfg = build_config(parse_args(["model.name=tiny-gpt2", f"train.batch_size={batch_size}", "eval.batch_size=1", f"task={task}"]))
        return estimate(cfg, world_size=1, seq_len=64, device="cpu").eval_activations

    assert eval_activations("reward", 4) == eval_activations("reward", 1)  # eval batches alone: no reference pass
    assert eval_activations("preference", 4) > 3 * eval_activations("preference", 1)  # DPO's reference pass: the train batch


def test_the_estimator_sizes_a_reward_model_by_its_score_head():
    """What task=reward builds: the decoder with a one-output score head (no vocabulary head, no vocabulary logits),
    the model a sequence classifier builds, on twice the rows (a chosen and a rejected sequence a pair)."""
    from finetune.estimate.memory import estimate

    def predicted(task: str):
        cfg = build_config(parse_args(["model.name=llama2-7b", "method=lora", "train.precision=bf16", "train.batch_size=2", "data.max_length=1024", f"task={task}"]))
        return estimate(cfg, world_size=1, device="cuda")

    reward, classifier, causal_lm = predicted("reward"), predicted("classification"), predicted("instruction")
    assert reward.setup["model_class"] == classifier.setup["model_class"] == "LlamaForSequenceClassification"
    lm_head = 32000 * 4096 * 2  # the untied head's bf16 weights, which a score head replaces
    assert causal_lm.weights - reward.weights == pytest.approx(lm_head, rel=1e-3)
    assert reward.weights == pytest.approx(classifier.weights, abs=4096 * 4)  # one output less: a row of the trained head
    assert reward.eval_activations == pytest.approx(2 * classifier.eval_activations, rel=1e-2)


def test_evaluate_scores_pairs_and_a_plain_model_is_its_own_reference(tmp_path, capsys):
    """finetune.evaluate on pairs: a plain model scored as its own DPO reference has margin 0 on every pair, so its
    loss is -log sigmoid(0) = log 2 and no pair counts as won; a plain model has no reward head to score with."""
    from finetune import evaluate

    data = write_pairs(tmp_path / "pairs.jsonl", n=6)
    assert evaluate.main(["tiny-llama", "--data", str(data), "--task", "preference", "--max-length", "64", "--json", str(tmp_path / "eval.json")]) == 0
    (result,) = json.loads((tmp_path / "eval.json").read_text())["models"]
    assert result["pairs"] == 6 and result["margin"] == 0.0 and result["accuracy"] == 0.0 and abs(result["loss"] - math.log(2)) < 1e-6, result  # fp32
    capsys.readouterr()
    assert evaluate.main(["tiny-llama", "--data", str(data), "--task", "reward"]) == 2
    assert capsys.readouterr().err == "error: --task reward: a plain model has no trained reward head; name a reward run or checkpoint\n"
