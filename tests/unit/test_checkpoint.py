"""Checkpoint files in process: plain-data trees and RNG state round-trip, pickle weight files and format 1 are refused;
the model head an export rebuilds."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from finetune import checkpoint


def test_plain_data_round_trip_keeps_tensors_and_refuses_non_string_keys(tmp_path):
    state = {"state": {"h.0.w": {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 3)}}, "param_groups": [{"betas": (0.9, 0.99), "params": ["h.0.w"]}]}
    checkpoint.write_tree(state, tmp_path / "optimizer" / "state")
    back = checkpoint.read_tree(tmp_path / "optimizer" / "state")
    assert set(load_file(tmp_path / "optimizer" / "state.safetensors")) == {"state/h.0.w/step", "state/h.0.w/exp_avg"}  # keyed by name
    assert torch.equal(back["state"]["h.0.w"]["exp_avg"], torch.ones(2, 3)) and back["param_groups"] == [{"betas": [0.9, 0.99], "params": ["h.0.w"]}]
    with pytest.raises(TypeError, match="only string keys"):
        checkpoint.write_tree({"state": {0: {}}}, tmp_path / "x")


def test_weight_index_naming_a_pickle_file_and_format_1_are_refused(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "pytorch_model-00001.bin"}}))
    with pytest.raises(checkpoint.CheckpointError, match="only safetensors files"):
        checkpoint.check_weight_files(tmp_path)
    old = tmp_path / "step_00000004"
    old.mkdir()
    (old / "state.json").write_text(json.dumps({"format": 1, "files": {}}))
    from finetune.config import load_config

    cfg = load_config([f"resume_from={old}"], has_cuda=False)
    with pytest.raises(checkpoint.CheckpointError, match=r"format 1 keeps optimizer.*lora.init_from=.*step_00000004/model"):
        checkpoint.resolve_resume(cfg)


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = checkpoint.rng_state()
    first = (torch.rand(3), random.random(), np.random.rand())
    checkpoint.set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_export_rebuilds_the_runs_head(tmp_path):
    """finetune.export builds the base with the run's head before it merges or loads the weights: a causal LM (None), a
    reward model's one output, a classifier's labels from beside its weights (adapter: labels.json; full: config.json),
    else data.labels, else the training records'; a classifier whose labels are nowhere is refused."""
    from finetune.config import build_config, parse_args
    from finetune.export_source import ExportError, head_labels

    def labels(*overrides: str):
        return head_labels(build_config(parse_args(["model.name=tiny-gpt2", *overrides])), tmp_path)

    assert labels("task=instruction") is None and labels("task=preference") is None
    assert labels("task=reward") == ["reward"]
    with pytest.raises(ExportError, match="the classifier's label set is unknown"):
        labels("task=classification")
    assert labels("task=classification", "data.labels=[b,a]") == ["b", "a"]
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"1": "sad", "0": "happy"}}))
    assert labels("task=classification", "data.labels=[b,a]") == ["happy", "sad"]
    (tmp_path / "labels.json").write_text(json.dumps(["x", "y", "z"]))
    assert labels("task=classification") == ["x", "y", "z"]
    (tmp_path / "labels.json").write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ExportError, match="labels.json: expected a list of at least two label strings"):
        labels("task=classification")
    # A checkpoint has no labels.json: the classifier's labels are the training records', as the run derived them.
    (tmp_path / "labels.json").unlink()
    (tmp_path / "config.json").unlink()
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"row {i}", "label": "yes" if i % 3 else "no"}) + "\n" for i in range(30)))
    assert sorted(labels("task=classification", f"data.train_path={rows}")) == ["no", "yes"]
