"""Each CPU repair of ColossalAI 0.5.0's accelerator, tested on its own (this machine has no CUDA)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from finetune.fixes import colossalai as colossalai_fixes
from finetune.fixes.guard import UnsupportedVersion

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="repairs are a no-op on CUDA")


@pytest.fixture(scope="module")
def accelerator():
    from colossalai.accelerator.cpu_accelerator import CpuAccelerator

    colossalai_fixes.apply()
    return CpuAccelerator()


def test_refuses_other_colossalai_versions():
    with pytest.raises(UnsupportedVersion, match="found 0.4.9"):
        colossalai_fixes.apply(colossalai_version="0.4.9")


def test_apply_reports_every_repair_once():
    applied = colossalai_fixes.apply()
    assert {f"CpuAccelerator.{name}" for name in colossalai_fixes.CPU_ACCELERATOR_REPAIRS} <= set(applied)
    assert {"LowLevelZeroOptimizer._sanity_checks", "colossalai.pipeline.p2p._check_for_nccl_hccl_backend", "torch.cuda.set_device"} <= set(applied)
    assert colossalai_fixes.apply() == applied  # idempotent: wrappers are not wrapped twice
    assert not hasattr(torch.cuda.set_device.__wrapped__, "__wrapped__")


def test_zero_sanity_check_keeps_the_dtype_check(accelerator):
    from types import SimpleNamespace

    from colossalai.zero.low_level.low_level_optim import LowLevelZeroOptimizer

    fp32 = torch.nn.Parameter(torch.zeros(2))
    optimizer = SimpleNamespace(_dtype=torch.float32, optim=SimpleNamespace(param_groups=[{"params": [fp32]}]))
    LowLevelZeroOptimizer._sanity_checks(optimizer)  # no CUDA needed any more
    optimizer._dtype = torch.bfloat16
    with pytest.raises(AssertionError, match="same dtype"):
        LowLevelZeroOptimizer._sanity_checks(optimizer)


def test_pipeline_backend_check_reads_the_group_name(accelerator):
    from colossalai.pipeline import p2p

    class Group:
        def __init__(self, name):
            self._name = name

        def name(self):
            return self._name

    assert p2p._check_for_nccl_hccl_backend(Group("gloo")) is False
    assert p2p._check_for_nccl_hccl_backend(Group("nccl")) is True


def test_set_device_ignores_cpu(accelerator):
    torch.cuda.set_device(torch.device("cpu"))  # stock torch raises without a CUDA device


def test_fused_qkv_gather_keeps_tensors_on_cpu(accelerator):
    from colossalai.shardformer.layer import qkv_fused_linear

    seen = {}

    def probe(tensor, *args, **kwargs):
        seen["device"] = tensor.cuda().device
        return tensor

    wrapped = colossalai_fixes._without_cuda_moves(probe)
    assert wrapped(torch.ones(2)) is not None and seen["device"].type == "cpu"
    assert torch.Tensor.cuda is not None and qkv_fused_linear.gather_fused_qkv_in_gpt2_style.__wrapped__
    with pytest.raises((RuntimeError, AssertionError)):
        torch.ones(1).cuda()  # restored outside the wrapper


def test_no_ops(accelerator):
    assert accelerator.synchronize() is None
    assert accelerator.empty_cache() is None
    assert accelerator.device_count() == 1
    assert accelerator.current_device() == 0


def test_seeding_and_rng_state(accelerator):
    accelerator.manual_seed(123)
    first = torch.rand(3)
    accelerator.manual_seed_all(123)
    assert torch.equal(first, torch.rand(3))
    assert accelerator.initial_seed() == 123
    state = accelerator.get_rng_state()
    assert state.dtype == torch.uint8
    a = torch.rand(2)
    accelerator.set_rng_state_all([state])
    assert torch.equal(a, torch.rand(2))
    assert torch.equal(accelerator.get_rng_state_all()[0], torch.get_rng_state())


def test_streams_are_no_ops(accelerator):
    stream = accelerator.Stream()
    stream.wait_stream(accelerator.current_stream())
    stream.synchronize()
    with accelerator.stream(stream):
        pass
    assert accelerator.default_stream() is not None


def test_autocast_is_a_context_instance(accelerator):
    ctx = accelerator.autocast(dtype=torch.bfloat16)
    assert isinstance(ctx, contextlib.AbstractContextManager)
    with ctx:
        out = torch.ones(2, 2) @ torch.ones(2, 2)
    assert out.dtype == torch.bfloat16


def test_fsdp_configure_gets_the_cpu_device(accelerator):
    from colossalai.booster.plugin.torch_fsdp_plugin import TorchFSDPPlugin

    seen = {}

    def probe(*args, **kwargs):
        seen["device"] = torch.cuda.current_device()
        return "configured"

    assert colossalai_fixes._fsdp_on_cpu(probe)() == "configured" and seen["device"] == torch.device("cpu")
    assert TorchFSDPPlugin.configure.__wrapped__ is not None
    with pytest.raises(RuntimeError):
        torch.cuda.current_device()  # restored after the call


def test_gloo_collectives_for_sequence_parallelism():
    """gloo lacks the list all_to_all and reduce_scatter that ColossalAI's sequence parallelism calls: after
    finetune.fixes.apply they run there (here on a one-rank gloo group: each rank's share is its own), async calls
    included, and torch's own wrapper stays underneath once."""
    import torch.distributed as dist

    from finetune import fixes
    from finetune.distributed import destroy_process_groups
    from tests.conftest import free_port

    fixes.apply()
    assert fixes.apply() == fixes.apply() and not getattr(dist.all_to_all.__wrapped__, "gloo_repair", False)
    with pytest.MonkeyPatch.context() as env:
        for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1").items():
            env.setenv(name, value)
        dist.init_process_group("gloo", rank=0, world_size=1)
        try:
            sent = [torch.arange(6.0).reshape(2, 3)]
            received = [torch.empty(2, 3)]
            assert dist.all_to_all(received, sent) is None and torch.equal(received[0], sent[0])
            out = torch.empty(4)
            dist.reduce_scatter(out, [torch.arange(4.0)], async_op=True).wait()
            assert out.tolist() == [0.0, 1.0, 2.0, 3.0]
            with pytest.raises(RuntimeError, match="does not support"):  # what the repairs stand in for
                dist.all_to_all.__wrapped__(received, sent)
        finally:
            destroy_process_groups()
