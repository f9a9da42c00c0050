"""Config in process: YAML files, key=value overrides, precedence, and one-line errors for bad input."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from finetune.core.plugins import gemini
from finetune.parallel import PLUGINS
from finetune.config import ConfigError, build_config, load_config, parse_args, to_dict
from finetune.gpu_check import EXAMPLE_RUNS
from tests.conftest import REPO


def test_defaults_are_the_quickstart():
    cfg = load_config([], world_size=2)
    assert (cfg.model.name, cfg.method, cfg.plugin.name, cfg.data.train_path) == (
        "smollm2-135m-instruct",
        "lora",
        "torch_ddp",
        "chatterbot-corpus",
    )


def test_overrides_are_typed():
    cfg = load_config(["train.max_steps=7", "train.lr=1e-3", "lora.target_modules=[q_proj,v_proj]", "train.gradient_checkpointing=true", "output_dir=/tmp/x"], world_size=1)
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.lr == pytest.approx(1e-3)  # YAML reads '1e-3' as a string; we take it as a number
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.gradient_checkpointing is True
    assert cfg.output_dir == "/tmp/x"


def test_cpu_allocator_is_fast_by_default_exact_on_request_and_nothing_else():
    """train.cpu_allocator (issue 24): the steps' heap by default; exact for measuring memory on CPU; taken on
    CUDA too (it has no effect there); any other value is one error line naming the two."""
    assert load_config([], world_size=1).train.cpu_allocator == "fast"
    assert load_config(["train.cpu_allocator=exact"], world_size=1, has_cuda=True).train.cpu_allocator == "exact"
    with pytest.raises(ConfigError, match=r"^train.cpu_allocator: unknown value 'exakt' \(did you mean 'exact'\?\); choose from fast, exact$"):
        load_config(["train.cpu_allocator=exakt"], world_size=1)


def test_comma_list_override():
    assert load_config(["lora.target_modules=q_proj,v_proj"], world_size=1).lora.target_modules == ["q_proj", "v_proj"]


@pytest.fixture(autouse=True)
def cuda_toolkit(tmp_path_factory, monkeypatch):
    """A CUDA toolkit where the tests say has_cuda=True (Gemini refuses without one, as a GPU machine without it would)."""
    monkeypatch.setenv("CUDA_HOME", str(tmp_path_factory.getbasetemp()))


def test_gemini_without_a_cuda_toolkit_is_refused_in_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc
    monkeypatch.setattr(gemini, "DEFAULT_CUDA_HOME", tmp_path / "cuda")
    with pytest.raises(ConfigError, match="HybridAdam builds its CUDA kernels on first use .* set CUDA_HOME"):
        load_config(["--config", str(REPO / "booster_configs" / "gemini.yaml"), "method=full"], world_size=2, has_cuda=True)


def test_later_config_files_and_overrides_win(tmp_path):
    first = tmp_path / "a.yaml"
    first.write_text("train:\n  max_steps: 3\n  lr: 0.5\nplugin:\n  name: torch_ddp\n  bucket_cap_mb: 10\n")
    second = tmp_path / "b.yaml"
    second.write_text("train:\n  max_steps: 4\n")
    cfg = load_config(["--config", str(first), f"--config={second}", "train.lr=0.25"], world_size=1)
    assert cfg.train.max_steps == 4
    assert cfg.train.lr == 0.25
    assert cfg.plugin.options == {**PLUGINS["torch_ddp"].options, "bucket_cap_mb": 10}  # resolved once: defaults included
    assert to_dict(cfg)["plugin"]["bucket_cap_mb"] == 10


# Each booster config with the run it is meant for: (file, extra overrides, world size, CUDA present).
BOOSTER_CONFIG_RUNS = {name: (extra, world, name.startswith("gemini")) for name, (extra, world) in EXAMPLE_RUNS.items()}


def test_every_booster_config_file_is_covered():
    assert sorted(p.name for p in (REPO / "booster_configs").glob("*.yaml")) == sorted(BOOSTER_CONFIG_RUNS)


@pytest.mark.parametrize("name", sorted(BOOSTER_CONFIG_RUNS))
def test_booster_config_file_validates(name):
    extra, world, cuda = BOOSTER_CONFIG_RUNS[name]
    cfg = load_config(["--config", str(REPO / "booster_configs" / name), *extra], world_size=world, has_cuda=cuda)
    assert cfg.plugin.name in ("torch_ddp", "low_level_zero", "gemini", "hybrid_parallel", "torch_fsdp")


def test_plugin_arguments_from_yaml():
    from finetune.booster import plugin_kwargs

    cfg = load_config(["--config", str(REPO / "booster_configs" / "pp2_interleaved.yaml"), "train.precision=bf16", "train.max_grad_norm=0.5"], world_size=2, has_cuda=True)
    on_gpu = plugin_kwargs(cfg.plugin.name, cfg.plugin.options, cfg.train.precision, cfg.train.max_grad_norm, on_cpu=False)
    assert (on_gpu["pp_size"], on_gpu["pp_style"], on_gpu["num_model_chunks"], on_gpu["num_microbatches"]) == (2, "interleaved", 2, 4)
    assert (on_gpu["precision"], on_gpu["max_norm"], on_gpu["overlap_p2p"], on_gpu["microbatch_size"]) == ("bf16", 0.5, True, None)
    assert on_gpu["make_vocab_size_divisible_by"] == 1  # PP without TP: no padding (ColossalAI cannot save it)
    on_cpu = plugin_kwargs(cfg.plugin.name, cfg.plugin.options, cfg.train.precision, cfg.train.max_grad_norm, on_cpu=True)
    assert on_cpu["overlap_p2p"] is False and on_cpu["overlap_communication"] is False
    gemini = load_config(["--config", str(REPO / "booster_configs" / "gemini_auto.yaml"), "method=full"], world_size=2, has_cuda=True)
    kwargs = plugin_kwargs(gemini.plugin.name, gemini.plugin.options, "bf16", 1.0, on_cpu=False)
    assert (kwargs["placement_policy"], kwargs["steady_cuda_cap_ratio"], kwargs["pin_memory"], kwargs["precision"]) == ("auto", 0.9, True, "bf16")


def test_fsdp_arguments_from_yaml():
    from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy

    from finetune.booster import plugin_kwargs

    cfg = load_config(["--config", str(REPO / "booster_configs" / "fsdp_cpu_offload.yaml"), "train.precision=bf16", "plugin.sharding_strategy=SHARD_GRAD_OP"], world_size=2)
    kwargs = plugin_kwargs(cfg.plugin.name, cfg.plugin.options, cfg.train.precision, cfg.train.max_grad_norm, on_cpu=False)
    assert kwargs["sharding_strategy"] is ShardingStrategy.SHARD_GRAD_OP
    assert kwargs["backward_prefetch"] is BackwardPrefetch.BACKWARD_PRE
    assert kwargs["cpu_offload"].offload_params is True
    # On CPU the parameters are in host memory already (and torch 2.5's offload needs an accelerator): forced off.
    assert plugin_kwargs(cfg.plugin.name, cfg.plugin.options, cfg.train.precision, cfg.train.max_grad_norm, on_cpu=True)["cpu_offload"].offload_params is False
    assert kwargs["mixed_precision"].param_dtype is torch.bfloat16 and "precision" not in kwargs
    with pytest.raises(ConfigError, match="plugin.sharding_strategy: unknown value 'FULL'"):
        load_config(["--config", str(REPO / "booster_configs" / "fsdp.yaml"), "plugin.sharding_strategy=FULL"], world_size=2)


def test_tensor_parallel_must_divide_the_heads():
    tp2 = str(REPO / "booster_configs" / "tp2.yaml")
    with pytest.raises(ConfigError, match="9 attention heads and 3 key/value heads.*tp sizes that fit: 1, 3"):
        load_config(["--config", tp2, "method=full"], world_size=2)
    cfg = load_config(["--config", tp2, "method=full", "plugin.tp_size=3"], world_size=3)
    assert cfg.plugin.options["tp_size"] == 3


@pytest.mark.parametrize(
    "config, argv, world, message",
    [
        ("gemini.yaml", ["method=full"], 2, "plugin.name=gemini: needs a CUDA GPU"),
        ("gemini.yaml", [], 2, "plugin 'gemini' cannot hold LoRA adapters"),
        ("tp2.yaml", ["method=full", "model.name=tiny-gpt2"], 3, "world size 3 is not divisible by tp_size*pp_size=2"),
        ("tp2_lora.yaml", ["model.name=tiny-llama", "lora.target_modules=[q_proj,lm_head]"], 2, "lora.target_modules: ['lm_head'] cannot be adapted under tensor parallelism in llama; these can: q_proj, k_proj"),
        ("tp2_lora.yaml", ["model.name=tiny-llama", "plugin.enable_sequence_parallelism=true"], 2, "plugin.enable_sequence_parallelism: renamed; use plugin.sp_size (all_to_all) or plugin.sp_mode=split_gather|ring"),
        ("tp2.yaml", ["method=full", "model.name=tiny-llama", "plugin.sequence_parallelism_mode=ring"], 2, "plugin.sequence_parallelism_mode: renamed; use plugin.sp_mode"),
        ("sp2_lora.yaml", ["model.name=tiny-gpt2"], 2, "plugin.sp_mode=all_to_all: sequence parallelism is built for model types llama"),
        ("sp2_lora.yaml", ["model.name=tiny-llama", "plugin.sp_mode=ring_attn"], 2, "plugin.sp_mode=ring_attn: ring attention runs on flash-attention's kernels, which need a CUDA GPU and the flash-attn package (missing here: a CUDA GPU"),
        ("sp2_lora.yaml", ["model.name=tiny-llama", "plugin.sp_mode=split_gather", "plugin.sp_size=1"], 2, "plugin.sp_mode=split_gather splits the sequence over the tensor-parallel group and needs plugin.tp_size>1"),
        ("tp2_lora.yaml", ["model.name=tiny-llama", "plugin.sp_mode=ring", "plugin.sp_size=4"], 2, "plugin.sp_size=4 with plugin.sp_mode=ring: the sequence is split over the tp_size=2 tensor-parallel ranks"),
        ("tp2.yaml", ["method=full", "model.name=tiny-llama", "plugin.sp_mode=ring"], 2, "plugin.sp_mode=ring with method=full: ColossalAI 0.5.0's ring-overlapped linear layers give wrong weight gradients"),
        ("sp2_lora.yaml", ["model.name=tiny-llama", "plugin.sp_size=4"], 4, "tiny-llama has 4 attention heads and 2 key/value heads, which tp_size x sp_size=4 must divide; sp sizes that fit with tp_size=1: 1, 2"),
        ("sp2_lora.yaml", ["model.name=tiny-llama"], 3, "world size 3 is not divisible by tp_size*pp_size*sp_size=2"),
        ("sp2_lora.yaml", ["model.name=tiny-llama", "plugin.tp_size=2"], 4, "plugin.sp_mode=all_to_all with plugin.tp_size>1 is not checked"),
        ("sp2_lora.yaml", ["model.name=tiny-llama", "plugin.pp_size=2", "plugin.num_microbatches=2"], 4, "sequence parallelism with plugin.pp_size>1 is not checked"),
        ("sp2_lora.yaml", ["model.name=tiny-llama", "plugin.sp_size=0"], 2, "plugin.tp_size, plugin.pp_size and plugin.sp_size must be at least 1, got 1, 1 and 0"),
        ("sp2_lora.yaml", ["model.name=tiny-llama", "plugin.sp_mode=ulysses"], 2, "plugin.sp_mode: unknown value 'ulysses'; choose from all_to_all, split_gather, ring, ring_attn"),
        ("sp2_lora.yaml", ["model.name=tiny-llama", "task=classification"], 2, "task=classification with sequence parallelism: only causal-LM tasks"),
        ("sp2_lora.yaml", ["model.name=tiny-llama", "method=qlora"], 2, "method=qlora with plugin.sp_mode=all_to_all: QLoRA under sequence parallelism is not built"),
        ("tp2_lora.yaml", ["model.name=tiny-llama-wide", "method=qlora", "quantization.double_quant=false", "plugin.sp_mode=split_gather"], 2, "method=qlora with plugin.sp_mode=split_gather: QLoRA under sequence parallelism is not built"),
        ("sp2_lora.yaml", ["model.name=tiny-llama", "data.packing=true", "plugin.enable_flash_attention=true"], 2, "data.packing=true with sequence parallelism keeps sample boundaries by the block attention mask"),
        ("tp2.yaml", ["method=full", "model.name=tiny-llama", "data.packing=true"], 2, "data.packing=true with plugin hybrid_parallel: shardformer builds its own attention mask"),
        ("pp2.yaml", ["plugin.num_microbatches=0"], 2, "needs plugin.num_microbatches"),
        ("pp2.yaml", ["plugin.num_microbatches=3"], 2, "train.batch_size=4 must be divisible by plugin.num_microbatches=3"),
        ("pp2.yaml", ["plugin.num_microbatches=1"], 2, "at least pp_size=2 micro-batches"),
        ("pp2.yaml", ["plugin.zero_stage=2", "train.precision=bf16"], 2, "zero_stage=2 cannot be combined with pipeline parallelism"),
        ("pp2.yaml", ["train.grad_accum_steps=2"], 2, "raise plugin.num_microbatches instead"),
        ("pp2.yaml", ["plugin.pp_style=interleaved"], 2, "interleaved goes with plugin.num_model_chunks>1"),
        ("tp2.yaml", ["method=full", "model.name=tiny-gpt2", "plugin.enable_flash_attention=true"], 2, "flash attention needs a CUDA GPU"),
        ("zero2.yaml", ["plugin.stage=3"], 2, "plugin.stage: must be 1 or 2"),
        ("pp2_interleaved.yaml", ["plugin.num_microbatches=4", "train.batch_size=6"], 2, "train.batch_size=6 must be divisible"),
        ("pp2_interleaved.yaml", ["plugin.num_microbatches=3", "train.batch_size=6"], 2, "interleaved schedule needs a multiple of pp_size=2"),
        ("pp2_interleaved.yaml", ["model.name=tiny-llama"], 2, "tiny-llama has 2 layers, so some chunk would hold no adapter"),
        ("pp2_zero1.yaml", ["train.precision=fp32"], 2, "plugin.zero_stage>0 under hybrid_parallel needs train.precision=bf16"),
        ("zero2.yaml", ["plugin.tp_size=2"], 2, "plugin.tp_size: not an option of plugin 'low_level_zero'"),
        ("fsdp.yaml", ["method=qlora", "quantization.bits=8"], 2, "method=qlora with quantization.bits=8 under torch_fsdp: bitsandbytes holds 8-bit weights only as int8 tensors"),
        ("tp2.yaml", ["method=qlora", "model.name=tiny-gpt2"], 2, "method=qlora with plugin.tp_size>1 supports model types llama, mistral, qwen2; tiny-gpt2 is gpt2"),
        ("tp2_lora.yaml", ["method=qlora", "model.name=tiny-mixtral", "quantization.double_quant=false"], 2, "method=qlora with plugin.tp_size>1 supports model types llama, mistral, qwen2"),
        ("tp2_lora.yaml", ["method=qlora", "model.name=tiny-llama-wide"], 2, "quantization.double_quant=true with plugin.tp_size=2: the second quantization groups 256 block scales"),
        ("tp2_lora.yaml", ["method=qlora", "model.name=tiny-llama-wide", "quantization.bits=8"], 2, "quantization.bits=8 with plugin.tp_size=2: LLM.int8 scales each output row"),
        ("tp2_lora.yaml", ["method=qlora", "model.name=tiny-llama-wide", "quantization.double_quant=false", "quantization.skip_modules=[q_proj]"], 2, "the vocabulary-parallel lm_head is not quantized"),
        ("tp2_lora.yaml", ["method=qlora", "model.name=tiny-llama", "quantization.double_quant=false"], 2, "the shards of o_proj (64x64, row-parallel) would not be whole 64-element quantization blocks"),
        ("gemini.yaml", ["method=qlora"], 2, "method=qlora: plugin 'gemini' cannot hold LoRA adapters"),
    ],
)
def test_impossible_plugin_combinations(config, argv, world, message):
    with pytest.raises(ConfigError) as err:
        load_config(["--config", str(REPO / "booster_configs" / config), *argv], world_size=world)
    assert message in str(err.value)


@pytest.mark.parametrize("config, tp", [("tp2_lora.yaml", 2), ("tp2_pp2.yaml", 2)])
def test_qlora_under_tensor_parallelism_is_accepted_where_shards_are_whole_blocks(config, tp):
    """4-bit NF4 without double quantization, shards of whole 64-element blocks: each rank quantizes its shards (finetune.qlora_tp)."""
    from finetune.core.plugins import SPECS

    cfg = load_config(["--config", str(REPO / "booster_configs" / config), "method=qlora", "model.name=tiny-llama-wide", "quantization.double_quant=false"], world_size=2 * tp if "pp2" in config else tp)
    assert SPECS["hybrid_parallel"].quantizes_shards(cfg)
    assert not SPECS["hybrid_parallel"].quantizes_shards(load_config(["--config", str(REPO / "booster_configs" / "pp2.yaml"), "method=qlora"], world_size=2))


def test_fsdp_cpu_offload_is_off_on_cpu():
    """FSDP's parameter offload is a no-op on CPU (host memory already), where torch 2.5 fails on it (its pinned
    buffers need an accelerator): forced off there, kept on GPUs."""
    from finetune.parallel import PLUGINS

    fsdp = PLUGINS["torch_fsdp"]
    options = {**fsdp.options, "cpu_offload": True}
    assert fsdp.constructor_kwargs(options, "fp32", 1.0, on_cpu=True)["cpu_offload"].offload_params is False
    assert fsdp.constructor_kwargs(options, "fp32", 1.0, on_cpu=False)["cpu_offload"].offload_params is True


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train.max_step=5"], "unknown config key 'train.max_step' (did you mean 'train.max_steps'?)"),
        (["plugin.name=zero9"], "plugin.name: unknown value 'zero9'"),
        (["train.max_steps=ten"], "train.max_steps: expected a number, got 'ten'"),
        (["train.max_steps=2.5"], "train.max_steps: expected a whole number"),
        (["method=prefix"], "method: unknown value 'prefix'"),
        (["train.precision=fp16"], "train.precision=fp16: needs a CUDA GPU"),
        (["plugin.stage=2"], "plugin.stage"),
        (["model.name=/nonexistent/model"], "model.name: '/nonexistent/model' is not a named model"),
        (["data.train_path=/nonexistent.jsonl"], "data.train_path: file not found"),
        (["lora.dropout=1.5"], "lora.dropout: must be in [0, 1)"),
        (["train.batch_size=0"], "train.batch_size: must be at least 1"),
        (["--lr", "3"], "unknown option '--lr'"),
        (["max_steps"], "expected key=value"),
        (["--config", "/nonexistent.yaml"], "--config /nonexistent.yaml: file not found"),
        (["model.name=llama2-7b"], "model.name: llama2-7b is a public config for the memory estimator"),
        (["method=qlora", "quantization.bits=3"], "quantization.bits: unknown value '3'"),
        (["method=qlora", "quantization.quant_type=int4"], "quantization.quant_type: unknown value 'int4'"),
        (["method=qlora", "quantization.compute_dtype=fp16"], "quantization.compute_dtype=fp16: half-precision matmuls need a CUDA GPU"),
        (["method=qlora", "quantization.bits=8", "quantization.quant_type=fp4"], "apply to 4-bit only"),
        (["quantization.bits=8"], "quantization.* is set but method=lora does not quantize"),
    ],
)
def test_bad_input_names_the_problem(argv, message):
    with pytest.raises(ConfigError) as err:
        load_config(argv, world_size=1)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_args(["--config", str(bad)])


def test_non_mapping_yaml_file(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        build_config(parse_args(["--config", str(bad)]))


def test_fp16_is_accepted_where_cuda_is():
    assert load_config(["train.precision=fp16"], world_size=1, has_cuda=True).train.precision == "fp16"


def test_qlora_is_one_line_from_the_quickstart():
    cfg = load_config(["method=qlora"], world_size=2)
    assert (cfg.method, cfg.quantization.bits, cfg.quantization.quant_type, cfg.quantization.double_quant) == ("qlora", 4, "nf4", True)
    eight = load_config(["method=qlora", "quantization.bits=8", "quantization.compute_dtype=bf16", "lora.r=16"], world_size=1)
    assert (eight.quantization.bits, eight.quantization.compute_dtype, eight.lora.r) == (8, "bf16", 16)


def test_lora_with_tensor_parallelism_only_for_architectures_it_can_split(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "opt", "num_attention_heads": 8, "num_hidden_layers": 2}')
    with pytest.raises(ConfigError, match="method=lora with plugin.tp_size>1 supports model types gpt2, llama, mistral, mixtral, qwen2, roberta; .* is opt"):
        load_config(["--config", str(REPO / "booster_configs" / "tp2_lora.yaml"), f"model.name={tmp_path}"], world_size=2)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["method=full"], "lora.init_from is set but method=full trains no adapter"),
        (["lora.r=16"], "has r=8, this run lora.r=16; set lora.r=8"),
        (["lora.target_modules=[q_proj]"], "adapts ['k_proj', 'o_proj', 'q_proj', 'v_proj'], this run ['q_proj']"),
    ],
)
def test_init_adapter_must_fit_the_run(tmp_path, argv, message):
    (tmp_path / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}')
    with pytest.raises(ConfigError, match="lora.init_from: .* is not a peft adapter dir"):
        load_config(["model.name=tiny-llama", f"lora.init_from={tmp_path}"], world_size=1)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    assert load_config(["model.name=tiny-llama", f"lora.init_from={tmp_path}"], world_size=1).lora.init_from == str(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(["model.name=tiny-llama", f"lora.init_from={tmp_path}", *argv], world_size=1)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train.precision=fp32"], "train.precision=fp32: Gemini trains in bf16 or fp16 only"),
        (["train.optimizer=sgd"], "train.optimizer=sgd: Gemini steps with ColossalAI's HybridAdam only"),
    ],
)
def test_what_gemini_asserts_at_start_up_is_refused_at_config_time(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(["--config", str(REPO / "booster_configs" / "gemini.yaml"), "method=full", *argv], world_size=2, has_cuda=True)


def test_every_booster_config_on_cuda_starts_or_is_refused_in_one_line():
    """Each example config under CUDA, with every method and precision: refused in one line, or accepted and
    then both estimated and within what the ColossalAI plugin class itself accepts (its precision assert)."""
    import importlib

    from finetune import estimate

    accepted = 0
    for name, (extra, world, _) in BOOSTER_CONFIG_RUNS.items():
        extra = [a for a in extra if not a.startswith("method=")]
        for method in ("full", "lora", "qlora"):
            for precision in ("fp32", "bf16", "fp16"):
                argv = ["--config", str(REPO / "booster_configs" / name), *extra, f"method={method}", f"train.precision={precision}"]
                try:
                    cfg = load_config(argv, world_size=world, has_cuda=True)
                except ConfigError as err:
                    assert "\n" not in str(err), (argv, str(err))
                    continue
                accepted += 1
                spec = PLUGINS[cfg.plugin.name]
                module = importlib.import_module(f"colossalai.booster.plugin.{cfg.plugin.name}_plugin")
                if spec.takes_precision and hasattr(module, "SUPPORTED_PRECISION"):
                    assert precision in module.SUPPORTED_PRECISION, argv
                assert estimate.estimate(cfg, world, device="cuda").total() > 0, argv
    assert accepted >= 60  # most combinations are real runs, not refusals


def test_flash_attention_without_flash_attn_is_refused_on_cuda_too():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here")
    with pytest.raises(ConfigError, match=r"flash_attention_2: the flash_attn package is not installed; `pip install flash-attn"):
        load_config(["model.attn_implementation=flash_attention_2"], world_size=1, has_cuda=True)


def _named_values() -> list[tuple[list[str], str, str]]:
    """(settings that make the key apply, key, name) for every key whose values are names, and every name it takes."""
    from finetune.config import LORA_INITS, choices

    cases = [([], key, name) for key, names in choices().items() for name in names]
    cases += [([f"plugin.name={plugin}"], f"plugin.{opt}", name) for plugin, spec in PLUGINS.items() for opt, names in spec.choices.items() for name in names]
    return cases + [([], "lora.init", name.replace("_N", "_4")) for name in LORA_INITS]


def _attribute(cfg, key: str):
    section, _, name = key.rpartition(".")
    if section == "plugin" and name != "name":
        return cfg.plugin.options[name]
    return getattr(getattr(cfg, section) if section else cfg, name)


@pytest.mark.parametrize("context, key, name", _named_values(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_documented_name_is_read_as_written(tmp_path, context, key, name):
    """train.fit_check=off was read as YAML 1.1's false and refused: a name is taken as written, from the command line and from a file."""
    from finetune.config import validate

    section, _, leaf = key.rpartition(".")
    file = tmp_path / "run.yaml"
    file.write_text(f"{section}:\n  {leaf}: {name}\n" if section else f"{key}: {name}\n")
    for argv in ([*context, f"{key}={name}"], [*context, "--config", str(file)]):
        cfg = build_config(parse_args(argv))
        assert _attribute(cfg, key) == name, argv
        refused = [p for p in validate(cfg, world_size=1, has_cuda=True) if p.startswith(f"{key}: unknown value")]
        assert not refused, (argv, refused)


def test_strings_keep_what_yaml_1_1_would_turn_into_booleans_or_numbers():
    cfg = build_config(parse_args(["model.revision=0123", "output_dir=off", "data.labels=[no, yes, 1]", "model.attn_implementation=1:20"]))
    assert (cfg.model.revision, cfg.output_dir, cfg.data.labels, cfg.model.attn_implementation) == ("0123", "off", ["no", "yes", "1"], "1:20")
    # keys of other types read YAML as before: booleans in their YAML 1.1 spellings, numbers in every YAML form
    cfg = build_config(parse_args(["overwrite_output_dir=yes", "data.packing=on", "train.lr=1e-3", "train.max_steps=0x10", "data.weights=[1, .5]"]))
    assert (cfg.overwrite_output_dir, cfg.data.packing, cfg.train.lr, cfg.train.max_steps, cfg.data.weights) == (True, True, 1e-3, 16, [1.0, 0.5])
    assert yaml.safe_load(yaml.safe_dump(to_dict(cfg))) == to_dict(cfg)  # plain Python values, not the reader's


def test_an_alias_within_the_bound_still_works(tmp_path):
    (tmp_path / "ok.yaml").write_text("modules: &m [q_proj, v_proj]\nlora:\n  target_modules: *m\n".replace("modules: &m [q_proj, v_proj]\n", "x: &m [q_proj, v_proj]\n"))
    with pytest.raises(ConfigError, match="unknown config key 'x'"):
        build_config(parse_args(["--config", str(tmp_path / "ok.yaml")]))
    (tmp_path / "ok.yaml").write_text("lora:\n  target_modules: &m [q_proj, v_proj]\nquantization:\n  skip_modules: *m\n")
    assert build_config(parse_args(["--config", str(tmp_path / "ok.yaml")])).quantization.skip_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("argv", [["train.lr=" + "x" * 100_000], ["train.on_nan=" + "y" * 100_000], ["data.weights=[" + ", ".join(["[1]"] * 10_000) + "]"], ["lora.r=1e300"], ["a\nb=1"], ["checkpoint.every_steps=="]])
def test_error_lines_quote_values_shortened(argv):
    with pytest.raises(ConfigError) as err:
        load_config(argv, world_size=1)
    assert len(str(err.value)) < 300 and "\n" not in str(err.value), str(err.value)[:500]


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes(b"output_dir: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 0xe9 at offset 15\)"):
        parse_args(["--config", str(tmp_path / "latin1.yaml")])


def test_sequence_parallel_plan_and_plugin_arguments():
    """world = dp x pp x tp x sp as ColossalAI divides it: all_to_all's sp ranks are their own and share a batch;
    split_gather's are the tp ranks. sp_size/sp_mode become ColossalAI's three arguments."""
    from finetune.booster import plugin_kwargs
    from finetune.config import parallel_plan as plan_of

    sp2 = load_config(["--config", str(REPO / "booster_configs" / "sp2_lora.yaml"), "model.name=tiny-llama"], world_size=4)
    assert (plan_of(sp2, 4).dp, plan_of(sp2, 4).sp, plan_of(sp2, 4).tp) == (2, 2, 1)
    kwargs = plugin_kwargs(sp2.plugin.name, sp2.plugin.options, "fp32", 1.0, on_cpu=True)
    assert (kwargs["enable_sequence_parallelism"], kwargs["sequence_parallelism_mode"], kwargs["sp_size"]) == (True, "all_to_all", 2)
    assert "sp_mode" not in kwargs and kwargs["make_vocab_size_divisible_by"] == 1  # a padded vocabulary without TP cannot be saved
    tp_sp = load_config(["--config", str(REPO / "booster_configs" / "tp2_lora.yaml"), "model.name=tiny-llama", "plugin.sp_mode=split_gather"], world_size=4)
    assert (plan_of(tp_sp, 4).dp, plan_of(tp_sp, 4).sp, plan_of(tp_sp, 4).tp) == (2, 2, 2)
    kwargs = plugin_kwargs(tp_sp.plugin.name, tp_sp.plugin.options, "fp32", 1.0, on_cpu=True)
    assert (kwargs["enable_sequence_parallelism"], kwargs["sequence_parallelism_mode"], kwargs["sp_size"]) == (True, "split_gather", None)
    off = load_config(["--config", str(REPO / "booster_configs" / "tp2_lora.yaml"), "model.name=tiny-llama"], world_size=4)
    kwargs = plugin_kwargs(off.plugin.name, off.plugin.options, "fp32", 1.0, on_cpu=True)
    assert (kwargs["enable_sequence_parallelism"], kwargs["sequence_parallelism_mode"], plan_of(off, 4).sp) == (False, None, 1)
    # A config written before the rename records ColossalAI's flag off: it still loads (a checkpoint's config.yaml).
    old = load_config(["--config", str(REPO / "booster_configs" / "tp2_lora.yaml"), "model.name=tiny-llama", "plugin.enable_sequence_parallelism=false"], world_size=2)
    assert "enable_sequence_parallelism" not in old.plugin.options


def test_ring_attention_with_cuda_and_flash_attention_refuses_packing(monkeypatch):
    """Where ring attention runs (CUDA and flash-attn), packing is refused: its rows are split by the padding mask."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    argv = ["--config", str(REPO / "booster_configs" / "sp2_lora.yaml"), "model.name=tiny-llama", "plugin.sp_mode=ring_attn"]
    assert load_config(argv, world_size=2, has_cuda=True).plugin.options["sp_mode"] == "ring_attn"
    with pytest.raises(ConfigError, match="data.packing=true with plugin.sp_mode=ring_attn: ring attention splits rows by their padding mask"):
        load_config([*argv, "data.packing=true"], world_size=2, has_cuda=True)
