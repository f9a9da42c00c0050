"""train.activation_offload (finetune.activation_offload): the same losses and gradients as without, what the hooks
move is what the estimator puts in host memory, the copies are copies, and the step and the config use it."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from finetune import estimate as est
from finetune.activation_offload import MIN_OFFLOAD_BYTES, ActivationOffload, block_stack
from finetune.config import ConfigError, build_config, load_config, parse_args
from finetune.core.layout import Placement
from tests.unit.test_gpu_paths import batches, one_rank  # noqa: F401 (a fixture: one in-process gloo rank)

LAYERS, ROWS, SEQ = 3, 2, 32
TINY_LLAMA = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, num_hidden_layers=LAYERS)


def tiny_llama(checkpointing: bool, lora: bool):
    """A 3-layer Llama (fp32, sdpa, no dropout), LoRA on the default targets or fully trainable."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **TINY_LLAMA)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        from peft import inject_adapter_in_model

        from finetune.model import build_lora_config

        model = inject_adapter_in_model(build_lora_config(model, lora_settings()), model)
    return config, model


def lora_settings():
    return build_config(parse_args(["lora.dropout=0"])).lora


def train_once(model, offload: ActivationOffload | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A forward without gradients first (as a preference step's reference pass), then forward and backward."""
    ids = torch.randint(0, 1000, (ROWS, SEQ), generator=torch.Generator().manual_seed(1))
    with offload or contextlib.nullcontext():
        with torch.no_grad():
            model(input_ids=ids)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_same_loss_and_gradients_and_the_estimators_host_bytes(checkpointing, lora):
    """Bit for bit the same loss and gradients; the hooks moved every layer's saved activations (under checkpointing
    exactly each layer's input), the bytes the estimator's host line predicts (its per-layer formula within 3%), also
    after a forward without gradients had run to the last block (which stops offloading for the head and loss)."""
    _, plain = tiny_llama(checkpointing, lora)
    loss, grads = train_once(plain, None)
    config, model = tiny_llama(checkpointing, lora)
    stack = block_stack(model)
    assert type(stack[0]).__name__ == "LlamaModel" and stack[1] is model.model.layers[-1]
    offload = ActivationOffload(torch.device("cpu"), stack)
    offloaded_loss, offloaded_grads = train_once(model, offload)
    assert torch.equal(loss, offloaded_loss)
    assert grads.keys() == offloaded_grads.keys() and all(torch.equal(grads[k], offloaded_grads[k]) for k in grads)

    tokens, hidden = ROWS * SEQ, TINY_LLAMA["hidden_size"]
    if checkpointing:  # non-reentrant checkpointing saves only each block's inputs: fp32 hidden states
        assert offload.stats.offloaded_tensors == LAYERS and offload.stats.offloaded_bytes == LAYERS * tokens * hidden * 4
        return
    # The estimator's host term: every layer's saved tensors, LAYERS x tokens x layer_activation_bytes.
    shape = est.model_shape(config, "lora" if lora else "full", lora_settings() if lora else None)
    layer = est.layer_activation_bytes(shape, Placement(), seq=SEQ, device="cpu", attention="sdpa")
    assert offload.stats.offloaded_bytes == pytest.approx(LAYERS * tokens * layer, rel=0.03)
    assert offload.stats.kept_bytes > 0  # the head and the loss (after the last block) stayed


def test_the_hooks_copy_and_keep_what_they_should():
    """A saved activation comes back equal but from a copy (the original's storage is not reused); one tensor saved by
    several ops is copied once; parameters, views of them and tensors under MIN_OFFLOAD_BYTES stay as they are."""
    offload = ActivationOffload(torch.device("cpu"))
    with offload:
        activation = torch.randn(64, 64)
        packed = offload.pack_hook(activation)
        assert offload.pack_hook(activation) is packed and offload.stats.offloaded_tensors == 1
        back = offload.unpack_hook(packed)
        assert torch.equal(back, activation) and back.untyped_storage().data_ptr() != activation.untyped_storage().data_ptr()
        activation.add_(1)  # a new version of the same storage is a new copy
        assert offload.pack_hook(activation) is not packed and offload.stats.offloaded_tensors == 2
        weight = nn.Parameter(torch.randn(64, 64))
        small = torch.randn(MIN_OFFLOAD_BYTES // 4 - 1)
        for kept in (weight, weight.t(), small):
            assert offload.pack_hook(kept) is kept
        assert offload.stats.offloaded_bytes == 2 * 64 * 64 * 4 and offload.stats.kept_bytes == small.numel() * 4


def test_the_training_step_offloads_through_the_run(one_rank, tmp_path):  # noqa: F811
    """build_run gives the run the hooks when train.activation_offload=true, and the plugin's step enters them: the
    same step loss as without."""
    from finetune.faults import Faults
    from finetune.model import build_model
    from finetune.run import build_run
    from finetune.tasks import build_task

    losses, stats = [], []
    for offload in ("false", "true"):
        cfg = build_config(parse_args(["model.name=tiny-gpt2", "method=full", f"output_dir={tmp_path}", "train.batch_size=2", f"train.activation_offload={offload}"]))
        model, _ = build_model(cfg.model, seed=3)
        samples = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(0)).tolist()]
        run, _ = build_run(cfg, world_size=1, device=torch.device("cpu"), task=build_task(cfg.task, cfg.data), model=model, pending=None, samples=samples, pad_token_id=0, faults=Faults(""), preemption=None)
        losses.append(run.plugin.forward_backward(run, batches(2)))
        stats.append(getattr(run.saved_activations, "stats", None))
    assert losses[0] == losses[1] and stats[0] is None
    assert stats[1].offloaded_tensors > 0 and stats[1].kept_bytes > 0  # the blocks' activations moved; the head's and the loss's stayed


def test_refused_under_a_pipeline_in_one_line():
    args = ["model.name=tiny-llama", "plugin.name=hybrid_parallel", "plugin.pp_size=2", "plugin.num_microbatches=2", "train.activation_offload=true"]
    with pytest.raises(ConfigError) as err:
        load_config(args, world_size=2)
    assert str(err.value).startswith("train.activation_offload=true under pipeline parallelism (2 stages)") and "\n" not in str(err.value)
    load_config(args[:-1], world_size=2)  # the same pipeline without it is fine
    load_config(["model.name=tiny-llama", "plugin.name=hybrid_parallel", "plugin.tp_size=2", "train.activation_offload=true"], world_size=2)  # TP steps as DDP does
