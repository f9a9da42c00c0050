"""Every bench/ script runs in CI as a short smoke (--smoke: the real code path on a tiny model, a few steps),
so a benchmark cannot rot unseen (issue 23: bench/packing.py raised TypeError as written)."""

from __future__ import annotations

import json
import math
import re

import pytest

from tests.conftest import REPO, run_python

pytestmark = pytest.mark.e2e  # one-process subprocesses (bench/run.py --smoke trains on one rank)

SMOKE_TIMEOUT_S = 300  # each script alone takes 10-60 s; a loaded 2-core machine several times that


def smoke(script: str, *args: str) -> str:
    """Run bench/<script> --smoke with args; its output (fails with the script's own last lines)."""
    result = run_python([str(REPO / "bench" / script), "--smoke", *args], timeout=SMOKE_TIMEOUT_S)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout


def finite_numbers(text: str) -> list[float]:
    """Every number in a markdown report, none of them nan or inf (a nan or inf cell fails)."""
    assert not re.search(r"\b(nan|inf)\b", text, re.IGNORECASE), text
    return [float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*\.?\d*", text)]


def test_run_py_smoke(tmp_path):
    smoke("run.py", "--results", str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["case"] for r in results["plugins"]] == ["torch_ddp"] and [r["case"] for r in results["methods"]] == ["full"]
    for row in results["plugins"] + results["methods"]:
        assert row["tokens_per_s"] > 0 and row["peak_bytes_rank0"] > 0 and math.isfinite(row["median_step_s"]), row
    assert math.isfinite(results["overhead"]["ratio"]) and results["overhead"]["ratio"] > 0
    if results["device"] == "cpu":
        assert math.isfinite(results["baseline"]["measured_bytes"])
    finite_numbers((tmp_path / "results.md").read_text())
    assert (tmp_path / "plugins.png").stat().st_size > 0


def test_packing_smoke(tmp_path):
    smoke("packing.py", "--results", str(tmp_path))
    report = (tmp_path / "packing.md").read_text()
    speedup = re.search(r"Packing speed-up at 4 rows per step: ([\d.]+)x", report)
    assert speedup and float(speedup.group(1)) > 0, report
    finite_numbers(report)


def test_plain_loop_smoke(tmp_path):
    smoke("plain_loop.py", str(tmp_path / "plain.json"))
    timings = json.loads((tmp_path / "plain.json").read_text())
    assert len(timings["step_s"]) == 3 and all(math.isfinite(t) and t > 0 for t in timings["step_s"]), timings
    assert all(n > 0 for n in timings["tokens"])


def test_peers_smoke(tmp_path):
    smoke("peers.py", "--results", str(tmp_path))
    results = json.loads((tmp_path / "peers.json").read_text())
    (part,) = results["parts"]
    assert part["ranks"] == 1 and set(part["tools"]) == {"ours", "trainer", "plain"}, part
    for stats in part["tools"].values():
        assert 0 < stats["min_s"] <= stats["median_s"] <= stats["max_s"] and stats["timed_steps"] > 0, stats
    assert set(part["ratios"]) == {"trainer", "plain"} and all(r["median"] > 0 and r["min"] > 0 for r in part["ratios"].values())
    finite_numbers((tmp_path / "peers.md").read_text())


def test_roberta_study_smoke(tmp_path):
    smoke("roberta_study.py", "--results", str(tmp_path))
    study = (tmp_path / "roberta_study.md").read_text()
    assert "| single-lora |" in study, study
    finite_numbers(study)
    summary = json.loads((tmp_path / "runs" / "single-lora" / "summary.json").read_text())
    assert math.isfinite(summary["eval"]["after"]["loss"]) and summary["reload"]["ok"], summary["eval"]
    assert (tmp_path / "roberta_study.png").stat().st_size > 0


def test_loss_chunks_smoke(tmp_path):
    smoke("loss_chunks.py", "--results", str(tmp_path))
    results = json.loads((tmp_path / "loss_chunks.json").read_text())
    assert set(results["settings"]) == {"full logits", "chunked"}, results
    for row in results["settings"].values():
        assert row["peak_bytes"] > 0 and math.isfinite(row["median_step_s"]) and row["median_step_s"] > 0 and row["timed_steps"] > 0, row
    report = (tmp_path / "loss_chunks.md").read_text()
    assert re.search(r"Chunked / full logits: peak [\d.]+x, step [\d.]+x", report), report
    finite_numbers(report)


def test_preference_smoke(tmp_path):
    smoke("preference.py", "--results", str(tmp_path))
    results = json.loads((tmp_path / "preference.json").read_text())
    assert set(results["tasks"]) == {"SFT (chosen only)", "DPO"}, results
    for row in results["tasks"].values():
        assert 0 < row["min_step_s"] <= row["median_step_s"] and row["timed_steps"] > 0 and row["peak_bytes"] > 0 and row["weights_bytes"] > 0, row
    report = (tmp_path / "preference.md").read_text()
    assert re.search(r"DPO / SFT: median step [\d.]+x", report) and re.search(r"predicted [\d,]+ MiB instead of [\d,]+ \([\d.]+x\)", report), report
    finite_numbers(report)
