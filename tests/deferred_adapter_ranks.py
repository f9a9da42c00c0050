"""Run by tests/distributed/test_deferred.py under torchrun (2 ranks): LoRA and QLoRA models built as train.py builds
them under hybrid_parallel (Method.model_init: lazily for a pretrained directory) against the same built eagerly.

    torchrun --nproc_per_node=2 tests/deferred_adapter_ranks.py OUT.json WIDE_LLAMA_DIR BIG_LLAMA_DIR GPT2_DIR

WIDE_LLAMA_DIR (a tiny Llama whose projections QLoRA can split in 4-bit blocks): for LoRA under tp2 and pp2 and QLoRA
under tp2, the max |difference| of the logits, of the (gathered) adapters and, QLoRA, of each rank's packed 4-bit shards
and their block scales; GPT2_DIR (fused q/k/v Conv1D, tied head): the same for LoRA under tp2. BIG_LLAMA_DIR (~470 MB in float32): each rank's build bytes (finetune.profiler: the process's
peak resident memory from before the build through boost and load) of LoRA and QLoRA under tp2, lazily and eagerly,
and the model's bytes. Rank 0 writes {"<method> <setup> <what>": number} as JSON. Watched as tests/deferred_ranks.py is.
"""

from __future__ import annotations

import faulthandler
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from finetune import deferred  # noqa: E402
from finetune.fixes import glibc  # noqa: E402
from finetune.config import build_config, parse_args  # noqa: E402
from finetune.distributed import destroy_process_groups, launch  # noqa: E402
from finetune.lora_tp import full_tensor  # noqa: E402
from finetune.methods import method_named  # noqa: E402
from finetune.model import base_quantization, build_model  # noqa: E402
from finetune.parallel import PLUGINS  # noqa: E402
from finetune.profiler import MemoryProfiler  # noqa: E402
from finetune.quantization import is_quantized  # noqa: E402
from tests.deferred_ranks import SETUPS, TEARDOWN_LIMIT_S, logits_of, nan_max, run_of  # noqa: E402

WORK_LIMIT_S = 480  # ~60 s alone (ten builds, four of a 446 MiB model); several times that on two cores shared with other test runs
TARGETS = {"llama": "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]", "gpt2": "[c_attn,c_fc,c_proj]"}
CHECKS = (("lora", "tp2", "llama"), ("lora", "pp2", "llama"), ("qlora", "tp2", "llama"), ("lora", "tp2", "gpt2"))  # (method, setup, model)


def built_run(model_dir: str, method_name: str, setup: str, init: str | None, batch: dict, family: str = "llama"):
    """The Run train.py builds for this model (its build as Method.model_init decides it, or `init`), and the init used."""
    cfg = build_config(parse_args([
        f"model.name={model_dir}", f"method={method_name}", "train.precision=fp32", "quantization.double_quant=false", "lora.dropout=0",
        f"lora.target_modules={TARGETS[family]}", *SETUPS[setup],
    ]))
    spec, method = PLUGINS[cfg.plugin.name], method_named(cfg.method)
    init = init or method.model_init(spec, cfg)
    quantization = None if spec.quantizes_shards(cfg) else base_quantization(cfg)
    model, _ = build_model(cfg.model, cfg.train.seed, spec.shardformer, None, quantization, cfg.train.precision, method.frozen_dtype(cfg.train.precision), init)
    return run_of(cfg, model, deferred.pending(model), batch), init


def state_of(run, batch: dict, vocab: int) -> dict:
    """The boosted model's logits (None off the last stage), whole adapters by name (every stage's), and this rank's 4-bit shards."""
    run.model.eval()
    module = run.model.unwrap()
    adapters = {name: full_tensor(p).detach().clone() for name, p in module.named_parameters() if "lora_" in name}
    stages = [None] * dist.get_world_size()
    dist.all_gather_object(stages, adapters)
    quantized = {}
    for name, p in module.named_parameters():
        if is_quantized(p):
            quantized[name] = p.data.float()
            quantized[f"{name} absmax"] = p.quant_state.absmax.float()
    return {"logits": logits_of(run, batch, vocab), "adapters": {k: v for stage in stages for k, v in stage.items()}, "quantized": quantized}


def differences(lazy: dict, eager: dict) -> dict[str, float]:
    """Max |lazy - eager| of logits, adapters and 4-bit shards over all ranks (NaN: a name or shape differs)."""
    out = {}
    for what in ("adapters", "quantized"):
        mine, theirs = lazy[what], eager[what]
        same = set(mine) == set(theirs) and all(mine[k].shape == theirs[k].shape for k in mine)
        out[what] = max((nan_max(mine[k] - theirs[k]) for k in mine), default=0.0) if same else float("nan")
        out[f"{what} count"] = len(mine)
    out["logits"] = None if lazy["logits"] is None else nan_max(lazy["logits"] - eager["logits"])
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out)
    merged = {k: nan_max(torch.tensor([g[k] for g in gathered if g[k] is not None])) for k in ("adapters", "quantized", "logits")}
    merged["adapters count"] = max(g["adapters count"] for g in gathered)
    merged["quantized count"] = sum(g["quantized count"] for g in gathered)
    return merged


def build_bytes(model_dir: str, method_name: str, init: str | None, batch: dict) -> int:
    """Peak resident bytes above the start, from before the build through boost and load (train.py's build_bytes), under tp2."""
    glibc.release_freed_heap()  # what earlier builds freed leaves the resident set first
    profiler = MemoryProfiler("exact")
    profiler.record("start")
    run, _ = built_run(model_dir, method_name, "tp2", init, batch)
    profiler.record("boosted")
    del run
    return profiler.build_bytes()


def compare(out: str, wide_dir: str, big_dir: str, gpt2_dir: str) -> None:
    """Write every difference and build size to out (rank 0)."""
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}  # shardformer's GPT-2 needs labels and a mask
    results: dict[str, float] = {}
    for method_name, setup, family in CHECKS:
        model_dir = {"llama": wide_dir, "gpt2": gpt2_dir}[family]
        vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
        lazy_run, init = built_run(model_dir, method_name, setup, None, batch, family)
        results[f"{method_name} {setup} {family} init is lazy"] = float(init == "lazy")
        lazy = state_of(lazy_run, batch, vocab)
        del lazy_run
        eager_run, _ = built_run(model_dir, method_name, setup, "eager", batch, family)
        for what, value in differences(lazy, state_of(eager_run, batch, vocab)).items():
            results[f"{method_name} {setup} {family} {what}"] = value
        del eager_run
    for method_name in ("lora", "qlora"):
        for init in ("eager", None):
            peaks = [None] * dist.get_world_size()
            dist.all_gather_object(peaks, build_bytes(big_dir, method_name, init, batch))
            results[f"{method_name} tp2 build bytes {init or 'lazy'}"] = max(peaks)
    results["big model bytes"] = (Path(big_dir) / "model.safetensors").stat().st_size  # float32 tensors and a small header
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))


def main(out: str, wide_dir: str, big_dir: str, gpt2_dir: str) -> None:
    """One rank's run, watched as tests/deferred_ranks.py watches its."""
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    faulthandler.dump_traceback_later(WORK_LIMIT_S, exit=True)
    launch(str(Path(out).parent), False, 300, 0)
    try:
        compare(out, wide_dir, big_dir, gpt2_dir)
    finally:
        faulthandler.dump_traceback_later(TEARDOWN_LIMIT_S, exit=True)
        destroy_process_groups()


if __name__ == "__main__":
    main(*sys.argv[1:5])
