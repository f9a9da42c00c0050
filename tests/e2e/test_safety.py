"""Output safety (issue 17) through real runs: an overwrite that fails keeps the old run, one run per output_dir (a
lock), checkpoints verified by sha256, resume only into the owning run, a resumed run owns its lineage, a
reload mismatch fails the run, and an export never replaces what is there. One real run serves every test (each works on a copy)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetune import checkpoint
from finetune.outputs import LOCK, PREVIOUS
from tests.conftest import read_summary, run_train, write_instruction_file
from tests.unit.test_safety import NOT_A_RUN, plant, tree


def run_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.train_path={data}", "data.eval_fraction=0.25", f"output_dir={out}", "model.name=tiny-gpt2", "method=lora", "train.max_steps=4",
            "train.batch_size=4", "checkpoint.every_steps=2", "checkpoint.keep_last=0", "eval.every_steps=0", "eval.num_generation_prompts=1", "eval.max_new_tokens=2", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny LoRA run with checkpoints at steps 2 and 4: (data file, run dir). Tests work on copies."""
    root = tmp_path_factory.mktemp("safety")
    data = write_instruction_file(root / "train.jsonl", n=32)
    out = root / "run"
    result = run_train(run_args(data, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return data, out


def copy_run(first_run: tuple[Path, Path], target: Path) -> Path:
    shutil.copytree(first_run[1], target)
    return target


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.e2e
def test_a_failed_overwrite_keeps_the_previous_run_and_takes_over_a_stale_lock(first_run, tmp_path):
    out = copy_run(first_run, tmp_path / "run")
    final, summary = tree(out / "final"), (out / "summary.json").read_bytes()
    checkpoints = [p.name for p in checkpoint.complete_checkpoints(str(out))]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (out / LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead)}))  # a run that is gone
    bad = tmp_path / "bad_row.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    result = run_train(run_args(bad, out, "overwrite_output_dir=true"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(error_lines(result)) == 1, result.stderr[-2000:]
    assert "taking over the lock" in result.stdout
    assert "previous run's results are back" in result.stdout
    assert tree(out / "final") == final and (out / "summary.json").read_bytes() == summary
    assert [p.name for p in checkpoint.complete_checkpoints(str(out))] == checkpoints
    assert not (out / ".previous-run").exists() and not (out / LOCK).exists()  # released on the error too


@pytest.mark.e2e
def test_a_second_run_on_a_locked_output_dir_is_refused(first_run, tmp_path):
    out = copy_run(first_run, tmp_path / "run")
    (out / LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))  # this test process: alive
    before = tree(out)
    result = run_train(run_args(first_run[0], out, "overwrite_output_dir=true"))
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and f"pid {os.getpid()}" in lines[0] and os.uname().nodename in lines[0], result.stderr[-2000:]
    assert tree(out) == before  # nothing moved, the lock left to its owner


@pytest.mark.e2e
def test_a_flipped_byte_in_a_checkpoint_is_named(first_run, tmp_path):
    step = shutil.copytree(checkpoint.complete_checkpoints(str(first_run[1]))[0], tmp_path / "step")
    state = checkpoint.verify(step)
    assert set(state["sha256"]) == set(state["files"])  # every file hashed, sizes kept
    shard = step / "model" / "adapter_model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size: only the hash can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="model/adapter_model.safetensors does not match the sha256"):
        checkpoint.verify(step)


@pytest.mark.e2e
def test_resume_from_another_runs_checkpoint_is_refused(first_run, tmp_path):
    from finetune.train import main

    ckpt = checkpoint.complete_checkpoints(str(first_run[1]))[0]
    with pytest.raises(checkpoint.CheckpointError, match=f"belongs to another run.*lora.init_from={ckpt}/model"):
        main(run_args(first_run[0], tmp_path / "other", f"resume_from={ckpt}"))
    assert not (tmp_path / "other").exists()  # refused before anything was written


@pytest.mark.e2e
def test_a_resume_from_an_older_checkpoint_fences_the_newer_ones_and_a_reload_mismatch_fails(first_run, tmp_path):
    out = copy_run(first_run, tmp_path / "run")
    step_2, old_step_4 = checkpoint.complete_checkpoints(str(out))
    old_state = (old_step_4 / "state.json").read_text()
    # resumed from step 2 to a new end at step 3: the old branch's step 4 must not stay "latest"
    result = run_train(run_args(first_run[0], out, f"resume_from={step_2}", "train.max_steps=3"), env={"FINETUNE_FAULT": "reload_mismatch:0"})
    assert "the newer checkpoints of the branch this resume abandons moved to" in result.stdout, result.stdout[-2000:]
    assert [p.name for p in checkpoint.complete_checkpoints(str(out))] == ["step_00000002", "step_00000003"]
    fenced = list((out / "checkpoints").glob("abandoned-*/step_00000004"))
    assert len(fenced) == 1 and (fenced[0] / "state.json").read_text() == old_state  # kept, out of the lineage
    # the forced reload mismatch: exit 2 with one error line, after summary.json was written
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1 and "not the trained model" in lines[0], result.stderr[-2000:]
    summary = read_summary(out)
    assert summary["reload"]["ok"] is False and summary["steps"] == 3


@pytest.mark.e2e
def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_one_and_final(first_run, tmp_path):
    """The resumed run may write no file over 12 kB (RLIMIT_FSIZE, as a full disk fails a write): its
    checkpoint at step 6 cannot be written. One line says so; step 4 and final/ are as they were."""
    import resource
    import signal

    from tests.conftest import REPO, TRAIN, run_env

    out = copy_run(first_run, tmp_path / "run")
    final, step_4 = tree(out / "final"), checkpoint.complete_checkpoints(str(out))[-1]

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (12_000, 12_000))

    args = run_args(first_run[0], out, "resume_from=latest", "train.max_steps=6", "launch.rank_logs=false")
    result = subprocess.run([sys.executable, TRAIN, *args], cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=420, preexec_fn=limit_file_size)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = error_lines(result)
    assert len(errors) == 1 and errors[0].startswith("error: out of space writing checkpoint 6") and str(step_4) in errors[0], result.stderr[-2000:]
    assert checkpoint.complete_checkpoints(str(out))[-1] == step_4
    checkpoint.verify(step_4)  # every file at its size and sha256
    assert tree(out / "final") == final


@pytest.mark.e2e
def test_new_runs_and_a_bad_overwrite_through_the_cli_leave_every_file(first_run, tmp_path):
    """Real launches for the exit-code contract: a user's directory with overwrite_output_dir=true, then a run into a
    directory whose previous run a killed overwrite set aside: each one error line, exit 2, nothing changed."""
    mine = plant(tmp_path / "mine", NOT_A_RUN["model_and_notes"])
    out = copy_run(first_run, tmp_path / "run")
    (out / PREVIOUS).mkdir()
    for name in ("final", "checkpoints", "summary.json"):
        (out / name).rename(out / PREVIOUS / name)
    for target, fragment in ((mine, "neither empty nor a run of this tool"), (out, "holds the run an unfinished overwrite set aside")):
        before = tree(target)
        extra = ("overwrite_output_dir=true",) if target == mine else ()
        result = run_train(run_args(first_run[0], target, *extra))
        assert result.returncode == 2 and [fragment in line for line in error_lines(result)] == [True], result.stderr[-2000:]
        assert tree(target) == before


@pytest.mark.e2e
def test_an_export_never_replaces_what_is_there(first_run, tmp_path):
    from finetune.export import main as export_main

    (tmp_path / "a_file").write_text("mine")
    assert export_main([str(first_run[1]), str(tmp_path / "a_file")]) == 2 and (tmp_path / "a_file").read_text() == "mine"
    partial = plant(tmp_path / "merged.partial", {"keep.txt": "mine"})  # the user's, with the name of the export's staging dir
    assert export_main([str(first_run[1]), str(tmp_path / "merged")]) == 2
    assert tree(partial) == {"keep.txt": b"mine"} and not (tmp_path / "merged").exists()
    (tmp_path / "run1.gguf.partial").write_text("mine")
    assert export_main([str(first_run[1]), "--gguf", str(tmp_path / "run1.gguf")]) == 2
    assert (tmp_path / "run1.gguf.partial").read_text() == "mine" and not (tmp_path / "run1.gguf").exists()
    partial.rename(tmp_path / "moved")
    assert export_main([str(first_run[1]), str(tmp_path / "merged")]) == 0  # then the export goes through
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "merged", "moved", "run1.gguf.partial"]
