"""HybridParallel's declaration: tensor x pipeline x data (x sequence) parallelism, and everything it refuses."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import TYPE_CHECKING, Any

from finetune.architectures import ARCHITECTURES, architecture, attention_heads, config_value, model_type, num_layers
from finetune.core.layout import Placement, Plan, cast_placement, half_precision
from finetune.core.plugins.base import PluginSpec
from finetune.core.plugins.zero import zero_placement
from finetune.methods import METHODS
from finetune.tasks import TASKS, batch_rows

if TYPE_CHECKING:
    from finetune.config import Config


SP_MODES = ("all_to_all", "split_gather", "ring", "ring_attn")
SP_OVER_TP = ("split_gather", "ring")  # their sequence-parallel group is the tensor-parallel group


def sequence_parallel(options: dict[str, Any]) -> tuple[str, int]:
    """(mode, degree) of sequence parallelism, ("", 1) when off: split_gather and ring split over the tp_size
    ranks of tensor parallelism, all_to_all and ring_attn over sp_size ranks of their own."""
    mode = options["sp_mode"]
    if mode in SP_OVER_TP:
        return mode, options["tp_size"]
    return (mode, options["sp_size"]) if options["sp_size"] > 1 else ("", 1)


def sequence_multiple(mode: str, degree: int) -> int:
    """What every batch's length must be a multiple of: the sequence is split into `degree` equal parts (ring_attn's
    zigzag split: 2 x degree, each rank an early and a late chunk)."""
    return 2 * degree if mode == "ring_attn" else degree


class HybridParallelSpec(PluginSpec):
    name = "hybrid_parallel"
    class_name = "HybridParallelPlugin"
    summary = "Tensor (tp_size) x pipeline (pp_size) x sequence (sp_size, sp_mode) x data parallel, with optional ZeRO-1 (zero_stage)."
    options = {
        "tp_size": 1,
        "pp_size": 1,
        "zero_stage": 0,
        "num_microbatches": 0,
        "microbatch_size": 0,
        "pp_style": "1f1b",
        "num_model_chunks": 1,
        "overlap_p2p": True,
        # Batches are padded to their longest sample, so tensor shapes change between steps; the
        # pipeline's p2p metadata cache assumes they do not (gloo then fails on a size mismatch).
        "enable_metadata_cache": True,
        "enable_flash_attention": False,
        "enable_fused_normalization": False,
        # Sequence parallelism (ColossalAI's enable_sequence_parallelism / sequence_parallelism_mode /
        # sp_size, derived from these two: sequence_parallel()). all_to_all and ring_attn split the sequence
        # over sp_size ranks of their own; split_gather and ring over the tensor-parallel group.
        "sp_size": 1,
        "sp_mode": "all_to_all",
        "make_vocab_size_divisible_by": 64,
        "initial_scale": 2.0**16,
        "overlap_communication": True,
    }
    choices = {"pp_style": ("1f1b", "interleaved"), "sp_mode": SP_MODES}
    # ColossalAI's spellings, which the two options above replace: a config naming one gets a one-line pointer.
    renamed_options = {
        "enable_sequence_parallelism": "plugin.sp_size (all_to_all) or plugin.sp_mode=split_gather|ring (over the tensor-parallel group)",
        "sequence_parallelism_mode": "plugin.sp_mode",
    }
    # gloo: no side-stream overlap (as ZeRO), and overlapped p2p hangs the interleaved schedule.
    cpu_options = {"overlap_communication": False, "overlap_p2p": False}
    takes_precision = True
    takes_max_norm = True
    replicated = False
    model_init = "lazy"  # shardformer materializes only the layers (and TP slices) this rank holds
    adapter_model_init = "lazy"  # adapters injected beside the lazy base (apply_adapters), split with it (finetune.lora_tp)
    # The chunks run inside the forward shardformer gives the model (finetune.chunked_loss.chunked_policy): on the last
    # pipeline stage, over the vocabulary split across the tensor-parallel ranks (VocabSplit); loss_chunks_refused says where not.
    loss_chunks_refusal = ("under sequence parallelism (plugin.sp_size>1 or sp_mode split_gather/ring) each rank's loss covers its part of the sequence, "
                           "which the chunks do not split")
    shardformer = True

    def loss_chunks_refused(self, options: dict[str, Any]) -> str:
        """The chunked loss runs under tensor, pipeline and data parallelism, and their products; sequence parallelism keeps the full logits."""
        return self.loss_chunks_refusal if sequence_parallel(options)[0] else ""

    def problems(self, cfg: Config, world_size: int, has_cuda: bool) -> list[str]:
        """What HybridParallelPlugin cannot do with this config, each with what to use instead."""
        plan = self.plan(cfg.plugin.options, batch_rows(cfg.task, cfg.train.batch_size), world_size)
        options = cfg.plugin.options
        tp, pp = plan.tp, plan.pp
        if min(tp, pp, options["sp_size"]) < 1:
            return [f"plugin.tp_size, plugin.pp_size and plugin.sp_size must be at least 1, got {tp}, {pp} and {options['sp_size']}"]
        kind = model_type(cfg.model.name)
        if not architecture(kind).shardformer_policy:  # shardformer would fail on it at boost time
            served = ", ".join(sorted(k for k, a in ARCHITECTURES.items() if a.shardformer_policy and not a.encoder))
            return [
                f"plugin.name=hybrid_parallel: ColossalAI 0.5.0's shardformer has no policy for {architecture(kind).title} ({cfg.model.name}), "
                f"so it cannot be split by tensor or pipeline parallelism (causal LMs it splits: {served}); use torch_ddp, low_level_zero or torch_fsdp"
            ]
        problems = []
        mode, sp = sequence_parallel(options)
        if mode:
            problems += sequence_parallel_problems(cfg, world_size, has_cuda)
        if cfg.data.packing and not mode:
            problems.append("data.packing=true with plugin hybrid_parallel: shardformer builds its own attention mask, which would cross sample boundaries; use torch_ddp, low_level_zero or torch_fsdp")
        task = TASKS.get(cfg.task)
        if task is not None and task.classification:
            problems += self._classification_problems(cfg, plan)
        if task is not None and task.pairs:
            problems += self._pair_problems(cfg, plan, mode)
        if world_size % (tp * pp) and not mode:  # with sequence parallelism: sequence_parallel_problems
            problems.append(f"world size {world_size} is not divisible by tp_size*pp_size={tp * pp}; launch a multiple of {tp * pp} processes")
        heads = attention_heads(cfg.model.name)
        if heads and tp > 1 and math.gcd(*heads) % tp:
            fits = [d for d in range(1, math.gcd(*heads) + 1) if math.gcd(*heads) % d == 0]
            problems.append(
                f"plugin.tp_size={tp}: {cfg.model.name} has {heads[0]} attention heads and {heads[1]} key/value heads, "
                f"which tensor parallelism must divide; tp sizes that fit: {', '.join(map(str, fits))}"
            )
        vocab = config_value(cfg.model.name, ("vocab_size",))
        if tp > 1 and vocab and vocab % tp and not architecture(kind).tp_pads_vocabulary:
            problems.append(
                f"plugin.tp_size={tp}: ColossalAI 0.5.0 splits {architecture(kind).title}'s lm_head without padding it, and the "
                f"{vocab:,} tokens of {cfg.model.name} do not divide by {tp}; use a tp_size that divides the vocabulary, or pp_size>1 with tp_size=1"
            )
        if options["zero_stage"] not in (0, 1, 2):
            problems.append(f"plugin.zero_stage: must be 0, 1 or 2, got {options['zero_stage']}")
        elif options["zero_stage"] and cfg.train.precision == "fp32":
            problems.append("plugin.zero_stage>0 under hybrid_parallel needs train.precision=bf16 (or fp16 on CUDA); ColossalAI's hybrid ZeRO has no fp32 mode")
        method = METHODS[cfg.method]
        if tp > 1 and method.quantized_base:
            problems += qlora_tp_problems(cfg, tp) or lora_tp_problems(cfg, options)
        elif tp > 1 and method.adapter:
            problems += lora_tp_problems(cfg, options)
        if (options["pp_style"] == "interleaved") != (options["num_model_chunks"] > 1):
            problems.append("plugin.pp_style=interleaved goes with plugin.num_model_chunks>1 (and 1f1b with 1)")
        if pp > 1:
            micro, size = options["num_microbatches"], options["microbatch_size"]
            rows = batch_rows(cfg.task, cfg.train.batch_size)
            if not micro and not size:
                problems.append("plugin.pp_size>1 needs plugin.num_microbatches (or plugin.microbatch_size) for the pipeline schedule")
            elif micro and cfg.train.batch_size % micro:
                problems.append(f"train.batch_size={cfg.train.batch_size} must be divisible by plugin.num_microbatches={micro}")
            elif size and rows % size:
                problems.append(f"train.batch_size={cfg.train.batch_size} ({rows} rows) must be divisible by plugin.microbatch_size={size}")
            elif size and size % (rows // cfg.train.batch_size):
                problems.append(f"plugin.microbatch_size={size} with task={cfg.task}: the schedule slices rows, {rows // cfg.train.batch_size} per sample (a pair's chosen and "
                                "rejected side by side), and an odd micro-batch would split a pair between micro-batches; use an even microbatch_size, or plugin.num_microbatches")
            elif plan.num_microbatches < pp:
                problems.append(f"the pipeline schedule needs at least pp_size={pp} micro-batches per step; raise plugin.num_microbatches or train.batch_size")
            elif options["pp_style"] == "interleaved" and plan.num_microbatches % pp:
                problems.append(f"the interleaved schedule needs a multiple of pp_size={pp} micro-batches per step")
            layers, chunks = num_layers(cfg.model.name), pp * plan.chunks
            if layers and method.adapter and layers < chunks:
                problems.append(f"method={cfg.method} with {chunks} pipeline chunks: {cfg.model.name} has {layers} layers, so some chunk would hold no adapter to train; use fewer chunks or stages")
            if options["zero_stage"] == 2:
                problems.append("plugin.zero_stage=2 cannot be combined with pipeline parallelism; use zero_stage=1")
            if cfg.train.grad_accum_steps > 1:
                problems.append("train.grad_accum_steps>1 with pipeline parallelism: micro-batches are the accumulation; raise plugin.num_microbatches instead")
        for key, what in (("enable_flash_attention", "flash attention"), ("enable_fused_normalization", "fused normalization (apex)")):
            if options[key] and not has_cuda:
                problems.append(f"plugin.{key}=true: {what} needs a CUDA GPU; set it to false on CPU")
        return problems

    def _pair_problems(self, cfg: Config, plan: Plan, sp_mode: str) -> list[str]:
        """Pair tasks run under tensor, pipeline and data parallelism: both sequences of a pair through the chunked loss
        (the vocabulary split over the tensor-parallel ranks; on the last pipeline stage, as the schedule's criterion)."""
        if sp_mode:
            return [f"task={cfg.task} with sequence parallelism: a pair's log-probabilities need the whole sequence on each rank; use plugin.sp_size=1 (and no sp_mode split_gather/ring)"]
        if TASKS[cfg.task].scalar_head and plan.tp > 1:
            return [f"task={cfg.task} with plugin.tp_size>1: ColossalAI 0.5.0 splits the sequence-classification head over the tensor-parallel ranks, "
                    "and a reward model's head has a single output; use torch_ddp, low_level_zero or torch_fsdp"]
        if TASKS[cfg.task].scalar_head and plan.pp > 1:
            return [f"task={cfg.task} with plugin.pp_size>1 is not built: the pipeline's last stage would need the one-output score head's forward (shardformer's "
                    "sequence-classification forward pools by its own rules, not checked against one process here); use torch_ddp, low_level_zero or torch_fsdp"]
        if plan.pp > 1 and cfg.plugin.options["pp_style"] == "interleaved":
            return [f"task={cfg.task} with plugin.pp_style=interleaved: the reference and eval passes run the schedule forward-only, which ColossalAI 0.5.0's interleaved "
                    "schedule does without a gradient only by a training pass (it hangs on gloo otherwise), and the reference pass has nothing to train; use plugin.pp_style=1f1b"]
        return []

    def unchunked_pair_problems(self, cfg: Config, why_unchunked: str) -> list[str]:
        """Under tensor parallelism the full logits stay split over the ranks and nothing scores pairs from them."""
        if cfg.plugin.options["tp_size"] <= 1 or sequence_parallel(cfg.plugin.options)[0]:  # sequence parallelism: _pair_problems
            return []
        why = why_unchunked or "the full logits stay split over the tensor-parallel ranks and are not scored"
        return [f"task={cfg.task} with plugin.tp_size>1 and train.loss_chunks={cfg.train.loss_chunks}: the pair log-probabilities are taken from the chunked loss, "
                f"which keeps the vocabulary split over the tensor-parallel ranks ({why}); set train.loss_chunks=auto"]

    @staticmethod
    def _classification_problems(cfg: Config, plan: Plan) -> list[str]:
        """Which classifiers tensor/pipeline parallelism serves (checked against a single process: tests/distributed/test_fidelity.py)."""
        kind = model_type(cfg.model.name)
        served = architecture(kind).hybrid_classification
        if not served:
            fits = ", ".join(k for k, a in sorted(ARCHITECTURES.items()) if a.hybrid_classification)
            return [f"task=classification with plugin hybrid_parallel supports model types {fits} (model.name={cfg.model.name} is {kind or 'of unknown type'}); use torch_ddp, low_level_zero or torch_fsdp"]
        if served == "pp" and plan.tp > 1:
            return [f"task=classification for {architecture(kind).title} with plugin.tp_size>1: ColossalAI 0.5.0 splits the classification head across tensor-parallel ranks (fails for most label counts); use pp_size>1 with tp_size=1, or torch_ddp / low_level_zero"]
        return []

    def setting_label(self, options: dict[str, Any], world_size: int, dp_size: int) -> str:
        parts = [f"tp{options['tp_size']}"] if options.get("tp_size", 1) > 1 else []
        if options.get("pp_size", 1) > 1:
            parts.append(f"pp{options['pp_size']} {options.get('pp_style', '1f1b')}")
        mode, sp = sequence_parallel({**self.options, **options})
        if sp > 1:
            parts.append(f"sp{sp} {mode}")
        if options.get("zero_stage"):
            parts.append(f"zero{options['zero_stage']}")
        if dp_size > 1:
            parts.append(f"dp{dp_size}")
        return " ".join(parts) or "hybrid"

    def plan(self, options: dict[str, Any], batch_size: int, world_size: int) -> Plan:
        """world = dp x pp x tp x (sp ranks of their own: all_to_all, ring_attn), as HybridParallelPlugin divides it.
        `batch_size`: rows per batch (batch_rows), which plugin.microbatch_size slices."""
        tp, pp = options["tp_size"], options["pp_size"]
        mode, sp = sequence_parallel(options)
        own_sp = 1 if mode in SP_OVER_TP else sp
        micro = options["num_microbatches"] or (batch_size // options["microbatch_size"] if options["microbatch_size"] else 0)
        dp = max(1, world_size // max(1, tp * pp * own_sp))
        return Plan(tp=tp, pp=pp, dp=dp, sp=sp, num_microbatches=micro if pp > 1 else 1, chunks=options["num_model_chunks"])

    def placement(self, cfg: Config, world_size: int) -> Placement:
        """tp x pp x dp (x sp); half precision keeps an fp32 master (zero_stage 1: ZeRO over dp, and all_to_all's sp ranks)."""
        options, plan = cfg.plugin.options, self.plan(cfg.plugin.options, batch_rows(cfg.task, cfg.train.batch_size), world_size)
        tp, pp, dp = plan.tp, plan.pp, plan.dp
        layout = dict(tp=tp, pp=pp, microbatches=max(1, plan.num_microbatches), chunks=plan.chunks, interleaved=options["pp_style"] == "interleaved",
                      sp=plan.sp, sp_over_tp=sequence_parallel(options)[0] in SP_OVER_TP, column_inputs_saved=tp > 1)
        # Gradients are synchronized (and ZeRO shards) over the data-parallel ranks and all_to_all's sequence-parallel ones.
        synced = dp * (1 if layout["sp_over_tp"] else plan.sp)
        if options["zero_stage"]:
            return dataclasses.replace(zero_placement(cfg, world_size, dp=synced, stage=options["zero_stage"], offload=False, master=True), dp=dp, **layout)
        # Without ZeRO and without a pipeline, data parallelism is torch DDP inside the plugin (buckets).
        ddp_buckets = 2 if synced > 1 and pp == 1 else 1
        master = 4 if half_precision(cfg) else 0
        return cast_placement(cfg, dp=dp, **layout, grad_copies=ddp_buckets, master_bytes=master, step_grad_bytes=master)

    def quantizes_shards(self, cfg: Config) -> bool:
        """QLoRA under tensor parallelism: the model is built in full precision and each rank quantizes its shards (finetune.qlora_tp)."""
        return cfg.plugin.options["tp_size"] > 1 and METHODS[cfg.method].quantized_base

    def required_overrides(self, cfg: Config) -> tuple[tuple[str, ...], str]:
        """QLoRA where each rank quantizes its own shards takes single quantization (qlora_tp_problems refuses double)."""
        if self.quantizes_shards(cfg) and cfg.quantization.double_quant:
            return ("quantization.double_quant=false",), "QLoRA under tensor parallelism: each rank quantizes its own shards, and double quantization groups constants over the whole weight"
        return (), ""

    def fit_alternatives(self, world_size: int) -> list[tuple[tuple[str, ...], float]]:
        """Tensor parallelism over every rank: more communication."""
        return [((f"plugin.name={self.name}", f"plugin.tp_size={world_size}"), 3)]


def lora_tp_problems(cfg: Config, options: dict[str, Any]) -> list[str]:
    """What LoRA under tensor parallelism (finetune.lora_tp) cannot adapt in this config."""
    if cfg.lora.use_dora:
        # DoRA's magnitude is the norm of each output row of W + BA: a row-parallel split holds part of
        # every row, so each rank's norm would be wrong without an all-reduce finetune.lora_tp does not do.
        return ["lora.use_dora=true with plugin.tp_size>1: DoRA's magnitude vector needs whole weight rows, which tensor parallelism splits; use tp_size=1 (pipeline/data parallel) or lora.use_dora=false"]
    kind = model_type(cfg.model.name)
    layers = architecture(kind).lora_tp_layers
    if not layers:
        served = ", ".join(sorted(k for k, a in ARCHITECTURES.items() if a.lora_tp_layers))
        return [f"method=lora with plugin.tp_size>1 supports model types {served}; {cfg.model.name} is {kind or 'of unknown type'}: use tp_size=1 (pipeline/data parallel) or method=full"]
    targets = cfg.lora.target_modules or list(architecture(kind).lora_targets)
    unsupported = [t for t in targets if t not in layers]
    if unsupported:
        return [f"lora.target_modules: {unsupported} cannot be adapted under tensor parallelism in {kind}; these can: {', '.join(layers)}"]
    return []


def qlora_tp_problems(cfg: Config, tp: int) -> list[str]:
    """What QLoRA under tensor parallelism (finetune.qlora_tp: each rank quantizes its shard) cannot do in this config."""
    kind, quant = model_type(cfg.model.name), cfg.quantization
    if not architecture(kind).qlora_tp:
        served = ", ".join(sorted(k for k, a in ARCHITECTURES.items() if a.qlora_tp))
        return [f"method=qlora with plugin.tp_size>1 supports model types {served}; {cfg.model.name} is {kind or 'of unknown type'}: use tp_size=1 with pp_size>1, or plugin.name=torch_fsdp / torch_ddp"]
    if quant.bits == 8:
        return [f"quantization.bits=8 with plugin.tp_size={tp}: LLM.int8 scales each output row by its absmax over the whole row, which row-parallel shards split; use quantization.bits=4"]
    if quant.double_quant:
        return [f"quantization.double_quant=true with plugin.tp_size={tp}: the second quantization groups 256 block scales offset by their mean over the whole weight, which a shard cannot reproduce; set quantization.double_quant=false (fp32 block scales: 0.375 bits per weight more)"]
    if quant.skip_modules and "lm_head" not in quant.skip_modules:
        return [f"quantization.skip_modules={quant.skip_modules} with plugin.tp_size={tp}: the vocabulary-parallel lm_head is not quantized under tensor parallelism; add lm_head to the list"]
    projections = llama_projections(cfg.model.name)
    bad = misaligned_projections(projections, tp) if projections else []
    if bad:
        return [f"method=qlora with plugin.tp_size={tp}: the shards of {', '.join(bad)} would not be whole {QUANT_BLOCK}-element quantization blocks "
                f"(a column-parallel shard's rows x in_features and a row-parallel shard's in_features / tp must divide by {QUANT_BLOCK}); use a tp_size that keeps them whole, or tp_size=1 with pp_size>1"]
    return []


def llama_projections(model_name: str) -> dict[str, tuple[int, int, str]] | None:
    """Each projection of a Llama-layout decoder as (out_features, in_features, how tensor parallelism splits it); None when its config is unknown."""
    hidden, ffn = config_value(model_name, ("hidden_size",)), config_value(model_name, ("intermediate_size",))
    heads = attention_heads(model_name)
    if not (hidden and ffn and heads):
        return None
    head_dim = config_value(model_name, ("head_dim",)) or hidden // heads[0]
    q, kv = heads[0] * head_dim, heads[1] * head_dim
    shapes = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q), "gate_proj": (ffn, hidden), "up_proj": (ffn, hidden), "down_proj": (hidden, ffn)}
    return {name: (*shape, "row" if name in ("o_proj", "down_proj") else "column") for name, shape in shapes.items()}


QUANT_BLOCK = 64  # bitsandbytes' 4-bit block size (Params4bit's default, as transformers quantizes): elements per absmax


def misaligned_projections(projections: dict[str, tuple[int, int, str]], tp: int) -> list[str]:
    """The projections whose tensor-parallel shards would not be whole quantization blocks, each as 'name (out x in, split)'.

    bitsandbytes quantizes a weight (out, in) flattened row-major: a column-parallel shard (output rows) is a
    contiguous range, whole blocks when it starts on a block boundary; a row-parallel shard (input columns)
    is whole blocks when each of its rows is.

    Args:
        projections: name -> (out_features, in_features, "column" or "row"), how shardformer splits it.
    """
    bad = []
    for name, (out_features, in_features, split) in projections.items():
        shard = out_features // tp * in_features if split == "column" else in_features // tp
        if shard % QUANT_BLOCK:
            bad.append(f"{name} ({out_features}x{in_features}, {split}-parallel)")
    return bad


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def sequence_parallel_problems(cfg: Config, world_size: int, has_cuda: bool) -> list[str]:
    """What sequence parallelism (plugin.sp_size / sp_mode) cannot do with this config, each with what to do instead."""
    options = cfg.plugin.options
    mode, sp = sequence_parallel(options)
    tp, pp = options["tp_size"], options["pp_size"]
    kind = model_type(cfg.model.name)
    if not architecture(kind).sequence_parallel:
        served = ", ".join(sorted(k for k, a in ARCHITECTURES.items() if a.sequence_parallel))
        return [f"plugin.sp_mode={mode}: sequence parallelism is built for model types {served} (their shardformer policy splits the sequence); {cfg.model.name} is {kind or 'of unknown type'}: use plugin.sp_size=1"]
    if METHODS[cfg.method].quantized_base:  # finetune.qlora_tp's 4-bit shards take no sequence-split input
        return [f"method={cfg.method} with plugin.sp_mode={mode}: QLoRA under sequence parallelism is not built (4-bit layers neither gather nor split the sequence); use method=lora, or plugin.sp_size=1 with tensor parallelism"]
    task = TASKS.get(cfg.task)
    if task is not None and task.classification:
        return [f"task={cfg.task} with sequence parallelism: only causal-LM tasks split their sequence here (shardformer's classification forward does not); use plugin.sp_size=1"]
    if mode in SP_OVER_TP:
        if tp == 1:
            return [f"plugin.sp_mode={mode} splits the sequence over the tensor-parallel group and needs plugin.tp_size>1; without tensor parallelism use plugin.sp_mode=all_to_all with plugin.sp_size>1"]
        if mode == "ring" and not METHODS[cfg.method].adapter:
            # Measured on CPU (tiny Llama, tp2 x dp2): losses 6e-3 off a single process after one update, while
            # split_gather and ring under LoRA (frozen base weights; finetune.lora_tp's own exchange) match it.
            return [f"plugin.sp_mode=ring with method={cfg.method}: ColossalAI 0.5.0's ring-overlapped linear layers give wrong weight gradients "
                    "(losses differ from a single process after one step); use plugin.sp_mode=split_gather (the same split, without the overlap) or method=lora"]
        if options["sp_size"] not in (1, tp):
            return [f"plugin.sp_size={options['sp_size']} with plugin.sp_mode={mode}: the sequence is split over the tp_size={tp} tensor-parallel ranks; leave sp_size at 1"]
    problems = []
    if pp > 1:
        problems.append("sequence parallelism with plugin.pp_size>1 is not checked against one process here; use pp_size=1 (tensor, sequence and data parallel)")
    if mode in ("all_to_all", "ring_attn") and tp > 1:
        problems.append(f"plugin.sp_mode={mode} with plugin.tp_size>1 is not checked against one process here; with tensor parallelism use plugin.sp_mode=split_gather (the sequence split over the tp ranks)")
    if mode == "ring_attn":
        missing = " and ".join(what for what, ok in (("a CUDA GPU", has_cuda), ("the flash-attn package", importlib.util.find_spec("flash_attn") is not None)) if not ok)
        if missing:
            problems.append(f"plugin.sp_mode=ring_attn: ring attention runs on flash-attention's kernels, which need a CUDA GPU and the flash-attn package (missing here: {missing}); use plugin.sp_mode=all_to_all")
        elif cfg.data.packing:
            problems.append("data.packing=true with plugin.sp_mode=ring_attn: ring attention splits rows by their padding mask and would cross packed sample boundaries; use plugin.sp_mode=all_to_all or data.packing=false")
    own = 1 if mode in SP_OVER_TP else sp
    if world_size % (tp * pp * own):
        problems.append(f"world size {world_size} is not divisible by tp_size*pp_size*sp_size={tp * pp * own}; launch a multiple of {tp * pp * own} processes")
    heads = attention_heads(cfg.model.name)
    if heads and mode == "all_to_all" and math.gcd(*heads) % (tp * sp):
        # all_to_all trades the sequence split for a split of each rank's (tp's share of) attention heads
        problems.append(
            f"plugin.sp_size={sp}: {cfg.model.name} has {heads[0]} attention heads and {heads[1]} key/value heads, which "
            f"tp_size x sp_size={tp * sp} must divide; sp sizes that fit with tp_size={tp}: {_divisors(math.gcd(*heads) // tp) if math.gcd(*heads) % tp == 0 else 'none'}"
        )
    if cfg.data.packing and (options["enable_flash_attention"] or cfg.model.attn_implementation == "flash_attention_2"):
        problems.append("data.packing=true with sequence parallelism keeps sample boundaries by the block attention mask, which flash attention does not take; use model.attn_implementation=sdpa (or eager) and plugin.enable_flash_attention=false")
    return problems
