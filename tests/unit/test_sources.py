"""Model sources: hub ids read from a hub-cache layout built here (offline), pickle-only weights and links outside refused.

No test touches the network: HF_HUB_OFFLINE=1 and HF_HUB_CACHE point at a tmp cache, both in the
environment and in huggingface_hub's constants (read once at its import).
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from finetune import export
from finetune.checkpoint import read_adapter
from finetune.config import ConfigError, ModelConfig, load_config
from finetune.errors import FinetuneError
from finetune.model import ModelError, build_model

REV_A, REV_B = "a" * 40, "b" * 40
CVE = "CVE-2025-32434"


class Payload:
    """Unpickling this creates the marker file: what a planted pytorch_model.bin could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def save(model, tokenizer, path: Path, safe: bool = True) -> Path:
    model.save_pretrained(path, safe_serialization=safe)
    tokenizer.save_pretrained(path)
    return path


def snapshot(cache: Path, repo_id: str, rev: str) -> Path:
    """A snapshot dir of the hub cache layout, with refs/main naming the first one written."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    if not (repo / "refs" / "main").exists():
        (repo / "refs" / "main").write_text(rev)
    return repo / "snapshots" / rev


def plant_pickle(model_dir: Path, name: str, marker: Path) -> None:
    """Replace a dir's weights by a pickle file whose loading would create `marker`."""
    for file in model_dir.glob("*.safetensors"):
        file.unlink()
    torch.save({"weight": Payload(marker)}, model_dir / name)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sources")
    cache = root / "hub"
    a, tokenizer = build_model(ModelConfig(name="tiny-llama"), seed=1)
    b, _ = build_model(ModelConfig(name="tiny-llama"), seed=2)
    save(a, tokenizer, snapshot(cache, "acme/tiny-llama", REV_A))
    save(b, tokenizer, snapshot(cache, "acme/tiny-llama", REV_B))
    plant_pickle(save(a, tokenizer, snapshot(cache, "acme/pickled", REV_A)), "pytorch_model.bin", root / "hub_marker")
    plant_pickle(save(a, tokenizer, root / "pickled"), "pytorch_model.bin", root / "marker")
    save(a, tokenizer, root / "benign", safe=False)  # a real state dict, as pytorch_model.bin
    return {"root": root, "cache": cache, "a": a, "b": b, "tokenizer": tokenizer}


@pytest.fixture
def offline_hub(world, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(world["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(world["cache"]))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return world["cache"]


def same_weights(x, y) -> bool:
    return all(torch.equal(p, q) for p, q in zip(x.state_dict().values(), y.state_dict().values()))


def test_hub_id_loads_the_cached_snapshot_and_its_revision(world, offline_hub):
    main, tokenizer = build_model(ModelConfig(name="acme/tiny-llama"), seed=99)
    assert same_weights(main, world["a"]) and len(tokenizer) == len(world["tokenizer"])
    pinned, _ = build_model(ModelConfig(name="acme/tiny-llama", revision=REV_B), seed=99)
    assert same_weights(pinned, world["b"]) and not same_weights(pinned, world["a"])


def test_hub_id_neither_cached_nor_reachable_names_both_ways_out(offline_hub):
    with pytest.raises(ModelError) as built:
        build_model(ModelConfig(name="acme/missing"), seed=0)
    with pytest.raises(ConfigError) as validated:  # refused by validation too, before any model work
        load_config(["model.name=acme/missing"], world_size=1)
    for line in (str(built.value), str(validated.value)):
        assert "\n" not in line and "'acme/missing'" in line and "HF_HUB_OFFLINE is set" in line
        assert "huggingface-cli login" in line and "download it to a local dir and pass that dir as model.name" in line
    with pytest.raises(ModelError, match="at revision v9"):
        build_model(ModelConfig(name="acme/tiny-llama", revision="v9"), seed=0)


def test_validation_accepts_hub_ids_but_not_misspelt_names(offline_hub):
    cfg = load_config(["model.name=acme/tiny-llama", f"model.revision={REV_B}"], world_size=1)
    assert cfg.model.name == "acme/tiny-llama"
    with pytest.raises(ConfigError, match=r"'tiny-lama' is not a named model \(did you mean 'tiny-llama'\?\)"):
        load_config(["model.name=tiny-lama"], world_size=1)
    with pytest.raises(ConfigError, match="model.revision: only for hub ids"):
        load_config(["model.name=tiny-llama", "model.revision=main"], world_size=1)


def test_pickle_only_hub_snapshot_is_refused(world, offline_hub):
    with pytest.raises(ModelError, match=f"holds only pickle weights \\(pytorch_model.bin\\).*{CVE}.*model.allow_pickle=true"):
        build_model(ModelConfig(name="acme/pickled"), seed=0)
    assert not (world["root"] / "hub_marker").exists()


def test_allow_pickle_loads_benign_pickle_weights(world, tmp_path):
    with pytest.raises(ModelError, match=CVE):
        build_model(ModelConfig(name=str(world["root"] / "benign")), seed=0)
    model, _ = build_model(ModelConfig(name=str(world["root"] / "benign"), allow_pickle=True), seed=0)
    assert same_weights(model, world["a"])
    state = {"base_model.model.lm_head.lora_A.weight": torch.arange(6.0).reshape(2, 3)}
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}))
    torch.save(state, tmp_path / "adapter_model.bin")
    load_config(["model.name=tiny-llama", f"lora.init_from={tmp_path}", "model.allow_pickle=true"], world_size=1)
    assert torch.equal(read_adapter(tmp_path, allow_pickle=True)["base_model.model.lm_head.lora_A.weight"], state["base_model.model.lm_head.lora_A.weight"])


def sharded(world, path: Path, shard: str, weights: dict) -> Path:
    """A model dir whose model.safetensors.index.json names one shard, `shard`, holding `weights` (torch.save)."""
    save(world["a"], world["tokenizer"], path)
    (path / "model.safetensors").unlink()
    torch.save(weights, path / shard)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {key: shard for key in world["a"].state_dict()}}))
    return path


def test_a_safetensors_index_naming_a_pickle_shard_is_refused_before_it_is_opened(world, tmp_path, monkeypatch):
    planted = sharded(world, tmp_path / "planted", "pytorch_model-00001-of-00001.bin", {"weight": Payload(tmp_path / "marker")})

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load was called on the pickle shard")

    with monkeypatch.context() as patched:
        patched.setattr(torch, "load", no_load)
        with pytest.raises(ModelError, match=f"index.json names the pickle shard 'pytorch_model-00001-of-00001.bin'.*{CVE}.*model.allow_pickle=true"):
            build_model(ModelConfig(name=str(planted)), seed=0)
        with pytest.raises(ConfigError, match="names the pickle shard"):  # refused by validation too, before any model work
            load_config([f"model.name={planted}"], world_size=1)
    assert not (tmp_path / "marker").exists()
    benign = sharded(world, tmp_path / "benign", "pytorch_model-00001-of-00001.bin", world["a"].state_dict())
    model, _ = build_model(ModelConfig(name=str(benign), allow_pickle=True), seed=0)  # the user opted in
    assert same_weights(model, world["a"])


@pytest.mark.parametrize("linked", ["tokenizer.json", "config.json", "model.safetensors"])
def test_a_model_dir_file_linked_outside_it_is_refused(world, tmp_path, linked):
    model_dir = save(world["a"], world["tokenizer"], tmp_path / "model")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (model_dir / linked).rename(elsewhere / linked)
    (model_dir / linked).symlink_to(elsewhere / linked)
    with pytest.raises(ModelError, match=f"model.name: {model_dir / linked} links outside {model_dir} \\(to {elsewhere / linked}\\)"):
        build_model(ModelConfig(name=str(model_dir)), seed=0)
    with pytest.raises(ConfigError, match="links outside"):
        load_config([f"model.name={model_dir}"], world_size=1)


def test_a_model_index_naming_a_shard_outside_is_refused(world, tmp_path):
    outside = save(world["a"], world["tokenizer"], tmp_path / "outside")
    model_dir = save(world["a"], world["tokenizer"], tmp_path / "model")
    (model_dir / "model.safetensors").unlink()
    for name in ["../outside/model.safetensors", str(outside / "model.safetensors")]:
        (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {key: name for key in world["a"].state_dict()}}))
        with pytest.raises(ModelError, match=f"names '{name}' as one of its files, which resolves outside it"):
            build_model(ModelConfig(name=str(model_dir)), seed=0)


def test_an_init_from_adapter_linked_outside_is_refused(tmp_path):
    adapter, elsewhere = tmp_path / "adapter", tmp_path / "elsewhere"
    adapter.mkdir()
    elsewhere.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}))
    from safetensors.torch import save_file

    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 3)}, elsewhere / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").symlink_to(elsewhere / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match=f"lora.init_from: {adapter / 'adapter_model.safetensors'} links outside"):
        load_config(["model.name=tiny-llama", f"lora.init_from={adapter}"], world_size=1)
    with pytest.raises(FinetuneError, match="links outside"):  # the reader too, were it reached
        read_adapter(adapter, setting="lora.init_from")


def test_export_ignores_the_runs_trust_remote_code(world, tmp_path, capsys):
    """A shared run dir whose config trusts the code of a model dir it ships: export must not run that code."""
    marker = tmp_path / "code_ran"
    base = save(world["a"], world["tokenizer"], tmp_path / "base")
    (base / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w')\nfrom transformers import LlamaConfig\n\nclass EvilConfig(LlamaConfig):\n    pass\n")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    run = tmp_path / "run"
    world["a"].save_pretrained(run / "final", safe_serialization=True)
    (run / "config.yaml").write_text(f"method: full\nmodel:\n  name: {base}\n  trust_remote_code: true\n")
    report = export.export(run, tmp_path / "out")
    assert report["max_logit_difference"] <= export.LOGITS_TOLERANCE
    assert not marker.exists()
    assert "model.trust_remote_code=true, ignored: export takes it only from its own --trust-remote-code flag" in capsys.readouterr().err
    assert export.main([str(run), str(tmp_path / "out2"), "--trust-remote-kode"]) == 2


def remote_code_dir(world, path: Path, marker: Path) -> Path:
    """A model dir of a type transformers does not know, loadable only by running its configuration_evil.py (which creates `marker`)."""
    base = save(world["a"], world["tokenizer"], path)
    (base / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w')\nfrom transformers import LlamaConfig\n\nclass EvilConfig(LlamaConfig):\n    model_type = 'evil-llama'\n")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "evil-llama", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    return base


def test_a_model_dir_that_needs_its_own_code_is_one_config_error(world, tmp_path):
    marker = tmp_path / "code_ran"
    base = remote_code_dir(world, tmp_path / "evil", marker)
    with pytest.raises(ConfigError, match=r"only its own Python code \(config.json auto_map\) can load; set model.trust_remote_code=true"):
        load_config([f"model.name={base}", "method=full"], world_size=1)
    assert load_config([f"model.name={base}", "method=full", "model.trust_remote_code=true"], world_size=1).model.trust_remote_code
    assert not marker.exists()


def test_the_fit_check_passes_the_runs_trust_remote_code(world, tmp_path, monkeypatch):
    """finetune.estimate reads the config with the run's trust_remote_code: refused without it, never asked on stdin."""
    import builtins

    from finetune.estimate import EstimateError, load_model_config

    marker = tmp_path / "code_ran"
    base = remote_code_dir(world, tmp_path / "evil", marker)
    asked: list[str] = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "y")
    with pytest.raises(EstimateError, match="trust_remote_code"):
        load_model_config(str(base), trust_remote_code=False)
    assert not asked and not marker.exists()
    assert load_model_config(str(base), trust_remote_code=True).model_type == "evil-llama"  # opted in: its code ran
    assert not asked and marker.exists()
