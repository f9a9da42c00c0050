"""Pretrained weights loaded per shard (finetune.deferred): no rank builds the whole model under
hybrid_parallel (TP/PP) or FSDP, and the sharded model is still exactly the checkpoint's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune import deferred
from finetune.parallel import PLUGINS
from finetune.checkpoint import CheckpointError
from finetune.checkpoint.files import WeightsDir
from finetune.config import ModelConfig
from finetune.methods import METHODS
from finetune.model import build_model


@pytest.fixture(scope="module")
def pretrained_dirs(tmp_path_factory) -> dict[str, Path]:
    """Real (saved, reloaded) tiny weights: a Llama with tied embeddings, as SmolLM2, and GPT-2 (tied, fused q/k/v)."""
    root = tmp_path_factory.mktemp("pretrained")
    dirs = {}
    for name in ("tiny-llama", "tiny-gpt2"):
        model, tokenizer = build_model(ModelConfig(name=name), seed=7)
        if not model.config.tie_word_embeddings:
            model.config.tie_word_embeddings = True
            model.tie_weights()
        model.save_pretrained(root / name, safe_serialization=True)
        tokenizer.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.mark.parametrize("init", ["lazy", "meta"])
def test_a_deferred_build_holds_no_weights_and_knows_where_they_are(pretrained_dirs, init):
    model, _ = build_model(ModelConfig(name=str(pretrained_dirs["tiny-llama"])), seed=0, init=init)
    assert all(p.is_meta for p in model.parameters())  # LazyTensors are meta-backed until materialized
    pending = deferred.pending(model)
    assert pending.path == pretrained_dirs["tiny-llama"]
    assert pending.names["lm_head.weight"] == ["model.embed_tokens.weight", "lm_head.weight"]  # tied: stored once
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_what_is_always_built_with_its_weights(pretrained_dirs):
    """Random-init named configs (seeded, the same under every plugin), classifiers (a new head) and
    LoRA/QLoRA (peft needs the real base) load eagerly even where the plugin defers."""
    named, _ = build_model(ModelConfig(name="tiny-llama"), seed=0, init="lazy")
    classifier, _ = build_model(ModelConfig(name=str(pretrained_dirs["tiny-llama"])), seed=0, labels=["a", "b"], init="meta")
    for model in (named, classifier):
        assert deferred.pending(model) is None and not any(p.is_meta for p in model.parameters())
    assert {name: m.model_init("lazy") for name, m in METHODS.items()} == {"full": "lazy", "lora": "eager", "qlora": "eager"}
    assert {p.model_init for p in PLUGINS.values()} >= {"eager", "lazy", "meta"}


def test_a_checkpoint_that_does_not_fill_the_model_is_one_clear_error(pretrained_dirs, tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "pytorch_model.bin"}}))
    with pytest.raises(CheckpointError, match=r"^model.name: .* names 'pytorch_model.bin'; only safetensors"):
        WeightsDir(tmp_path)
    checkpoint = WeightsDir(pretrained_dirs["tiny-llama"])
    with pytest.raises(CheckpointError, match=r"^model.name: .* has no weight for model.norm.bias; its weights do not fit this model"):
        checkpoint.key_for(["model.norm.bias"])
