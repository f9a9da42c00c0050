"""HybridParallel at run time: shardformer policies, the pipeline schedule for steps and evals, and the checkpoint IO of a
tensor/pipeline-split model (by name, any layout)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from finetune.checkpoint.files import KeyStandIns, OpenFiles, TensorKey, join_tensors, split_tensors, tensor_files, tree_errors, unshared, weight_errors, weight_files, weight_key
from finetune.checkpoint.model_state import TrainState, update_master_params
from finetune.checkpoint.optimizer_state import OPTIMIZER_STEM, full_optimizer_stem, global_param_names, indexed_optimizer_state, optimizer_params, tied_output_embedding
from finetune.core.layout import Layout
from finetune.core.plugins.hybrid import SP_OVER_TP, HybridParallelSpec, sequence_multiple, sequence_parallel
from finetune.data import REFERENCE
from finetune.errors import CheckpointError
from finetune.lora_tp import full_like, read_split
from finetune.parallel.base import Plugin, write_sharded_model

if TYPE_CHECKING:
    from finetune.config import Config
    from finetune.quantization import WeightBytes
    from finetune.run import Run


STAGE_OPTIMIZER_FILE = "state-stage-{:05d}.safetensors"  # tensor/pipeline parallelism: one file per pipeline stage


def save_split_optimizer(state: TrainState, path: Path, writes: bool, stage: int) -> None:
    """save_optimizer's format (full tensors by parameter name, as any layout reads them) for a model split by
    tensor and pipeline parallelism; every rank calls this.

    Every rank gathers its parameters' tensor-parallel splits of each state (a collective over its
    tensor-parallel group; a padded vocabulary is unpadded); one rank per pipeline stage (`writes`) writes
    its stage's states to their own file, so no rank holds another stage's; rank 0 writes state.json (the
    plain data of all stages) and the index naming each tensor's file.
    """
    params = optimizer_params(state)
    names = global_param_names(state, [name for name, _ in params])
    local = state.optimizer.state_dict()
    gathered = {}
    for i, values in sorted(local["state"].items()):  # the same order on every rank of a tensor-parallel group
        param = params[i][1]
        gathered[names[i]] = {k: full_like(param, v).detach().cpu() if torch.is_tensor(v) and v.dim() and v.shape == param.shape else v for k, v in sorted(values.items())}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in local["param_groups"]]
    # Every stage's plain data, its tensors as empty stand-ins: enough to merge and to know who writes what.
    outline = {"state": {n: {k: torch.empty(0) if torch.is_tensor(v) else v for k, v in s.items()} for n, s in gathered.items()}, "param_groups": groups}
    shares: list = [None] * dist.get_world_size()
    dist.all_gather_object(shares, (stage, outline) if writes else None)
    merged, owner = _merge_stages([share for share in shares if share is not None])
    files = {name: STAGE_OPTIMIZER_FILE.format(owner[name] + 1) for name in merged["state"]}
    path.mkdir(parents=True, exist_ok=True)
    if writes:
        mine = {n: s for n, s in gathered.items() if owner[n] == stage}  # a tied weight held by two stages is written once
        save_file(unshared(split_tensors({"state": mine})[1]), path / STAGE_OPTIMIZER_FILE.format(stage + 1))
    if dist.get_rank() == 0:
        weight_map = {key: files[name] for name, values in merged["state"].items() for key in split_tensors(values, f"state/{name}")[1]}
        (path / f"{OPTIMIZER_STEM}.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1) + "\n")
        (path / f"{OPTIMIZER_STEM}.json").write_text(json.dumps(split_tensors(merged)[0]) + "\n")


def _merge_stages(shares: list[tuple[int, dict]]) -> tuple[dict, dict[str, int]]:
    """Every stage's named optimizer state in one (stage order; a name two stages hold is the first's), and the stage owning each name."""
    merged: dict = {"state": {}, "param_groups": []}
    owner: dict[str, int] = {}
    for stage, share in sorted(shares, key=lambda item: item[0]):
        for name, values in share["state"].items():
            if name not in owner:
                merged["state"][name], owner[name] = values, stage
        for i, group in enumerate(share["param_groups"]):
            if i == len(merged["param_groups"]):
                merged["param_groups"].append({**group, "params": []})
            known = merged["param_groups"][i]["params"]
            known += [n for n in group["params"] if n not in known]
    return merged, owner


def load_split_optimizer(state: TrainState, path: Path) -> None:
    """Any layout's optimizer state into this rank's split model: every rank reads the plain data and only the
    tensors of the parameters it holds (from whichever file holds them), then keeps its split of each."""
    stem = full_optimizer_stem(path)
    params = optimizer_params(state)
    local_names = [name for name, _ in params]
    names = global_param_names(state, local_names)
    with tree_errors(stem):
        saved = join_tensors(json.loads(stem.with_name(stem.name + ".json").read_text()), KeyStandIns())
        files = tensor_files(stem)
        mine: dict[str, dict] = {}
        with OpenFiles(files) as opened:
            for (local_name, param), name in zip(params, names):
                if name not in saved["state"]:
                    continue
                values = {}
                for k, v in saved["state"][name].items():
                    if isinstance(v, TensorKey):
                        reader = opened[v]
                        split = len(reader.get_slice(v).get_shape()) == param.dim()  # shaped like the parameter (not a step counter)
                        v = read_split(reader, v, param) if split else reader.get_tensor(v)
                    values[k] = v
                mine[local_name] = values
        sizes = [len(group["params"]) for group in state.optimizer.param_groups]
        if len(saved["param_groups"]) != len(sizes):
            raise CheckpointError(f"resume_from: the optimizer state has {len(saved['param_groups'])} parameter groups, this optimizer {len(sizes)}")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        groups = [{**g, "params": local_names[start : start + size]} for g, start, size in zip(saved["param_groups"], starts, sizes)]
    state.optimizer.load_state_dict(indexed_optimizer_state({"state": mine, "param_groups": groups}, local_names))


def load_split_model(state: TrainState, path: Path, setting: str = "resume_from", names: dict[str, list[str]] | None = None, skip: frozenset[str] = frozenset()) -> None:
    """Full weights by name (any layout's checkpoint or a pretrained model directory: one file, or shards with an
    index) into this rank's tensor/pipeline-split model, then into the optimizer's master copies: a rank reads
    only the tensors of the parameters it holds (of one split along one dim only its rows or columns; fused
    q/k/v whole, then split) and keeps its split (a padded vocabulary padded again with zeros). Parameters
    of other pipeline stages are gone from this rank's module and are not read.

    Args:
        setting: the setting that named `path`, for errors (resume_from, model.name).
        names: every name of each parameter by its name in the model (finetune.deferred.Pending.names, taken
            before wrapping); tied weights are stored once, under one of them. An output embedding tied to
            the input one is always also read from the input's weight.
        skip: parameters not to read: they have their values (adapters injected after a deferred build).
    """
    module = state.model.unwrap()
    aliases = tied_output_embedding(module)
    with weight_errors(path, setting):
        files = weight_files(path, setting)
        persistent = [(n, b) for n, b in module.named_buffers() if n in files]  # buffers HF does not save stay as built
        names = names or {}
        # every parameter's key found before any is read: a misfit is one line before heavy work
        keys = {n: weight_key(files, [*names.get(n, [n]), aliases.get(n, n)], path, setting) for n, _ in module.named_parameters() if n not in skip}
        with OpenFiles(files) as opened, torch.no_grad():
            for name, tensor in [*((n, p) for n, p in module.named_parameters() if n in keys), *persistent]:
                key = keys.get(name, name)
                tensor.copy_(read_split(opened[key], key, tensor))
    update_master_params(state)


@contextlib.contextmanager
def _colossalai_errors_only():
    """Silence ColossalAI's warnings in a block (its logger writes a warning as two records, caller and text)."""
    logger = logging.getLogger("colossalai")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class HybridParallel(HybridParallelSpec, Plugin):
    """Tensor x pipeline x data parallelism at run time."""

    def constructor_kwargs(self, options: dict[str, Any], precision: str, max_grad_norm: float, on_cpu: bool) -> dict[str, Any]:
        kwargs = super().constructor_kwargs(options, precision, max_grad_norm, on_cpu)
        for key in ("num_microbatches", "microbatch_size"):
            kwargs[key] = kwargs[key] or None  # 0 in YAML: let ColossalAI decide
        mode, sp = sequence_parallel(options)
        del kwargs["sp_mode"]
        kwargs.update(enable_sequence_parallelism=bool(mode), sequence_parallelism_mode=mode or None)
        kwargs["sp_size"] = None if mode in SP_OVER_TP else sp  # over the TP group: ColossalAI warns on any size given
        if kwargs["tp_size"] == 1:
            # ColossalAI 0.5.0 cannot save a checkpoint whose vocabulary was padded without tensor
            # parallelism (pipeline or sequence parallel: '_unpad_detach' missing); padding only matters for TP.
            kwargs["make_vocab_size_divisible_by"] = 1
        return kwargs

    def shard_policy(self, cfg: Config, model):
        """RoBERTa has no ColossalAI policy: ours. LoRA with tensor parallelism wraps the model's policy
        (ours or ColossalAI's) so each adapter is sharded with the layer it adapts (and, under QLoRA, each shard quantized).
        A causal LM: the forward shardformer gives it (a pipeline stage's, or GPT-2's own even without a pipeline) wrapped by
        finetune.chunked_loss (the loss in chunks on the last stage)."""
        from finetune import roberta_policy  # imports ColossalAI's shardformer
        from finetune.chunked_loss import chunked_policy
        from finetune.core.loss_chunks import loss_chunk_tokens
        from finetune.lora_tp import lora_policy
        from finetune.methods import method_named
        from finetune.qlora_tp import ShardQuantization, qlora_policy
        from finetune.tasks import TASKS

        own = roberta_policy.shard_policy(model)
        if not (TASKS[cfg.task].classification or TASKS[cfg.task].scalar_head):
            own = chunked_policy(model, own, loss_chunk_tokens(cfg))
        if not method_named(cfg.method).adapter or cfg.plugin.options["tp_size"] == 1:
            return own
        if self.quantizes_shards(cfg):  # QLoRA: each rank quantizes its shards
            return qlora_policy(model, own, ShardQuantization.of(cfg.quantization, cfg.train.precision))
        return lora_policy(model, own)

    def apply_adapters(self, model, lora_config, booster, plugin):
        # enable_lora's PeftModel wrapper hides the model from ColossalAI's pipeline policies, and it
        # refuses tensor parallelism: adapters are injected, then sharded by finetune.lora_tp.
        from finetune.model import inject_lora

        return inject_lora(model, lora_config)

    def layout(self, plugin) -> Layout:
        import torch.distributed as dist

        last_stage = plugin.stage_manager is None or plugin.stage_manager.is_last_stage(ignore_chunk=True)
        # plugin.dp_size counts the sequence-parallel ranks too (they share its gradient all-reduce), but they
        # share their batch: only the data-parallel group's ranks read distinct data.
        return Layout(
            dp_rank=dist.get_rank(plugin.dp_group),
            dp_size=dist.get_world_size(plugin.dp_group),
            pipeline=plugin.pp_size > 1,
            counts=last_stage and dist.get_rank(plugin.tp_group) == 0 and dist.get_rank(plugin.sp_group) == 0,  # sp ranks hold the same loss
            replicated=False,
            sequence_multiple=sequence_multiple(plugin.sequence_parallelism_mode, plugin.sp_group.size()) if plugin.enable_sequence_parallelism else 1,
        )

    def forward_backward(self, run: Run, micro_batches: list[dict]) -> float:
        """Under a pipeline each batch goes through the schedule, which averages the last stage's criterion over its
        micro-batches: the model's loss, or for pairs the objective's (its metric sums kept on the last stage)."""
        if not run.layout.pipeline:
            return super().forward_backward(run, micro_batches)
        criterion = (lambda outputs, micro_batch: run.objective.loss(micro_batch, outputs)) if run.objective else (lambda outputs, _: outputs.loss)
        loss_sum = 0.0
        for batch in micro_batches:  # micro-batching happens inside the pipeline schedule
            batch = self._with_reference(run, batch)
            out = run.booster.execute_pipeline(iter([batch]), run.model, criterion=criterion, optimizer=run.optimizer, return_loss=True)
            loss_sum += out["loss"].item() if out["loss"] is not None else 0.0  # the loss exists on the last stage
        return loss_sum

    def _with_reference(self, run: Run, batch: dict) -> dict:
        """A pair batch with, on the last stage, the reference log-probabilities of its rows (finetune.data.REFERENCE, which
        the schedule's micro-batches carry to the criterion) where the reference is the model with its adapters off: a
        forward-only pass of the schedule before the policy's, every stage's adapters off. Any other batch as it is."""
        objective = run.objective
        if objective is None or not objective.objective.reference or objective.adapters_off is None:
            return batch
        with objective.adapters_off():
            reference = self.pipeline_logps(run, batch)
        return {**batch, REFERENCE: reference} if reference is not None else batch

    def row_logps(self, run: Run) -> Callable | None:
        """Under a pipeline the rows' log-probabilities come through the schedule (pipeline_logps)."""
        return functools.partial(self.pipeline_logps, run) if run.layout.pipeline else None

    def pipeline_logps(self, run: Run, batch: dict) -> torch.Tensor | None:
        """Each row's summed log-probability of its label tokens under the model as it stands (finetune.preference.
        output_logps), through the pipeline schedule without gradients; on the last stage, None on the others."""
        import torch

        from finetune.preference import output_logps

        sums = []

        def criterion(outputs, micro_batch):
            sums.append(output_logps(outputs, micro_batch["labels"])[0])
            return sums[-1].sum()  # the schedule adds up a loss; unused

        with torch.no_grad():
            self._eval_pass(run, batch, criterion)
        return torch.cat(sums) if sums else None

    def eval_forward(self, run: Run, output: str) -> Callable:
        """Under a pipeline the batch goes through the schedule; loss and logits exist on the last stage only."""
        if not run.layout.pipeline:
            return super().eval_forward(run, output)
        import torch

        from finetune.evaluation import summed_loss

        def batch_loss(batch: dict) -> torch.Tensor:
            out = self._eval_pass(run, batch, summed_loss)
            if out["loss"] is None:  # not the last stage
                return torch.zeros((), device=run.device)
            return out["loss"] * run.plan.num_microbatches  # the schedule averages over micro-batches

        def batch_pairs(batch: dict) -> torch.Tensor:
            sums = [torch.zeros(len(run.objective.metrics) + 1, dtype=torch.float64, device=run.device)]  # a stage without the head adds nothing

            def criterion(outputs, micro_batch):
                loss, batch_sums = run.objective.batch_sums(micro_batch, outputs)
                sums.append(batch_sums)
                return loss

            self._eval_pass(run, self._with_reference(run, batch), criterion)
            return sum(sums)

        def batch_logits(batch: dict):
            # The loss is not used (computed from the logits instead): an all-filler micro-batch makes it NaN.
            # ColossalAI warns on every such call that kept outputs cost memory (one eval batch here).
            with _colossalai_errors_only():
                out = self._eval_pass(run, batch, lambda outputs, _: outputs.loss, return_outputs=True)
            return out["outputs"]["logits"] if out["outputs"] is not None else None

        return {"loss": batch_loss, "pairs": batch_pairs}.get(output, batch_logits)

    @staticmethod
    def _eval_pass(run: Run, batch: dict, criterion, return_outputs: bool = False) -> dict:
        """One batch through the pipeline schedule without training."""
        import torch

        if run.cfg.plugin.options["pp_style"] == "interleaved":
            # ColossalAI 0.5.0's forward-only interleaved pass hangs on gloo; its training pass does
            # not. Evaluate through the training pass (the model is in eval mode), then drop the grads.
            with torch.enable_grad():
                out = run.booster.execute_pipeline(iter([batch]), run.model, criterion=criterion, optimizer=run.optimizer, return_loss=True, return_outputs=return_outputs)
            run.optimizer.zero_grad()
            return out
        return run.booster.execute_pipeline(iter([batch]), run.model, criterion=criterion, optimizer=None, return_loss=True, return_outputs=return_outputs)

    def held_weight_bytes(self, state: TrainState) -> WeightBytes | None:
        """A quantized base: this rank's pipeline stage and tensor-parallel shards (4-bit shards with their own block scales)."""
        from finetune.quantization import quantized_modules, weight_bytes

        module = state.model.unwrap()
        return weight_bytes(module) if quantized_modules(module) else None

    def write_model(self, state: TrainState, path: Path) -> None:
        """Adapters: every split gathered and every stage's share collected, written in peft layout; full: the Booster's sharded save."""
        if state.adapter:
            super().write_model(state, path)
        else:
            write_sharded_model(state, path)

    def read_weights(self, state: TrainState, path: Path) -> None:
        """Any layout's full weights by name; each rank reads only the tensors it holds, then keeps its split."""
        load_split_model(state, path)

    def load_deferred(self, run: Run, pending) -> None:
        """The pretrained weights by the reader a resume uses (each rank only its rows of what it holds), every
        name of a tied weight tried, then the optimizer's master copies; adapters (made after the build) keep their
        init. Under QLoRA the 4-bit shards are then quantized from the weights as read (finetune.qlora_tp)."""
        from finetune.model import trains_with_adapter
        from finetune.qlora_tp import quantize_deferred_shards

        module = run.state.model.unwrap()
        stored = {name: pending.stored_names(name) for name, _ in module.named_parameters()}
        adapters = frozenset(name for name, names in stored.items() if names is None and trains_with_adapter(name))
        load_split_model(run.state, pending.path, "model.name", {name: names for name, names in stored.items() if names}, adapters)
        quantize_deferred_shards(module, pending)

    def write_optimizer(self, state: TrainState, path: Path) -> None:
        """The optimizer state as every plugin writes it (full tensors by parameter name), one file per pipeline
        stage, written by its tensor-parallel rank 0 of data-parallel rank 0. Not ColossalAI's hybrid optimizer
        checkpoint: in 0.5.0 it cannot gather the states of a vocabulary padded for tensor parallelism."""
        import torch.distributed as dist

        plugin = state.booster.plugin
        writes = dist.get_rank(plugin.dp_group) == 0 and dist.get_rank(plugin.tp_group) == 0
        save_split_optimizer(state, path, writes, stage=plugin.stage_manager.stage if plugin.stage_manager else 0)

    def read_optimizer(self, state: TrainState, path: Path) -> None:
        """Any layout's optimizer state by name; each rank reads only its parameters' tensors, then keeps its split."""
        load_split_optimizer(state, path)
