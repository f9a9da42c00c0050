"""LowLevelZero at run time: the base runtime, and its optimizer reader (each rank reads only its own part of every
state tensor)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from finetune.checkpoint.files import KeyStandIns, OpenFiles, TensorKey, join_tensors, tensor_files, tree_errors
from finetune.checkpoint.optimizer_state import full_optimizer_stem, indexed_optimizer_state, optimizer_param_names
from finetune.core.plugins.zero import LowLevelZeroSpec
from finetune.parallel.base import Plugin

if TYPE_CHECKING:
    from finetune.checkpoint.model_state import TrainState


def load_zero_optimizer(state: TrainState, path: Path) -> None:
    """ZeRO: each rank reads only its own part of every state tensor, the part LowLevelZeroOptimizer's
    load_state_dict would cut from the full one (flattened, zero-padded to a multiple of the group's size,
    split evenly), so no rank holds the whole optimizer state at resume."""
    from colossalai.zero.low_level._utils import get_nd_rank, get_nd_world_size

    zero, stem = state.optimizer, full_optimizer_stem(path)
    masters = [p for group in zero.optim.param_groups for p in group["params"]]
    groups = {name: zero.param_to_pg[zero.master_to_working_param[id(p)]] for name, p in zip(optimizer_param_names(state), masters)}
    with tree_errors(stem):
        saved = join_tensors(json.loads(stem.with_name(stem.name + ".json").read_text()), KeyStandIns())
        with OpenFiles(tensor_files(stem)) as files:
            for name, values in saved["state"].items():
                group = groups.get(name)  # None: a parameter this model does not train (indexed_optimizer_state says so)
                for k, v in values.items():
                    if isinstance(v, TensorKey):
                        whole = k == "step" or group is None  # step counters stay whole, as ZeRO keeps them
                        values[k] = files[v].get_tensor(v) if whole else zero_part(files[v], v, get_nd_world_size(group), get_nd_rank(group))
    zero.optim.load_state_dict(indexed_optimizer_state(saved, list(groups)))


def zero_part(handle, key: str, size: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s part of a tensor flattened and zero-padded to a multiple of `size` (ZeRO's split),
    reading only the rows of the stored tensor that hold it."""
    stored = handle.get_slice(key)
    shape = stored.get_shape()
    numel, row = math.prod(shape), math.prod(shape[1:])
    chunk = -(-numel // size)
    start, stop = min(rank * chunk, numel), min((rank + 1) * chunk, numel)
    first, last = start // row, -(-stop // row)
    rows = stored[first:last] if shape else handle.get_tensor(key)  # a 0-d tensor is one number
    flat = rows.flatten()[start - first * row:stop - first * row]
    return torch.nn.functional.pad(flat, [0, chunk - flat.numel()]).clone()  # a copy, not a view of the mapped file


class LowLevelZero(LowLevelZeroSpec, Plugin):
    """ZeRO stage 1/2 at run time: the base runtime, with a reader of each rank's part of the optimizer state."""

    def read_optimizer(self, state: TrainState, path: Path) -> None:
        """Each rank reads only its own part of every state tensor (any layout's full state by name)."""
        load_zero_optimizer(state, path)
