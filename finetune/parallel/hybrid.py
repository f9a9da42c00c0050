"""HybridParallel's checkpoint IO: the model and optimizer of a tensor/pipeline-split model, by name, any layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from finetune.checkpoint.files import KeyStandIns, OpenFiles, TensorKey, join_tensors, split_tensors, tensor_files, tree_errors, unshared, weight_errors, weight_files, weight_key
from finetune.checkpoint.model_state import update_master_params
from finetune.checkpoint.optimizer_state import OPTIMIZER_STEM, full_optimizer_stem, global_param_names, indexed_optimizer_state, optimizer_params, tied_output_embedding
from finetune.errors import CheckpointError
from finetune.lora_tp import full_like, read_split

if TYPE_CHECKING:
    from finetune.run import Run




STAGE_OPTIMIZER_FILE = "state-stage-{:05d}.safetensors"  # tensor/pipeline parallelism: one file per pipeline stage


def save_split_optimizer(run: Run, path: Path, writes: bool, stage: int) -> None:
    """save_optimizer's format (full tensors by parameter name, as any layout reads them) for a model split by
    tensor and pipeline parallelism; every rank calls this.

    Every rank gathers its parameters' tensor-parallel splits of each state (a collective over its
    tensor-parallel group; a padded vocabulary is unpadded); one rank per pipeline stage (`writes`) writes
    its stage's states to their own file, so no rank holds another stage's; rank 0 writes state.json (the
    plain data of all stages) and the index naming each tensor's file.
    """
    params = optimizer_params(run)
    names = global_param_names(run, [name for name, _ in params])
    local = run.optimizer.state_dict()
    state = {}
    for i, values in sorted(local["state"].items()):  # the same order on every rank of a tensor-parallel group
        param = params[i][1]
        state[names[i]] = {k: full_like(param, v).detach().cpu() if torch.is_tensor(v) and v.dim() and v.shape == param.shape else v for k, v in sorted(values.items())}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in local["param_groups"]]
    # Every stage's plain data, its tensors as empty stand-ins: enough to merge and to know who writes what.
    outline = {"state": {n: {k: torch.empty(0) if torch.is_tensor(v) else v for k, v in s.items()} for n, s in state.items()}, "param_groups": groups}
    shares: list = [None] * dist.get_world_size()
    dist.all_gather_object(shares, (stage, outline) if writes else None)
    merged, owner = _merge_stages([share for share in shares if share is not None])
    files = {name: STAGE_OPTIMIZER_FILE.format(owner[name] + 1) for name in merged["state"]}
    path.mkdir(parents=True, exist_ok=True)
    if writes:
        mine = {n: s for n, s in state.items() if owner[n] == stage}  # a tied weight held by two stages is written once
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


def load_split_optimizer(run: Run, path: Path) -> None:
    """Any layout's optimizer state into this rank's split model: every rank reads the plain data and only the
    tensors of the parameters it holds (from whichever file holds them), then keeps its split of each."""
    stem = full_optimizer_stem(path)
    params = optimizer_params(run)
    local_names = [name for name, _ in params]
    names = global_param_names(run, local_names)
    with tree_errors(stem):
        saved = join_tensors(json.loads(stem.with_name(stem.name + ".json").read_text()), KeyStandIns())
        files = tensor_files(stem)
        state: dict[str, dict] = {}
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
                state[local_name] = values
        sizes = [len(group["params"]) for group in run.optimizer.param_groups]
        if len(saved["param_groups"]) != len(sizes):
            raise CheckpointError(f"resume_from: the optimizer state has {len(saved['param_groups'])} parameter groups, this optimizer {len(sizes)}")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        groups = [{**g, "params": local_names[start : start + size]} for g, start, size in zip(saved["param_groups"], starts, sizes)]
    run.optimizer.load_state_dict(indexed_optimizer_state({"state": state, "param_groups": groups}, local_names))


def load_split_model(run: Run, path: Path, setting: str = "resume_from", names: dict[str, list[str]] | None = None) -> None:
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
    """
    module = run.model.unwrap()
    aliases = tied_output_embedding(module)
    with weight_errors(path, setting):
        files = weight_files(path, setting)
        persistent = [(n, b) for n, b in module.named_buffers() if n in files]  # buffers HF does not save stay as built
        names = names or {}
        # every parameter's key found before any is read: a misfit is one line before heavy work
        keys = {n: weight_key(files, [*names.get(n, [n]), aliases.get(n, n)], path, setting) for n, _ in module.named_parameters()}
        with OpenFiles(files) as opened, torch.no_grad():
            for name, tensor in [*module.named_parameters(), *persistent]:
                key = keys.get(name, name)
                tensor.copy_(read_split(opened[key], key, tensor))
    update_master_params(run)
