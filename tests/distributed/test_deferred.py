"""Deferred loading on 2 gloo ranks (tests/deferred_ranks.py): the sharded models' logits equal the unsharded ones."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, torchrun_script
from tests.deferred_ranks import TEARDOWN_LIMIT_S, WORK_LIMIT_S
from tests.unit.test_deferred import pretrained_dirs  # noqa: F401 (a fixture: saved tiny Llama and GPT-2 weights)


# The ranks' own watchdogs stop a hang first (with their stacks); this is for a launcher that hangs itself.
RANKS_TIMEOUT_S = WORK_LIMIT_S + TEARDOWN_LIMIT_S + 60


@pytest.mark.distributed
def test_sharded_logits_equal_the_unsharded_models(pretrained_dirs, tmp_path):
    """tp2, pp2 and fsdp (2 gloo ranks) built lazily / on meta, loaded per shard: the logits of the checkpoint (fp32);
    and under bf16 (ZeRO-1 or not) the optimizer's master copies hold the loaded weights (a step equals an eager build's)."""
    out = tmp_path / "diffs.json"
    returncode, output = torchrun_script([str(REPO / "tests" / "deferred_ranks.py"), str(out), *map(str, pretrained_dirs.values())], 2, RANKS_TIMEOUT_S)
    assert returncode == 0, output[-12000:]  # a hung rank's stacks (deferred_ranks' watchdog) included
    diffs = json.loads(out.read_text())
    assert set(diffs) == {f"{m} {s}" for m in pretrained_dirs for s in ("tp2", "pp2", "fsdp")} | {"pp2 zero0 bf16 step", "pp2 zero1 bf16 step"}
    assert all(d <= 1e-5 for d in diffs.values()), diffs  # the bf16 step: the same losses as from an eager build
