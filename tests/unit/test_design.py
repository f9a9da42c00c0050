"""One place per choice: plugins, methods, tasks and architectures are records that the rest of the code asks.

These tests keep it so: every registered plugin provides every hook the loop, the checkpointer and the
estimator call; no module outside the records tests a plugin name, a method string, a task name or a
model type; and a plugin or an architecture registered from a test is picked up everywhere.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from finetune import booster
from finetune.core.layout import Placement, Plan
from finetune.architectures import ARCHITECTURES, Architecture, architecture, register as register_architecture
from finetune.parallel import PLUGINS, Plugin, TorchDDP, register as register_plugin, unregister as unregister_plugin
from finetune.config import build_config, parallel_plan, parse_args, validate
from finetune.methods import METHODS, Method, register as register_method
from tests.conftest import REPO
from tests.unit.test_gpu_paths import one_rank  # noqa: F401 (a fixture: one in-process gloo rank)

# Every hook train.py, checkpoint/, evaluation and estimate/ call on the run's plugin.
PLUGIN_HOOKS = (
    "problems", "plan", "constructor_kwargs", "placement", "setting_label", "shard_policy", "apply_adapters", "before_boost", "layout",
    "build_optimizer", "load_deferred",
    "after_boost", "forward_backward", "clip_gradients", "step", "eval_forward", "write_model", "read_model", "load_adapter",
    "read_weights", "write_optimizer", "read_optimizer", "quantized_storage", "held_weight_bytes",
)  # fmt: skip


def config_for(plugin: str, *extra: str):
    return build_config(parse_args([f"plugin.name={plugin}", "model.name=tiny-llama", *extra]))


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_every_registered_plugin_provides_every_hook(name):
    plugin = PLUGINS[name]
    assert isinstance(plugin, Plugin) and plugin.name == name and plugin.class_name.endswith("Plugin")
    for hook in PLUGIN_HOOKS:
        assert callable(getattr(plugin, hook, None)), (name, hook)
    extra = ("plugin.pp_size=2", "plugin.num_microbatches=2") if "pp_size" in plugin.options else ()
    cfg = config_for(name, *extra)
    assert set(plugin.options) <= set(cfg.plugin.options)  # resolved once, defaults included
    assert isinstance(validate(cfg, world_size=2, has_cuda=True), list)
    assert isinstance(parallel_plan(cfg, 2), Plan)
    assert isinstance(plugin.placement(cfg, 2), Placement)
    assert isinstance(plugin.setting_label(cfg.plugin.options, 2, 1), str)


def test_registered_plugins_name_colossalai_classes():
    from colossalai.booster import plugin as colossalai_plugins

    for plugin in PLUGINS.values():
        assert hasattr(colossalai_plugins, plugin.class_name), plugin.class_name


# Lines in these modules may not decide by a plugin's, method's or task's name, or by a model type.
ASKING_MODULES = (
    "train.py", *(f"{package}/{p.name}" for package in ("checkpoint", "estimate") for p in sorted((REPO / "finetune" / package).glob("*.py"))),
    "evaluation.py", "outputs.py", "data.py", "export.py", "run.py", "distributed.py", "report.py",
)  # fmt: skip
NAME_TESTS = [
    re.compile(r"""["'](torch_ddp|low_level_zero|gemini|torch_fsdp|hybrid_parallel)["']"""),
    re.compile(r"plugin\.name=(torch_ddp|low_level_zero|gemini|torch_fsdp|hybrid_parallel)\b"),  # a setup spelled out (the fit search asks the records)
    re.compile(r"""(==|!=|\bin\b)\s*\(?["'](full|lora|qlora)["']"""),
    re.compile(r"""["'](classification|instruction|summarization|chat)["']\s*(==|!=)|(==|!=)\s*["'](classification|instruction|summarization|chat)["']"""),
    re.compile(r"labels is (not )?None|run\.labels|\bif labels\b"),
    re.compile(r"model_type\s*(==|!=|in\b)"),
    re.compile(r"(\]|spec|plugin)\.fsdp\b"),  # the old capability flag that branches read
]


def test_no_module_tests_a_plugin_method_task_or_model_name():
    found = []
    for name in ASKING_MODULES:
        for number, line in enumerate((REPO / "finetune" / name).read_text().splitlines(), start=1):
            code = line.split("#", 1)[0]
            if any(pattern.search(code) for pattern in NAME_TESTS):
                found.append(f"finetune/{name}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_train_py_stays_a_short_recipe():
    assert len((REPO / "finetune" / "train.py").read_text().splitlines()) < 400


def test_name_tests_catch_a_setup_spelled_out():
    """The fit search once spelled `plugin.name=low_level_zero`; a name standing alone in quotes is not the only spelling."""
    assert any(pattern.search('singles += [(("plugin.name=low_level_zero", "plugin.stage=2"), 2)]') for pattern in NAME_TESTS)
    assert not any(pattern.search('singles += [change for spec in SPECS.values() for change in spec.fit_alternatives(world_size)]') for pattern in NAME_TESTS)


class MirrorDDP(TorchDDP):
    """A plugin registered by a test: TorchDDP under another name, with one option of its own forced off; it
    notes which of its run-time hooks ran."""

    name = "test_mirror_ddp"
    short_name = "mirror"

    def __init__(self) -> None:
        self.ran: list[str] = []

    def problems(self, cfg, world_size, has_cuda):
        return ["plugin.static_graph: the mirror plugin refuses it"] if cfg.plugin.options["static_graph"] else []

    def forward_backward(self, run, micro_batches):
        self.ran.append("forward_backward")
        return super().forward_backward(run, micro_batches)

    def write_model(self, state, path):
        self.ran.append("write_model")
        super().write_model(state, path)

    def read_optimizer(self, state, path):
        self.ran.append("read_optimizer")
        super().read_optimizer(state, path)


@pytest.fixture
def mirror_plugin():
    plugin = register_plugin(MirrorDDP())
    yield plugin
    unregister_plugin(plugin.name)


def test_a_plugin_is_one_record(mirror_plugin):
    cfg = config_for("test_mirror_ddp", "plugin.bucket_cap_mb=10")
    assert cfg.plugin.options["bucket_cap_mb"] == 10 and validate(cfg, world_size=2, has_cuda=False) == []
    assert validate(config_for("test_mirror_ddp", "plugin.static_graph=true"), world_size=2, has_cuda=False) == ["plugin.static_graph: the mirror plugin refuses it"]
    assert booster.plugin_kwargs("test_mirror_ddp", cfg.plugin.options, "fp32", 1.0, on_cpu=True)["bucket_cap_mb"] == 10
    from finetune import estimate

    ours = estimate.estimate(cfg, world_size=2, seq_len=32, device="cpu")
    ddp = estimate.estimate(config_for("torch_ddp", "plugin.bucket_cap_mb=10"), world_size=2, seq_len=32, device="cpu")
    assert ours.total() == ddp.total() and ours.setup["plugin"] == "test_mirror_ddp"
    from finetune.report import setting_name

    assert setting_name({"plugin": "test_mirror_ddp", "plugin_options": cfg.plugin.options, "world_size": 2}) == "mirror x2"


@pytest.fixture
def mirror_method():
    """A method registered by a test: LoRA under another name (adapters train, the base stays frozen)."""
    method = register_method(Method("test_mirror_lora", adapter=True, quantized_base=False, summary="LoRA, registered by a test"))
    yield method
    del METHODS[method.name]


@pytest.mark.parametrize("method", ["full", "test_mirror_lora"])
def test_a_plugin_and_a_method_record_drive_the_loop_and_the_checkpointer(mirror_plugin, mirror_method, one_rank, tmp_path, method):  # noqa: F811
    """The registered plugin is what build_run boosts with, what a training step and the checkpoint store call, and
    what a resume reads back with: weights and optimizer state as saved. The registered method is a valid
    `method=` and decides, as the built-in ones do, what trains (adapters) and what a checkpoint holds."""
    import torch

    from finetune.checkpoint import load_checkpoint, save_checkpoint
    from finetune.faults import Faults
    from finetune.model import build_model
    from finetune.run import build_run
    from finetune.tasks import build_task
    from tests.unit.test_gpu_paths import batches

    cfg = config_for("test_mirror_ddp", "model.name=tiny-gpt2", f"method={method}", f"output_dir={tmp_path}", "train.lr=1e-2", "train.batch_size=2", "lora.dropout=0")
    assert validate(cfg, world_size=1, has_cuda=False) == []
    model, _ = build_model(cfg.model, seed=3)
    samples = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(0)).tolist()]
    run, _ = build_run(cfg, world_size=1, device=torch.device("cpu"), task=build_task(cfg.task, cfg.data), model=model, pending=None, samples=samples,
                       pad_token_id=0, faults=Faults(""), preemption=None)
    assert run.plugin is mirror_plugin and type(run.booster.plugin).__name__ == mirror_plugin.class_name and run.method is METHODS[method]
    trainable = {name for name, p in run.model.unwrap().named_parameters() if p.requires_grad}
    assert all("lora_" in name for name in trainable) if run.method.adapter else len(trainable) == len(list(run.model.unwrap().parameters()))

    def train_step(seed: int) -> None:
        run.plugin.forward_backward(run, batches(2, seed))
        run.plugin.step(run, 1.0)
        run.optimizer.zero_grad()
        run.scheduler.step()

    train_step(0)
    saved = save_checkpoint(run, 1)
    assert (saved / "model" / "adapter_model.safetensors").is_file() == run.method.adapter
    weights = {k: v.clone() for k, v in run.model.unwrap().state_dict().items()}
    moments = [s["exp_avg"].clone() for s in run.optimizer.state_dict()["state"].values()]
    train_step(1)
    assert load_checkpoint(run, saved) == (1, "")
    assert all(torch.equal(v, weights[k]) for k, v in run.model.unwrap().state_dict().items())
    assert all(torch.equal(s["exp_avg"], m) for s, m in zip(run.optimizer.state_dict()["state"].values(), moments))
    assert mirror_plugin.ran == ["forward_backward", "write_model", "forward_backward", "read_optimizer"]


@pytest.fixture
def neox_architecture():
    record = register_architecture(Architecture("gpt_neox", display="GPT-NeoX", lora_targets=("query_key_value",), packed_attention=""))
    yield record
    del ARCHITECTURES[record.model_type]


def test_an_architecture_is_one_record(neox_architecture, tmp_path):
    """GPT-NeoX (Pythia) gets default LoRA targets from its record alone; LoRA under TP stays refused (no TP layers in it)."""
    from transformers import GPTNeoXConfig

    from finetune.config import LoraConfig
    from finetune.model import build_lora_config

    config = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    config.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    assert build_lora_config(model, LoraConfig()).target_modules == {"query_key_value"}
    assert architecture("gpt_neox").title == "GPT-NeoX"
    cfg = build_config(parse_args([f"model.name={tmp_path}", "plugin.name=hybrid_parallel", "plugin.tp_size=2"]))
    problems = validate(cfg, world_size=2, has_cuda=False)
    assert any(p.startswith("method=lora with plugin.tp_size>1 supports model types gpt2, llama, mistral, mixtral, qwen2, roberta; ") and "is gpt_neox" in p for p in problems), problems


def test_methods_are_records():
    assert {name: (m.adapter, m.quantized_base) for name, m in METHODS.items()} == {"full": (False, False), "lora": (True, False), "qlora": (True, True)}


def test_every_transformers_load_passes_trust_remote_code():
    """No transformers loader call may fall back to its default (None), which asks on the terminal whether to run a
    model dir's code and hangs a batch job; peft's loaders run no model code."""
    import ast

    found = []
    for path in sorted((REPO / "finetune").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("from_pretrained", "from_config"):
                receiver = ast.unparse(node.func.value)
                if not receiver.startswith(("Peft", "TASKS")) and "trust_remote_code" not in {k.arg for k in node.keywords}:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)[:100]}")
    assert not found, "\n".join(found)


# The upstream libraries the fixes in finetune/fixes/ repair, each in its own module.
FIXED_LIBRARIES = ("colossalai", "torch", "transformers", "peft", "bitsandbytes")


def test_each_upstream_library_has_one_fix_module_with_one_version_guard():
    guards = {}
    for path in sorted((REPO / "finetune").rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"^SUPPORTED_[A-Z]+ *=", text, re.MULTILINE), f"{path.relative_to(REPO)}: a version guard outside finetune/fixes' VersionGuard"
        if count := text.count("VersionGuard("):
            guards[str(path.relative_to(REPO))] = count
    assert guards == {f"finetune/fixes/{library}.py": 1 for library in FIXED_LIBRARIES}


def test_fixes_are_applied_from_one_place():
    # Process-wide fixes go through finetune.fixes.apply(), called once at start-up by distributed.launch;
    # no other module applies a fix module's apply() itself.
    calls = {}
    for path in sorted((REPO / "finetune").rglob("*.py")):
        if path.parent.name != "fixes":
            if found := re.findall(r"\b(?:fixes|compat|patches|colossalai|transformers|peft)\.apply\w*\(", path.read_text()):
                calls[str(path.relative_to(REPO))] = found
    assert calls == {"finetune/distributed.py": ["fixes.apply("]}


def test_a_run_is_built_by_keyword_in_one_place():
    import dataclasses

    from finetune.run import Run

    assert all(field.kw_only for field in dataclasses.fields(Run))
    with pytest.raises(TypeError):
        Run(*range(len(dataclasses.fields(Run))))  # a positional Run silently shifted its fields when one was added
    # Everything that needs a Run (train.py, bench/, tests) gets it from finetune.run.build_run, not a copy or a stand-in
    # (this file builds one above only to see it refused).
    built = []
    for path in sorted([*(REPO / "finetune").rglob("*.py"), *(REPO / "bench").glob("*.py"), *(REPO / "tests").rglob("*.py")]):
        if path not in (REPO / "finetune" / "run.py", Path(__file__)) and re.search(r"\bRun\(|SimpleNamespace\((cfg|model)=", path.read_text()):
            built.append(str(path.relative_to(REPO)))
    assert built == []
