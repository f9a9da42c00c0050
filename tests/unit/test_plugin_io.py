"""A plugin's checkpoint IO in-process: it writes and reads a TrainState (model, optimizer, how they were built),
not a Run, so any writer's model and optimizer state can be read back by any reader in one process, in seconds.

The multi-rank versions of these round trips (ZeRO's split reads, FSDP's scatter, TP/PP splits) are
tests/distributed/test_resharding*.py; here each plugin that runs as one CPU process writes, and every such plugin reads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.checkpoint.model_state import TrainState
from finetune.config import build_config, parse_args
from finetune.faults import Faults
from finetune.model import build_model
from finetune.run import build_run
from finetune.tasks import build_task
from tests.unit.test_gpu_paths import batches, one_rank  # noqa: F401 (one_rank: a fixture, one in-process gloo rank)

ONE_PROCESS_PLUGINS = ("torch_ddp", "low_level_zero", "torch_fsdp")


def boosted(plugin: str, method: str, tmp_path: Path) -> TrainState:
    """tiny-gpt2 boosted under `plugin` with `method`, from the same initial weights each time; its TrainState."""
    cfg = build_config(parse_args([f"plugin.name={plugin}", "model.name=tiny-gpt2", f"method={method}", f"output_dir={tmp_path}",
                                   "train.lr=1e-2", "train.warmup_steps=0", "train.batch_size=2", "lora.dropout=0"]))  # fmt: skip
    model, _ = build_model(cfg.model, seed=3)
    samples = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0)).tolist()]
    run, _ = build_run(cfg, world_size=1, device=torch.device("cpu"), task=build_task(cfg.task, cfg.data), model=model, pending=None,
                       samples=samples, pad_token_id=0, faults=Faults(""), preemption=None)  # fmt: skip
    run.plugin.forward_backward(run, batches(1, seed=ONE_PROCESS_PLUGINS.index(plugin)))  # a step of its own: moments and weights differ per plugin
    run.plugin.step(run, 1.0)
    run.optimizer.zero_grad()
    return run.plugin, run.state


def written(plugin, state: TrainState, path: Path) -> tuple[dict, dict]:
    """What the plugin writes of this state, as tensors by name: (the weights or adapter, the optimizer state)."""
    from finetune.checkpoint.files import read_safetensors_dir, read_tree
    from finetune.checkpoint.optimizer_state import full_optimizer_stem

    plugin.write_model(state, path / "model")
    plugin.write_optimizer(state, path / "optimizer")
    adapter = path / "model" / "adapter_model.safetensors"
    model = load_file(adapter) if adapter.is_file() else read_safetensors_dir(path / "model")
    optimizer = read_tree(full_optimizer_stem(path / "optimizer"))["state"]
    return model, {f"{name}/{k}": v for name, values in optimizer.items() for k, v in values.items() if torch.is_tensor(v)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_any_one_process_plugin_reads_what_another_wrote(one_rank, tmp_path, method):  # noqa: F811
    """Each plugin's model and optimizer state (each trained on its own batch, so a read that did nothing would
    show), written through its TrainState, read into every plugin's: the reader then writes exactly what the writer wrote."""
    boosted_states = {name: boosted(name, method, tmp_path / name) for name in ONE_PROCESS_PLUGINS}
    files = {name: tmp_path / f"{name}-written" for name in ONE_PROCESS_PLUGINS}
    expected = {name: written(*boosted_states[name], files[name]) for name in ONE_PROCESS_PLUGINS}
    assert all(model and any(k.endswith("/exp_avg") for k in optimizer) for model, optimizer in expected.values())
    assert not same(expected["torch_ddp"][0], expected["low_level_zero"][0]) and not same(expected["torch_ddp"][0], expected["torch_fsdp"][0])
    for writer in ONE_PROCESS_PLUGINS:
        for reader in ONE_PROCESS_PLUGINS:
            plugin, state = boosted_states[reader]
            plugin.read_model(state, files[writer] / "model")
            plugin.read_optimizer(state, files[writer] / "optimizer")
            model, optimizer = written(plugin, state, tmp_path / f"{writer}-to-{reader}")
            assert same(model, expected[writer][0]), f"{writer} -> {reader}: weights"
            assert same(optimizer, expected[writer][1]), f"{writer} -> {reader}: optimizer state"


def test_an_fsdp_lora_checkpoint_that_lists_frozen_parameters_still_reads(one_rank, tmp_path):  # noqa: F811
    """Until FSDP's optimizer kept only trainable parameters, its LoRA checkpoints listed the frozen base's in
    their parameter groups (with no state): every plugin still reads them, to the same state."""
    from finetune.checkpoint.files import read_tree, write_tree
    from finetune.checkpoint.optimizer_state import OPTIMIZER_STEM

    plugin, state = boosted("torch_fsdp", "lora", tmp_path / "fsdp")
    expected = written(plugin, state, tmp_path / "written")
    stem = tmp_path / "written" / "optimizer" / OPTIMIZER_STEM
    saved = read_tree(stem)
    _, ddp = boosted("torch_ddp", "lora", tmp_path / "ddp")
    frozen = [name for name, p in ddp.model.unwrap(unwrap_peft=False).named_parameters() if not p.requires_grad]
    assert frozen and not set(frozen) & set(saved["param_groups"][0]["params"])
    saved["param_groups"][0]["params"] += frozen  # as the old writer listed them
    write_tree(saved, stem)
    for reader in ONE_PROCESS_PLUGINS:
        plugin, state = boosted(reader, "lora", tmp_path / reader)
        plugin.read_optimizer(state, tmp_path / "written" / "optimizer")
        assert same(written(plugin, state, tmp_path / f"to-{reader}")[1], expected[1]), reader
