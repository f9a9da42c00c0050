"""Numerical fidelity of every CPU-runnable plugin setup.

Each case trains 5 steps with 2 gloo ranks (4 for tensor x pipeline) through finetune/train.py's main (real `torchrun`
launches, one per process count, each running its cases one after another: tests/run_many.py) and
repeats the same steps in this process with a plain single-process PyTorch loop: same model init,
same global batches (the distributed samplers' shards, put together), AdamW, the same schedule and
gradient clipping. Losses must match step by step and the saved final weights, loaded back the way a
user would, must match the reference model's.

The data makes every sample exactly as long as every other (prompt and response alike), so a mean over
any split of a batch (data-parallel shards, pipeline micro-batches) equals the mean over the whole
batch: the reference needs no knowledge of how a plugin splits its batches. RoBERTa cases classify
equal-length three-word texts (task=classification): the reference is a plain
RobertaForSequenceClassification (with peft's head-training LoRA) and its cross-entropy loss.
"""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.architectures import architecture, model_type
from finetune.config import ModelConfig, load_config, to_dict
from finetune.data import build_data, collate, load_splits, model_inputs
from finetune.methods import method_named
from finetune.model import base_quantization, build_lora_config, build_model
from finetune.packing import collate_packed, pack, packed_attention
from tests.conftest import REPO, read_metrics, run_grouped, selected_params

pytestmark = pytest.mark.distributed

STEPS = 5
# Single GPT-2 tokens with and without a leading space, so every record tokenizes to the same length.
WORDS = ["the", "cat", "dog", "red", "blue", "sun", "one", "two"]

# (config file, model, method, overrides, data-parallel size, tolerances). fp32: losses within 1e-5
# (relative to max(1, loss)) and saved weights within 1e-4. bf16: losses within 3e-2, and since Adam
# turns bf16 rounding of tiny gradients into lr-sized steps, weights are compared by direction: the
# cosine between the run's and the reference's total update must exceed 0.95. Either way the weights
# must have moved by at least min_move, or the comparison would mean nothing.
FP32 = {"loss": 1e-5, "weights": 1e-4, "min_move": 1e-3}
LORA_TP = {**FP32, "weights": 1e-5}  # issue #10: gathered adapter weights within 1e-5
LLAMA_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
BF16 = {"loss": 3e-2, "update_cosine": 0.95, "min_move": 4e-2}
PACKED = ("data.packing=true", "data.max_length=128", "train.batch_size=2")
# A named config saved as a pretrained directory (safetensors): under hybrid_parallel LoRA and QLoRA then build it lazily,
# each rank loading its share after sharding (finetune.deferred); the reference loads the same directory whole.
SAVED = "saved:"
CASES = {
    "ddp-gpt2-full": ("torch_ddp", "tiny-gpt2", "full", [], 2, FP32),
    "ddp-llama-full": ("torch_ddp", "tiny-llama", "full", [], 2, FP32),
    "ddp-gpt2-lora": ("torch_ddp", "tiny-gpt2", "lora", [], 2, FP32),
    "ddp-llama-lora": ("torch_ddp", "tiny-llama", "lora", [], 2, FP32),
    "zero1-gpt2-full": ("zero1", "tiny-gpt2", "full", [], 2, FP32),
    "zero1-llama-full": ("zero1", "tiny-llama", "full", [], 2, FP32),
    "zero1-llama-lora": ("zero1", "tiny-llama", "lora", [], 2, FP32),
    "zero2-gpt2-full": ("zero2", "tiny-gpt2", "full", [], 2, FP32),
    "zero2-llama-full": ("zero2", "tiny-llama", "full", [], 2, FP32),
    "zero2-gpt2-lora": ("zero2", "tiny-gpt2", "lora", [], 2, FP32),
    "zero2-gpt2-lora-full-logits": ("zero2", "tiny-gpt2", "lora", ["train.loss_chunks=off"], 2, FP32),  # its twin above: the chunked loss
    # GPT-2 under TP with clipping: right only with finetune.fixes.colossalai's gradient norm of fused q/k/v splits.
    "tp2-gpt2-full": ("tp2", "tiny-gpt2", "full", [], 1, FP32),
    # LoRA under TP (finetune.lora_tp) on every layer it can adapt: column, row and fused q/k/v splits.
    "tp2-gpt2-lora": ("tp2_lora", "tiny-gpt2", "lora", ["lora.target_modules=[c_attn,c_fc,c_proj]"], 1, LORA_TP),
    "tp2-llama-lora": ("tp2_lora", f"{SAVED}tiny-llama", "lora", [f"lora.target_modules=[{LLAMA_PROJECTIONS}]"], 1, LORA_TP),  # the chunked loss, vocabulary split
    "tp2-llama-lora-full-logits": ("tp2_lora", f"{SAVED}tiny-llama", "lora", [f"lora.target_modules=[{LLAMA_PROJECTIONS}]", "train.loss_chunks=off"], 1, LORA_TP),
    "tp2_pp2-llama-lora": ("tp2_pp2", f"{SAVED}tiny-llama", "lora", [f"lora.target_modules=[{LLAMA_PROJECTIONS}]"], 1, LORA_TP),  # 4 ranks
    # its twin over the full logits: the loss above is taken in chunks on the last stage, the vocabulary split over tp
    "tp2_pp2-llama-lora-full-logits": ("tp2_pp2", f"{SAVED}tiny-llama", "lora", [f"lora.target_modules=[{LLAMA_PROJECTIONS}]", "train.loss_chunks=off"], 1, LORA_TP),  # 4 ranks
    "fsdp-gpt2-full": ("fsdp", "tiny-gpt2", "full", [], 2, FP32),
    "fsdp-llama-full": ("fsdp", "tiny-llama", "full", [], 2, FP32),
    "fsdp-llama-lora": ("fsdp", "tiny-llama", "lora", [], 2, FP32),
    # QLoRA under FSDP: the 4-bit weights stored as fp32 (bnb_4bit_quant_storage), flattened and sharded with the rest
    "fsdp-llama-qlora": ("fsdp", "tiny-llama", "qlora", [f"lora.target_modules=[{LLAMA_PROJECTIONS}]"], 2, FP32),
    # QLoRA under TP (finetune.qlora_tp): each rank quantizes its shards; LoRA on q/k/v/o (column and row splits with
    # adapters), gate/up/down 4-bit shards alone. tiny-llama-wide: every shard is whole 64-element blocks. One reference.
    "tp2-llama-qlora": ("tp2_lora", f"{SAVED}tiny-llama-wide", "qlora", ["quantization.double_quant=false"], 1, LORA_TP),
    "tp2_pp2-llama-qlora": ("tp2_pp2", "tiny-llama-wide", "qlora", ["quantization.double_quant=false"], 1, LORA_TP),  # 4 ranks
    "tp2-llama-full": ("tp2", "tiny-llama", "full", [], 1, FP32),
    "pp2-gpt2-full": ("pp2", "tiny-gpt2", "full", [], 1, FP32),
    "pp2-llama-full": ("pp2", "tiny-llama", "full", [], 1, FP32),
    "pp2-gpt2-lora": ("pp2", "tiny-gpt2", "lora", [], 1, FP32),
    "pp2-llama-lora": ("pp2", f"{SAVED}tiny-llama", "lora", [], 1, FP32),
    # The pp2 cases take the last stage's loss in chunks (train.loss_chunks=auto); these twins over the full logits.
    "pp2-llama-lora-full-logits": ("pp2", f"{SAVED}tiny-llama", "lora", ["train.loss_chunks=off"], 1, FP32),
    "pp2-gpt2-full-full-logits": ("pp2", "tiny-gpt2", "full", ["train.loss_chunks=off"], 1, FP32),
    "pp2_interleaved-gpt2-full": ("pp2_interleaved", "tiny-gpt2", "full", [], 1, FP32),
    "pp2_interleaved-llama-full": ("pp2_interleaved", "tiny-llama", "full", [], 1, FP32),
    "tp2_pp2-llama-full": ("tp2_pp2", "tiny-llama", "full", [], 1, FP32),  # 4 ranks
    "pp2_zero1-llama-full-bf16": ("pp2_zero1", "tiny-llama", "full", ["train.lr=2e-2"], 1, BF16),
    # RoBERTa through our shardformer policy (finetune/roberta_policy.py), on classification data.
    "tp2-roberta-full": ("tp2", "tiny-roberta", "full", ["task=classification"], 1, FP32),
    "pp2-roberta-full": ("pp2", "tiny-roberta", "full", ["task=classification"], 1, FP32),
    "pp2-roberta-lora": ("pp2", "tiny-roberta", "lora", ["task=classification"], 1, FP32),
    "tp2-roberta-lora": ("tp2_lora", "tiny-roberta", "lora", ["task=classification"], 1, LORA_TP),
    # Sequence parallelism (issue 27): all_to_all (Ulysses) over 2 ranks sharing each batch, and split_gather over the
    # tensor-parallel group at 4 ranks (tp2 x dp2; LoRA: finetune.lora_tp's sequence-parallel exchange). Packed rows
    # (3 samples each at 128 tokens; batch 2 keeps 5 steps) keep their sample boundaries: the reference packs alike.
    "sp2-llama-full": ("sp2_lora", "tiny-llama", "full", [], 1, FP32),
    "sp2-llama-lora": ("sp2_lora", "tiny-llama", "lora", [f"lora.target_modules=[{LLAMA_PROJECTIONS}]"], 1, FP32),
    "sp2-llama-full-packed": ("sp2_lora", "tiny-llama", "full", [*PACKED], 1, FP32),
    "sp2-llama-lora-packed": ("sp2_lora", "tiny-llama", "lora", [*PACKED], 1, FP32),
    "tp2_sp-llama-full": ("tp2", "tiny-llama", "full", ["plugin.sp_mode=split_gather"], 2, FP32),  # 4 ranks
    "tp2_sp-llama-lora": ("tp2_lora", "tiny-llama", "lora", [f"lora.target_modules=[{LLAMA_PROJECTIONS}]", "plugin.sp_mode=split_gather"], 2, LORA_TP),  # 4 ranks
    # ring: LoRA on the default q/k/v/o, so the MLP's frozen projections run ColossalAI's ring-overlapped layers
    # (full fine-tuning under ring is refused: their weight gradients are off)
    "tp2_ring-llama-lora": ("tp2_lora", "tiny-llama", "lora", ["plugin.sp_mode=ring"], 2, LORA_TP),  # 4 ranks
}
# Today's families (issue 26), each a tiny random config of its own architecture, under every plugin its
# record claims, one run each: DDP (LoRA on the family's default targets), ZeRO-2 and FSDP (full: one unit
# per block, from its _no_split_modules); where shardformer has a policy, tensor parallelism (LoRA on every
# layer finetune.lora_tp can split for it, on a split base) and a pipeline (full).
FAMILIES = ("mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral")
for family in FAMILIES:
    tiny, record = f"tiny-{family}", architecture(model_type(f"tiny-{family}"))
    CASES |= {f"ddp-{family}-lora": ("torch_ddp", tiny, "lora", [], 2, FP32), f"zero2-{family}-full": ("zero2", tiny, "full", [], 2, FP32), f"fsdp-{family}-full": ("fsdp", tiny, "full", [], 2, FP32)}
    if record.shardformer_policy:
        CASES[f"tp2-{family}-lora"] = ("tp2_lora", tiny, "lora", [f"lora.target_modules=[{','.join(record.lora_tp_layers)}]"], 1, LORA_TP)
        CASES[f"pp2-{family}-full"] = ("pp2", tiny, "full", [], 1, FP32)


RANKS = {"tp2_pp2": 4, "tp2_sp-llama-full": 4, "tp2_sp-llama-lora": 4, "tp2_ring-llama-lora": 4}  # processes per setup or case where 2 do not suffice
# A run whose loss is over the full logits (train.loss_chunks=off), and its twin with the default chunked loss.
FULL_LOGITS_TWINS = {
    "zero2-gpt2-lora-full-logits": "zero2-gpt2-lora",
    "tp2-llama-lora-full-logits": "tp2-llama-lora",
    "pp2-llama-lora-full-logits": "pp2-llama-lora",
    "pp2-gpt2-full-full-logits": "pp2-gpt2-full",
    "tp2_pp2-llama-lora-full-logits": "tp2_pp2-llama-lora",
}


@pytest.fixture(scope="module", autouse=True)
def fixed_stack():
    """The pinned stack's fixes, as every run applies them at launch: the QLoRA references quantize on CPU."""
    from finetune import fixes

    fixes.apply()


@pytest.fixture(scope="module")
def equal_length_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fidelity") / "repeat.jsonl"
    with path.open("w") as f:
        for a, b, c in itertools.islice(itertools.permutations(WORDS, 3), 48):
            f.write(json.dumps({"instruction": f"Repeat: {a} {b} {c}", "output": f"{a} {b} {c}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def equal_length_classification_data(tmp_path_factory) -> Path:
    """Three single-token words per text (5 RoBERTa tokens with <s> and </s>), labelled by the last word."""
    path = tmp_path_factory.mktemp("fidelity") / "classify.jsonl"
    with path.open("w") as f:
        for a, b, c in itertools.islice(itertools.permutations(WORDS, 3), 48):
            f.write(json.dumps({"text": f"{a} {b} {c}", "label": ("x", "y", "z")[WORDS.index(c) % 3]}) + "\n")
    return path


def run_args(config: str, model: str, method: str, extra: list[str], data: Path, out: Path) -> list[str]:
    return [
        "--config",
        str(REPO / "booster_configs" / f"{config}.yaml"),
        f"model.name={model}",
        f"method={method}",
        f"data.train_path={data}",
        "data.max_length=64",
        "data.eval_fraction=0.1",
        f"output_dir={out}",
        f"train.max_steps={STEPS}",
        "train.batch_size=4",
        "train.lr=5e-3",
        "train.warmup_steps=1",
        "train.max_grad_norm=1.0",
        "lora.dropout=0",
        "eval.num_generation_prompts=0",
        *extra,
    ]


def reference(args: list[str], dp_size: int):
    """Plain single-process training on the same global batches; returns (losses, model)."""
    from peft import get_peft_model
    from torch.utils.data import DistributedSampler
    from transformers import get_scheduler

    cfg = load_config(args, world_size=4)  # any size every setup here divides
    splits = load_splits(cfg.data, cfg.train.seed, cfg.task)
    model, tokenizer = build_model(cfg.model, cfg.train.seed, labels=splits.labels, quantization=base_quantization(cfg))  # qlora: bitsandbytes' own uint8 storage
    if method_named(cfg.method).adapter:
        torch.manual_seed(cfg.train.seed)
        model = get_peft_model(model, build_lora_config(model, cfg.lora))
    data = build_data(cfg.data, tokenizer, splits)
    assert len({len(s["input_ids"]) for s in data.train}) == 1, "fidelity data must be equal-length"
    if "labels" in data.train[0]:  # causal LM: as many scored tokens in every sample
        assert len({sum(label != -100 for label in s["labels"]) for s in data.train}) == 1
    rows, batch_of = data.train, functools.partial(collate, pad_token_id=tokenizer.pad_token_id)
    if cfg.data.packing:  # the run's packed rows, sampled like samples
        rows, batch_of = pack(data.train, cfg.data.max_length), functools.partial(collate_packed, pad_token_id=tokenizer.pad_token_id, attention=packed_attention(model))
    shards = [list(DistributedSampler(rows, num_replicas=dp_size, rank=r, shuffle=True, seed=cfg.train.seed)) for r in range(dp_size)]
    size = cfg.train.batch_size
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=STEPS)
    losses = []
    model.train()
    for step in range(STEPS):
        indices = [i for shard in shards for i in shard[step * size : (step + 1) * size]]
        batch = model_inputs(batch_of([rows[i] for i in indices]))
        loss = model(**batch).loss
        loss.backward()
        if cfg.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, model


def saved_weights(final: Path, method: str) -> dict[str, torch.Tensor]:
    """What the run saved, as a user loads it."""
    if method_named(method).adapter:
        return load_file(final / "adapter_model.safetensors")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto_model = AutoModelForSequenceClassification if (final / "labels.json").exists() else AutoModelForCausalLM
    return auto_model.from_pretrained(final).state_dict()


def reference_weights(model, method: str) -> dict[str, torch.Tensor]:
    if method_named(method).adapter:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return model.state_dict()


@pytest.fixture(scope="module")
def fidelity_runs(request, equal_length_data, equal_length_classification_data, tmp_path_factory) -> dict[str, tuple[list[str], Path, object]]:
    """Every selected case's run, (args, output dir, result): one torchrun launch per process count runs them all."""
    root = tmp_path_factory.mktemp("fidelity_runs")
    runs = {}
    twins = [c for case in selected_params(request, "test_chunked_loss_matches_the_full_logits_run") for c in (case, FULL_LOGITS_TWINS[case])]
    for case in dict.fromkeys([*selected_params(request, "test_matches_single_process_reference"), *twins]):
        config, model_name, method, extra, _, _ = CASES[case]
        data = equal_length_classification_data if "task=classification" in extra else equal_length_data
        runs[case] = (RANKS.get(case, RANKS.get(config, 2)), run_args(config, saved_model(model_name, root), method, extra, data, root / case))
    results = run_grouped(runs, root / "launches")
    return {case: (args, root / case, results[case]) for case, (_, args) in runs.items()}


def saved_model(model_name: str, root: Path) -> str:
    """model.name for a case's model: a named config as is; SAVED + a named config: it saved (once) under root."""
    if not model_name.startswith(SAVED):
        return model_name
    named = model_name.removeprefix(SAVED)
    path = root / "saved" / named
    if not path.exists():
        model, tokenizer = build_model(ModelConfig(name=named), seed=0)
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def references() -> dict[str, tuple[list[float], object, object]]:
    """reference_key -> (losses, trained model, untrained model): the cases that differ only in their plugin share one reference."""
    return {}


@pytest.mark.timeout(2400)  # the first case waits for the shared launches (each bounded by run_many)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_single_process_reference(case, fidelity_runs, references):
    config, model_name, method, extra, dp_size, tolerance = CASES[case]
    args, out, result = fidelity_runs[case]
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    expected, ref_model, init_model = shared_reference(references, args, dp_size, method)
    assert len(losses) == STEPS
    for step, (got, want) in enumerate(zip(losses, expected), start=1):
        assert abs(got - want) <= tolerance["loss"] * max(1.0, abs(want)), f"step {step}: loss {got} vs reference {want}"

    saved = saved_weights(out / "final", method)
    ref = reference_weights(ref_model, method)
    init = reference_weights(init_model, method)
    assert set(saved) == set(ref), sorted(set(saved) ^ set(ref))[:10]
    moved = max((ref[k].float() - init[k].float()).abs().max().item() for k in ref)
    assert moved > tolerance["min_move"], "training did not move the weights: the comparison would prove nothing"
    if method_named(method).adapter:
        assert_adapter_reloads(out / "final", args, ref_model)
    if method_named(method).quantized_base and config == "fsdp":
        assert_each_rank_holds_its_share(out)
    elif method_named(method).quantized_base:
        assert_ranks_hold_the_quantized_shards(out, ref_model)
    if "weights" in tolerance:
        diffs = {k: (saved[k].float() - ref[k].float()).abs().max().item() for k in saved}
        worst = max(diffs, key=diffs.get)
        assert diffs[worst] <= tolerance["weights"], f"saved {worst} differs from the reference by {diffs[worst]}"
    else:
        run_update = torch.cat([(saved[k].float() - init[k].float()).flatten() for k in sorted(saved)])
        ref_update = torch.cat([(ref[k].float() - init[k].float()).flatten() for k in sorted(saved)])
        cosine = torch.nn.functional.cosine_similarity(run_update, ref_update, dim=0).item()
        assert cosine > tolerance["update_cosine"], f"the run's weight update points elsewhere than the reference's (cosine {cosine:.3f})"


def reference_key(args: list[str], dp_size: int) -> str:
    """All that reference() and build_reference_init() read of a case: its config but the plugin and output_dir, and its data-parallel size."""
    config = {key: value for key, value in to_dict(load_config(args, world_size=4)).items() if key not in ("plugin", "output_dir")}
    return json.dumps({**config, "dp_size": dp_size}, sort_keys=True, default=str)


def shared_reference(references: dict, args: list[str], dp_size: int, method: str) -> tuple[list[float], object, object]:
    """reference()'s losses and trained model, and build_reference_init()'s model, made once per reference_key in `references`."""
    key = reference_key(args, dp_size)
    if key not in references:
        references[key] = (*reference(args, dp_size), build_reference_init(args, method))
    return references[key]


@pytest.mark.timeout(2400)  # waits for the shared launches, as above
@pytest.mark.parametrize("case", list(FULL_LOGITS_TWINS))
def test_chunked_loss_matches_the_full_logits_run(case, fidelity_runs):
    """train.loss_chunks on two ranks (the default) gives the losses of the same run over the full logits within 1e-6."""
    results = {c: fidelity_runs[c][2] for c in (case, FULL_LOGITS_TWINS[case])}
    for name, result in results.items():
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        assert ("loss in chunks of 1024 label tokens" in result.stdout) == (name != case), f"{name}: {result.stdout[-2000:]}"
    full, chunked = ([m["loss"] for m in read_metrics(fidelity_runs[c][1]) if "loss" in m] for c in results)
    assert len(full) == len(chunked) == STEPS
    for step, (got, want) in enumerate(zip(chunked, full), start=1):
        assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), f"step {step}: chunked loss {got} vs full logits {want}"


def assert_adapter_reloads(final: Path, args: list[str], ref_model) -> None:
    """The saved adapter, loaded by peft onto an unsharded base, gives the reference model's logits within 1e-4."""
    from peft import PeftModel

    cfg = load_config(args, world_size=4)
    splits = load_splits(cfg.data, cfg.train.seed, cfg.task)
    base, tokenizer = build_model(cfg.model, cfg.train.seed, labels=splits.labels, quantization=base_quantization(cfg))
    reloaded = PeftModel.from_pretrained(base, str(final)).eval()
    data = build_data(cfg.data, tokenizer, splits)
    batch = collate(data.train[:8], tokenizer.pad_token_id)
    ref_model.eval()
    with torch.no_grad():
        diff = (reloaded(**batch).logits - ref_model(**batch).logits).abs().max().item()
    assert diff <= 1e-4, f"the reloaded adapter's logits differ from the reference model's by {diff}"


def assert_each_rank_holds_its_share(out: Path) -> None:
    """FSDP shards the packed 4-bit data: the ranks' shares add up to the whole, about half each (measured after
    wrapping, in summary.json); the quantization state (absmax, code book) is whole on every rank."""
    weights = json.loads((out / "summary.json").read_text())["memory"]["model_weights"]
    whole, shares = weights["quantized"], [rank["quantized"] for rank in weights["per_rank"]]
    assert len(shares) == 2 and sum(share["packed_bytes"] for share in shares) == whole["packed_bytes"] > 0
    assert sum(share["params"] for share in shares) == whole["params"]
    state = whole["bytes"] - whole["packed_bytes"]
    for share in shares:
        assert 0.4 * whole["packed_bytes"] <= share["packed_bytes"] <= 0.6 * whole["packed_bytes"], (share, whole)
        assert share["bytes"] - share["packed_bytes"] == state


def assert_ranks_hold_the_quantized_shards(out: Path, ref_model) -> None:
    """Tensor (x pipeline) parallelism: the ranks' 4-bit shards (measured after sharding, in summary.json) add up to the
    reference's whole quantization, packed data and block scales (each shard with its own 16-entry code book); here
    every rank holds the same share (tiny-llama-wide's 2 layers: one per pipeline stage, each split in two)."""
    from finetune.quantization import quantized_modules, weight_bytes

    whole = weight_bytes(ref_model).as_dict()["quantized"]
    modules = dict(ref_model.named_modules())
    code_book = sum(modules[name].weight.quant_state.code.numel() * 4 for name in quantized_modules(ref_model))  # fp32 entries
    shares = [rank["quantized"] for rank in json.loads((out / "summary.json").read_text())["memory"]["model_weights"]["per_rank"]]
    assert sum(share["params"] for share in shares) == whole["params"] > 0
    assert sum(share["packed_bytes"] for share in shares) == whole["packed_bytes"]
    assert sum(share["bytes"] for share in shares) == whole["bytes"] + code_book  # the tensor-parallel pair: two code books per projection
    assert {share["packed_bytes"] for share in shares} == {whole["packed_bytes"] // len(shares)}, shares


def build_reference_init(args: list[str], method: str):
    """The untrained model (with its fresh adapter), to show the weights really moved."""
    from peft import get_peft_model

    cfg = load_config(args, world_size=4)  # any size every setup here divides
    model, _ = build_model(cfg.model, cfg.train.seed, labels=load_splits(cfg.data, cfg.train.seed, cfg.task).labels, quantization=base_quantization(cfg))
    if method_named(method).adapter:
        torch.manual_seed(cfg.train.seed)
        model = get_peft_model(model, build_lora_config(model, cfg.lora))
    return model


@pytest.mark.timeout(600)
def test_chunked_loss_under_tensor_parallelism_equals_the_split_logits_loss_and_every_gradient(tmp_path):
    """tp2: the chunked loss with the vocabulary kept split (finetune.chunked_loss.VocabSplit) gives shardformer's own loss over
    the full split logits (dist_cross_entropy) and every rank's share of every gradient within 1e-6 (tests/chunked_loss_ranks.py)."""
    from tests.chunked_loss_ranks import CASES as TP_CASES
    from tests.conftest import torchrun_script

    returncode, output = torchrun_script([str(REPO / "tests" / "chunked_loss_ranks.py"), str(tmp_path), *TP_CASES], 2, 540, env={"FINETUNE_CACHE": str(tmp_path / "cache")})
    assert returncode == 0, output[-4000:]
    for rank in range(2):
        for case in TP_CASES:
            assert f"rank {rank} {case}: loss" in output, output[-4000:]
