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
from finetune.config import ModelConfig, build_config, parse_args
from finetune.methods import method_named
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
    """Random-init named configs (seeded, the same under every plugin) and classifiers (a new head) load eagerly even
    where the plugin defers."""
    named, _ = build_model(ModelConfig(name="tiny-llama"), seed=0, init="lazy")
    classifier, _ = build_model(ModelConfig(name=str(pretrained_dirs["tiny-llama"])), seed=0, labels=["a", "b"], init="meta")
    for model in (named, classifier):
        assert deferred.pending(model) is None and not any(p.is_meta for p in model.parameters())
    assert {p.model_init for p in PLUGINS.values()} >= {"eager", "lazy", "meta"}


HYBRID_TP2, HYBRID_PP2 = ("plugin.name=hybrid_parallel", "plugin.tp_size=2"), ("plugin.name=hybrid_parallel", "plugin.pp_size=2")


@pytest.mark.parametrize(
    "args, init",
    [
        (("method=full", *HYBRID_TP2), "lazy"),
        (("method=full", "plugin.name=torch_fsdp"), "meta"),
        (("method=lora", *HYBRID_TP2), "lazy"),  # adapters injected beside the lazy base, sharded with it
        (("method=lora", *HYBRID_PP2), "lazy"),
        (("method=lora", *HYBRID_TP2, "lora.init=gaussian"), "lazy"),
        (("method=qlora", *HYBRID_TP2, "quantization.double_quant=false"), "lazy"),  # each rank quantizes its shards once read
        (("method=qlora", *HYBRID_PP2), "eager"),  # bitsandbytes quantizes the whole model while loading it
        (("method=lora", *HYBRID_TP2, "lora.init=pissa"), "eager"),  # PiSSA/OLoRA decompose the base weights
        (("method=lora", *HYBRID_PP2, "lora.init=olora"), "eager"),
        (("method=lora", *HYBRID_PP2, "lora.use_dora=true"), "eager"),  # DoRA takes the base weights' norms
        (("method=lora", "plugin.name=torch_fsdp"), "eager"),  # peft would leave adapters on the meta device
        (("method=qlora", "plugin.name=torch_fsdp"), "eager"),
        (("method=lora", "plugin.name=torch_ddp"), "eager"),
        (("method=lora", "plugin.name=low_level_zero"), "eager"),
    ],
)
def test_which_builds_wait_for_the_plugin(args, init):
    """Method.model_init, the one place deciding it, from the method, the plugin and the adapter's init."""
    cfg = build_config(parse_args(list(args)))
    assert method_named(cfg.method).model_init(PLUGINS[cfg.plugin.name], cfg) == init


def test_a_checkpoint_that_does_not_fill_the_model_is_one_clear_error(pretrained_dirs, tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "pytorch_model.bin"}}))
    with pytest.raises(CheckpointError, match=r"^model.name: .* names 'pytorch_model.bin'; only safetensors"):
        WeightsDir(tmp_path)
    checkpoint = WeightsDir(pretrained_dirs["tiny-llama"])
    with pytest.raises(CheckpointError, match=r"^model.name: .* has no weight for model.norm.bias; its weights do not fit this model"):
        checkpoint.key_for(["model.norm.bias"])
