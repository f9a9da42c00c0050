"""CUDA-only paths checked on CPU stand-ins. fp16 where the plugin leaves precision to us (TorchDDP, FSDP):
finetune.loss_scaling, proven with torch's CPU GradScaler on one gloo rank, and ZeRO's own fp16 mixin (fp16 runs
are refused on CPU, so these are the checks that run here).

On ColossalAI's Booster(mixed_precision="fp16") each of these failed: the clip returned None (TypeError),
no_sync asserted on the AMP-wrapped model, and unwrap(unwrap_peft=False) lost the PeftModel."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist

from finetune.booster import build_booster
from finetune.parallel import PLUGINS
from finetune.config import ModelConfig, load_config
from finetune.distributed import destroy_process_groups
from finetune.model import build_model
from tests.conftest import free_port


@pytest.fixture(scope="module")
def one_rank():
    from finetune import fixes

    fixes.apply()  # as finetune.distributed.launch applies them
    with pytest.MonkeyPatch.context() as env:  # restored after: later tests' child runs must not inherit a rank
        for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
            env.setenv(name, value)
        dist.init_process_group("gloo", rank=0, world_size=1)
        yield
        destroy_process_groups()


def batches(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (n, 2, 16), generator=g)
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]


def boosted_run(args: list[str], model: torch.nn.Module | None = None):
    """A Run as train.py builds it (build_run), on one gloo rank, for a config validated as on a CUDA machine (fp16 is
    refused on CPU): constant learning rate from the first step, the loss over the full logits (the fp16 paths are
    the subject here)."""
    from finetune.faults import Faults
    from finetune.run import build_run
    from finetune.tasks import build_task

    cfg = load_config(["model.name=tiny-gpt2", *args, "train.warmup_steps=0", "train.lr_scheduler=constant", "train.loss_chunks=off", "train.batch_size=2"], world_size=1, has_cuda=True)
    model = model if model is not None else build_model(cfg.model, seed=3)[0]
    samples = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0)).tolist()]
    run, _ = build_run(cfg, world_size=1, device=torch.device("cpu"), task=build_task(cfg.task, cfg.data), model=model, pending=None, samples=samples, pad_token_id=0, faults=Faults(""), preemption=None)
    return run


def boosted_fp16_run(model, method: str = "full"):
    """TorchDDP with fp16: finetune.loss_scaling's GradScaler around the step."""
    return boosted_run([f"method={method}", "train.precision=fp16", "train.lr=1e-2"], model)


def test_an_fp16_ddp_step_equals_a_plain_autocast_gradscaler_loop(one_rank):
    """Two micro-batches (no_sync), clipping at 1.0 (the norm returned), the update: as torch's own AMP recipe does it."""
    model, _ = build_model(ModelConfig(name="tiny-gpt2"), seed=3)
    reference = copy.deepcopy(model)
    run = boosted_fp16_run(model)
    micro = batches(2)
    run.plugin.forward_backward(run, micro)
    norm = run.plugin.step(run, 1.0)

    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=run.cfg.train.weight_decay, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for batch in micro:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = reference(**batch).loss / len(micro)
        scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    scaler.step(optimizer)
    scaler.update()

    assert isinstance(norm, float) and norm == pytest.approx(float(expected_norm), rel=1e-5)
    trained = run.model.unwrap()
    for (name, p), q in zip(trained.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert run.optimizer.loss_scale() == scaler.get_scale()


def test_an_overflow_skips_the_update_and_reports_its_own_norm(one_rank):
    """A loss scale that overflows fp32 gradients: no weight moves, the scale halves, the step's norm is not finite (not the last step's)."""
    model, _ = build_model(ModelConfig(name="tiny-gpt2"), seed=3)
    run = boosted_fp16_run(model)
    run.plugin.forward_backward(run, batches(1))
    assert run.plugin.step(run, 1.0) < float("inf")
    before = {n: p.detach().clone() for n, p in run.model.unwrap().named_parameters()}
    run.optimizer.scaler.update(3e38)  # the next backward overflows
    run.optimizer.zero_grad()
    run.plugin.forward_backward(run, batches(1, seed=1))
    assert not math.isfinite(run.plugin.step(run, 1.0))
    assert all(torch.equal(p, before[n]) for n, p in run.model.unwrap().named_parameters())
    assert run.optimizer.loss_scale() == pytest.approx(1.5e38)


def test_lora_under_fp16_ddp_keeps_the_peft_model(one_rank):
    model, _ = build_model(ModelConfig(name="tiny-gpt2"), seed=3)
    run = boosted_fp16_run(model, method="lora")
    from peft import PeftModel

    assert isinstance(run.model.unwrap(unwrap_peft=False), PeftModel)
    run.plugin.forward_backward(run, batches(2))
    assert isinstance(run.plugin.step(run, 1.0), float)


def test_plugins_that_own_precision_get_no_second_scaler():
    """ZeRO, Gemini and hybrid scale fp16 losses themselves; FSDP's MixedPrecision does not, so it gets FSDP's sharded scaler."""
    assert [name for name, p in PLUGINS.items() if not p.takes_precision] == ["torch_ddp"]
    cfg = load_config(["train.precision=fp16", "--config", "booster_configs/zero2.yaml"], world_size=2, has_cuda=True)
    marker = object()
    assert PLUGINS["low_level_zero"].after_boost(cfg, marker, None, torch.device("cpu")) is marker


def test_zero_fp16_reports_the_norm_at_the_scale_it_was_taken_and_inf_on_an_overflow(one_rank):
    """ZeRO (ColossalAI's own fp16 mixin, on one CPU rank): a step whose scale grows (growth_interval=1) reports the
    same norm as one whose scale stays; an overflow step reports inf, not the last step's norm."""
    spec = PLUGINS["low_level_zero"]
    norms = {}
    for growth_interval in (1, 1000):
        run = boosted_run(["--config", "booster_configs/zero2.yaml", "method=full", "train.precision=fp16"])
        optimizer = run.optimizer
        optimizer.mixed_precision_mixin.grad_scaler._growth_interval = growth_interval  # no config key: ColossalAI's default is 1000
        spec.forward_backward(run, batches(1))
        scale = optimizer.mixed_precision_mixin.loss_scale
        norms[growth_interval] = spec.step(run, 1.0)
        assert optimizer.mixed_precision_mixin.loss_scale == (2 * scale if growth_interval == 1 else scale)
    assert math.isfinite(norms[1]) and norms[1] == pytest.approx(norms[1000], rel=1e-3)
    optimizer.mixed_precision_mixin.grad_scaler._scale.fill_(3e38)  # the next backward overflows fp16 gradients
    optimizer.zero_grad()
    spec.forward_backward(run, batches(1, seed=1))
    assert spec.step(run, 1.0) == float("inf")


def test_gemini_parameters_are_not_fingerprinted():
    """After a forward Gemini's parameters are views into freed chunk storage: no rank reads them; the summary says it skipped."""
    from finetune import checks

    assert PLUGINS["gemini"].fingerprints(torch.nn.Linear(2, 2)) is None
    assert checks.compare(None, None) == {"skipped": True}
    assert PLUGINS["torch_ddp"].fingerprints(torch.nn.Linear(2, 2)) is not None


def test_the_reload_check_moves_to_the_cpu_when_the_gpu_is_full():
    """Rank 0 reloads final/ beside the trained model and optimizer: on a GPU without room for the reloaded
    model (fp32 for full, the frozen dtype for LoRA) it reloads on the CPU; a quantized base stays on its GPU."""
    from finetune.evaluation import reload_device
    from finetune.methods import METHODS

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    from finetune.config import build_config, parse_args

    cfg = build_config(parse_args(["model.name=llama2-7b", "train.precision=bf16"]))  # the estimator's public config
    seven_b = 6_738_415_616  # Llama-2-7B's parameters
    assert reload_device(cfg, METHODS["full"], cuda, free_bytes=20 * 2**30) == cpu  # fp32: 27 GB
    assert reload_device(cfg, METHODS["full"], cuda, free_bytes=int(seven_b * 4 * 1.3)) == cuda
    assert reload_device(cfg, METHODS["lora"], cuda, free_bytes=20 * 2**30) == cuda  # bf16: 13.5 GB
    assert reload_device(cfg, METHODS["lora"], cuda, free_bytes=12 * 2**30) == cpu
    assert reload_device(cfg, METHODS["qlora"], cuda, free_bytes=0) == cuda
    assert reload_device(cfg, METHODS["full"], cpu, free_bytes=0) == cpu


def test_an_fp16_fsdp_step_scales_with_the_sharded_scaler_and_clips_unscaled(one_rank):
    """FSDP's MixedPrecision(fp16) casts but does not scale: after_boost adds FSDP's ShardedGradScaler, and the clip
    (FSDP's own) sees unscaled gradients: the norm equals the one of gradients computed at scale 1. With the fused
    AdamW every other plugin uses, torch 2.5's sharded scaler fails the first step (found_inf of shape [1])."""
    spec = PLUGINS["torch_fsdp"]
    norms = []
    for scale in (2.0**16, 1.0):
        run = boosted_run(["--config", "booster_configs/fsdp.yaml", "method=full", "train.precision=fp16"])
        optimizer = run.optimizer
        assert type(optimizer.scaler).__name__ == "ShardedGradScaler" and not optimizer.optim.defaults["fused"]
        optimizer.scaler._init_scale = scale  # the scale its first backward uses (set lazily)
        spec.forward_backward(run, batches(1))
        norms.append(spec.step(run, 1.0))
    assert math.isfinite(norms[0]) and norms[0] == pytest.approx(norms[1], rel=1e-3)


def test_the_fp16_loss_scale_resumes_where_it_was_under_any_plugin(one_rank, tmp_path):
    """loss_scale.json: a DDP fp16 scale (torch's GradScaler) goes on in ZeRO's own scaler and back; a damaged file is one line."""
    from finetune import checkpoint
    from finetune.loss_scaling import loss_scale_state

    model, _ = build_model(ModelConfig(name="tiny-gpt2"), seed=3)
    ddp = boosted_fp16_run(model)
    ddp.plugin.forward_backward(ddp, batches(1))
    ddp.plugin.step(ddp, 1.0)
    ddp.optimizer.scaler.update(1024.0)  # as after some overflows (one good step counted)
    checkpoint.write_loss_scale(ddp.optimizer, tmp_path)
    assert loss_scale_state(ddp.optimizer) == {"scale": 1024.0, "good_steps": 1}

    cfg = load_config(["--config", "booster_configs/zero2.yaml", "model.name=tiny-gpt2", "method=full", "train.precision=fp16"], world_size=1, has_cuda=True)
    zero_model, _ = build_model(ModelConfig(name="tiny-gpt2"), seed=3)
    booster, _ = build_booster("low_level_zero", {**cfg.plugin.options, "overlap_communication": False}, "fp16", 1.0)
    zero_model, zero_optimizer, *_ = booster.boost(zero_model, PLUGINS["low_level_zero"].build_optimizer(list(zero_model.parameters()), cfg))
    assert loss_scale_state(zero_optimizer)["scale"] == 2.0**16
    checkpoint.read_loss_scale(zero_optimizer, tmp_path)
    assert loss_scale_state(zero_optimizer) == {"scale": 1024.0, "good_steps": 1}
    assert zero_optimizer.mixed_precision_mixin.loss_scale == 1024.0

    fresh = boosted_fp16_run(build_model(ModelConfig(name="tiny-gpt2"), seed=3)[0])
    checkpoint.read_loss_scale(fresh.optimizer, tmp_path)
    assert fresh.optimizer.loss_scale() == 1024.0

    (tmp_path / checkpoint.LOSS_SCALE_FILE).write_text('{"scale": -1.0, "good_steps": 0}')
    with pytest.raises(checkpoint.CheckpointError, match="must hold a positive finite scale"):
        checkpoint.read_loss_scale(fresh.optimizer, tmp_path)
