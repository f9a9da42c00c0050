"""The chunked loss on a pipeline's last stage (2 gloo ranks, pp2; and 4, tp2 x pp2, the last stage's head split over
the vocabulary: tests/pipeline_loss_ranks.py): one step's loss and every gradient of every rank equal those over the
full logits within 1e-6, for the instruction and chat tasks and DPO (LoRA and full fine-tuning), and the last stage's
head never holds more than one chunk's logits."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, torchrun_script
from tests.pipeline_loss_ranks import LAYOUTS, TEARDOWN_LIMIT_S, WORK_LIMIT_S
from tests.unit.test_chunked_loss import CHUNK

pytestmark = pytest.mark.distributed


@pytest.mark.timeout(WORK_LIMIT_S + TEARDOWN_LIMIT_S + 120)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_last_stage_takes_the_loss_in_chunks_with_the_full_logits_gradients(layout, tmp_path):
    _, world_size, cases = LAYOUTS[layout]
    out = tmp_path / "results.json"
    returncode, output = torchrun_script([str(REPO / "tests" / "pipeline_loss_ranks.py"), str(out), str(tmp_path / "work"), layout], world_size, WORK_LIMIT_S + TEARDOWN_LIMIT_S + 60)
    assert returncode == 0, output[-12000:]
    results = json.loads(out.read_text())
    assert set(results) == set(cases)
    for case, ranks in results.items():
        last = ranks[-1]  # the last stage (ranks are pp-major, tp-minor): the loss and the head
        assert last["chunk"] == [0, CHUNK], (case, last["chunk"])
        # over the full logits a micro-batch's (half the batch's positions), chunked at most one chunk's (a micro-batch may score fewer tokens)
        assert last["head_rows"][0] == last["positions"] // 2 and 0 < last["head_rows"][1] <= CHUNK, (case, last["head_rows"])
        off, chunked = last["loss"]
        assert abs(chunked - off) <= 1e-6 * max(1.0, abs(off)), (case, off, chunked)
        for rank, result in enumerate(ranks):
            assert result["names"] and result["names"] == result["chunked_names"], (case, rank)
            assert not result["zero"], f"{case} rank {rank}: no gradient for {result['zero'][:5]}, the comparison would prove little"
            assert result["grad_diff"] <= 1e-6, f"{case} rank {rank}: a gradient differs by {result['grad_diff']}"
        assert not set(ranks[0]["names"]) & set(last["names"]), case  # each stage its own parameters
