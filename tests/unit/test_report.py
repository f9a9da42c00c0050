"""finetune.report on synthetic summary.json files (no training)."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.report import main

GB = 1024**3


def write_run(path: Path, plugin: str, options: dict, world: int, eval_best: dict, peaks: list[int], method: str = "full", cpu_allocator: str = "exact") -> Path:
    """A minimal summary.json with the fields train.py writes and the report reads."""
    path.mkdir(parents=True)
    summary = {
        "task": "classification" if "accuracy" in eval_best else "instruction",
        "method": method,
        "plugin": plugin,
        "plugin_options": {"name": plugin, **options},
        "world_size": world,
        "data_parallel_size": world // (options.get("tp_size", 1) * options.get("pp_size", 1)),
        "steps": 40,
        "epochs": 2.5,
        "trainable_params": 1234567,
        "eval": {"best": eval_best},
        "throughput": {"tokens_per_s": 1500.0, "sequences_per_s": 12.5},
        "memory": {"cpu_allocator": cpu_allocator, "stages": [{"name": "start", "current_bytes": GB, "peak_bytes": GB}], "peak_bytes_per_rank": peaks},
        "wall_s": 61.4,
        "artifacts": {"final/model.safetensors": 3_000_000, "final/config.json": 500_000, "metrics.jsonl": 10_000_000},
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_report_table_and_png(tmp_path, capsys):
    classification = write_run(tmp_path / "pp", "hybrid_parallel", {"tp_size": 1, "pp_size": 2, "pp_style": "1f1b"}, 2, {"step": 30, "loss": 0.5, "accuracy": 0.875, "macro_f1": 0.8, "samples": 64}, [2 * GB, GB])
    lm = write_run(tmp_path / "single", "torch_ddp", {}, 1, {"step": 40, "loss": 2.0, "perplexity": 7.389}, [3 * GB], method="lora")
    assert main([str(classification), str(lm), "--out", str(tmp_path / "out"), "--name", "cmp"]) == 0
    table = (tmp_path / "out" / "cmp.md").read_text().splitlines()
    assert len(table) == 4 and table[0].startswith("| run | setting | method |")
    pp, single = (line.removesuffix(" |").split(" | ") for line in table[2:])
    assert pp[1:5] == ["pp2 1f1b", "full", "2", "2.50 / 40"]
    assert pp[5] == "accuracy 0.8750 (macro-F1 0.800, step 30)" and pp[6] == "2.00 / 1.00"
    assert pp[7:12] == ["61", "1500", "12.5", "1,234,567", "3.5"]  # artifact: final/ files only, MB
    assert single[1:4] == ["single", "lora", "1"] and single[5] == "eval loss 2.0000 (ppl 7.39, step 40)"
    assert (tmp_path / "out" / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out


def test_a_peak_taken_under_the_fast_cpu_allocator_is_marked(tmp_path):
    """Issue 24: a CPU run under train.cpu_allocator=fast peaks with freed memory its heap keeps; the table marks it and says so."""
    fast = write_run(tmp_path / "fast", "torch_ddp", {}, 2, {"step": 1, "loss": 1.0, "perplexity": 2.7}, [GB, GB], cpu_allocator="fast")
    exact = write_run(tmp_path / "exact", "torch_ddp", {}, 2, {"step": 1, "loss": 1.0, "perplexity": 2.7}, [GB, GB])
    assert main([str(fast), str(exact), "--out", str(tmp_path / "out"), "--name", "cmp"]) == 0
    table = (tmp_path / "out" / "cmp.md").read_text().splitlines()
    assert [line.split(" | ")[6] for line in table[2:4]] == ["1.00 / 1.00 (heap)", "1.00 / 1.00"]
    assert table[5].startswith("(heap) CPU RSS under train.cpu_allocator=fast: includes freed memory glibc's heap keeps")
    assert main([str(exact), "--out", str(tmp_path / "out"), "--name", "exact"]) == 0
    assert "(heap)" not in (tmp_path / "out" / "exact.md").read_text()


def test_report_refuses_a_dir_without_summary_in_one_line(tmp_path, capsys):
    good = write_run(tmp_path / "good", "torch_ddp", {}, 2, {"step": 1, "loss": 1.0, "perplexity": 2.7}, [GB, GB])
    (tmp_path / "unfinished").mkdir()
    assert main([str(good), str(tmp_path / "unfinished"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'unfinished'}: no summary.json (not a finished run of finetune/train.py)\n"
    assert not (tmp_path / "out").exists()  # nothing written before every run was read


def test_report_never_replaces_a_file_unasked(tmp_path, capsys):
    good = write_run(tmp_path / "good", "torch_ddp", {}, 2, {"step": 1, "loss": 1.0, "perplexity": 2.7}, [GB, GB])
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("my own notes")  # the default stem, in a directory of the user's
    assert main([str(good), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {out / 'report.md'}: exists; pass --overwrite to replace it, or choose another --out or --name\n"
    assert (out / "report.md").read_text() == "my own notes" and not (out / "report.png").exists()
    assert main([str(good), "--out", str(out), "--overwrite"]) == 0 and (out / "report.md").read_text().startswith("| run |")


def test_report_shows_a_preference_runs_accuracy_and_margin(tmp_path):
    best = {"step": 20, "loss": 0.6, "reward_chosen": 0.2, "reward_rejected": -0.1, "margin": 0.3, "accuracy": 0.75, "logp_chosen": -20.0, "logp_rejected": -25.0, "pairs": 8}
    run = write_run(tmp_path / "dpo", "torch_ddp", {}, 2, best, [GB, GB], method="lora")
    assert main([str(run), "--out", str(tmp_path / "out"), "--name", "dpo"]) == 0
    row = (tmp_path / "out" / "dpo.md").read_text().splitlines()[2].split(" | ")
    assert row[5] == "preference accuracy 0.7500 (margin 0.300, step 20)"


def test_report_adds_an_evaluation_and_refuses_a_foreign_file(tmp_path, capsys):
    """--evaluation: finetune.evaluate's --json results as a section of the report; anything else one error line, nothing written."""
    run = write_run(tmp_path / "single", "torch_ddp", {}, 1, {"step": 40, "loss": 2.0, "perplexity": 7.389}, [3 * GB], method="lora")
    models = [{"model": "tiny-llama", "loss": 10.8058, "perplexity": 49306.1341, "tokens": 64}, {"model": "runs/lora", "loss": 10.564, "perplexity": 38715.28, "tokens": 64}]
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(json.dumps({"data": "heldout.jsonl", "task": "instruction", "max_length": 128, "models": models}))
    assert main([str(run), "--out", str(tmp_path / "out"), "--evaluation", str(evaluation)]) == 0
    report = (tmp_path / "out" / "report.md").read_text().split("\n\n")
    assert report[1] == "## Evaluated on heldout.jsonl (task instruction, max_length 128)"
    assert report[2].splitlines() == ["| model | loss | perplexity | tokens |", "|---|---|---|---|", "| tiny-llama | 10.8058 | 49306.1341 | 64 |", "| runs/lora | 10.5640 | 38715.2800 | 64 |"]
    capsys.readouterr()
    evaluation.write_text(json.dumps(models))  # a bare list: not what finetune.evaluate writes
    assert main([str(run), "--out", str(tmp_path / "again"), "--evaluation", str(evaluation)]) == 2
    assert capsys.readouterr().err == f"error: {evaluation}: not a results file of python -m finetune.evaluate --json\n" and not (tmp_path / "again").exists()
