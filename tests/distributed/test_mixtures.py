"""Data mixtures on 2 ranks: per-source eval loss, tokenization shared outside any collective (it outlasts
launch.timeout_s), a kill and an exact resume, and a failing share that stops every rank."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from finetune.assets import gpt2_tokenizer
from finetune.config import DataConfig
from finetune.data import build_data, load_splits
from finetune.report import best_metric
from tests.conftest import read_metrics, read_summary, write_instruction_file
from tests.distributed.test_checkpoint import assert_same_run, launch, run_args
from tests.unit.test_mixtures import write_rows

SLOW_TOKENIZE_S = 25  # rank 1's extra time over its share: longer than the run's launch.timeout_s
TIMEOUT_S = 15


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_a_mixture_run_logs_per_source_eval_loss_outlasts_the_timeout_while_tokenizing_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))  # a cold cache: the reference run tokenizes
    a, b = write_instruction_file(tmp_path / "a.jsonl"), write_rows(tmp_path / "b.jsonl", "beta", 48)
    extra = ["model.name=tiny-gpt2", "method=full", f"data.train_path=[{a},{b}]", "data.weights=[3,1]"]
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    done = launch([*run_args(a, reference, extra), f"launch.timeout_s={TIMEOUT_S}", "data.cache=false"], 2, fault=f"slow_tokenize:{SLOW_TOKENIZE_S}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fault: rank 1 is slowed" in done.stdout + done.stderr + "".join(p.read_text() for p in (reference / "logs").glob("*"))
    summary = read_summary(reference)
    for ev in (summary["eval"]["before"], summary["eval"]["after"]):
        assert {"loss", "loss/a", "loss/b"} <= set(ev) and min(ev["loss/a"], ev["loss/b"]) <= ev["loss"] <= max(ev["loss/a"], ev["loss/b"])
    assert [s["name"] for s in summary["data"]["sources"]] == ["a", "b"]
    assert any("eval_loss/b" in m for m in read_metrics(reference))
    assert "; a loss " in best_metric(summary)[2] and "eval after:" in done.stdout and ", b loss " in done.stdout  # the comparison table, the closing report
    killed = launch(run_args(a, crashed, extra), 2, fault="kill_after_step:5")
    assert killed.returncode != 0 and not (crashed / "final").exists()
    resumed = launch([*run_args(a, crashed, extra), "resume_from=latest"], 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(reference, crashed, 1e-5, 1e-5)


def _share_tokenization(rank: int, port: int, files: list[str], cache: str, bad_row: int, out: str) -> None:
    """One rank of a 2-process group: build_data with shared tokenization, then again with a row of the last share
    failing (cache off, so it tokenizes again); the train samples and the error go to `out`."""
    import os

    import torch.distributed as dist

    from finetune.data import DataError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", FINETUNE_CACHE=cache)
    dist.init_process_group("gloo")
    cfg = DataConfig(train_path=files, weights=[3, 1], eval_fraction=0.25)
    splits = load_splits(cfg, seed=0)
    result = {"train": build_data(cfg, gpt2_tokenizer(), splits).train}
    tokenize = splits.task.tokenize

    def failing(tokenizer, record, max_length):
        if record["_source"] == 1 and record["_row"] == bad_row:
            raise DataError("planted failure")
        return tokenize(tokenizer, record, max_length)

    splits.task.tokenize = failing
    try:
        build_data(dataclasses.replace(cfg, cache=False), gpt2_tokenizer(), splits)
    except DataError as err:
        result["error"] = str(err)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.distributed
def test_ranks_share_the_tokenization_as_if_one_did_it_and_a_failing_share_stops_every_rank(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    files = [str(write_rows(tmp_path / "a.jsonl", "alpha", 40)), str(write_rows(tmp_path / "b.jsonl", "beta", 24))]
    bad_row = 18  # in rank 1's share: the units are a's and b's training records, then their eval records
    mp.spawn(_share_tokenization, args=(free_port(), files, str(tmp_path / "cache"), bad_row, str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["error"] == results[1]["error"] == f"{files[1]} row {bad_row}: planted failure"  # rank 0 read rank 1's line
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "alone"))
    cfg = DataConfig(train_path=files, weights=[3, 1], eval_fraction=0.25)
    alone = build_data(cfg, gpt2_tokenizer(), load_splits(cfg, seed=0))
    assert results[0]["train"] == results[1]["train"] == alone.train
    left = sorted(p.name.split(".", 1)[1] for p in (tmp_path / "cache" / "data").iterdir())
    assert left == ["npz", "part1of2.error"], left  # the whole is cached, the shares are gone; the failed share's line stays
