"""Output safety (issue 17) in process: the output_dir checks (never a directory that is not a run, the
lock), and what an overwrite sets aside, restores and adopts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from finetune.config import Config, load_config
from finetune.outputs import LOCK, MARKER_STAGING, PREVIOUS, RUN_ENTRIES, RUN_MARKER, OutputDirInUse, OutputRefused, drop_previous, occupancy_problem, output_problems, own_output_dir, run_entries


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_the_lock_is_taken_and_released_in_process(tmp_path):
    from finetune.config import Config

    cfg = Config(output_dir=str(tmp_path / "out"))
    with own_output_dir(cfg):
        owner = json.loads((tmp_path / "out" / LOCK).read_text())
        assert owner["pid"] == os.getpid()
        with pytest.raises(OutputDirInUse, match=f"pid {os.getpid()}"), own_output_dir(cfg):
            pass
    assert not (tmp_path / "out" / LOCK).exists()


# --- what output_dir may be (hardening II, items 1-3): absent, empty or a marked run; a set-aside run blocks -------


def plant(root: Path, files: dict[str, str]) -> Path:
    """A directory holding these files (relative path: text)."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def settings(out: Path | str, *extra: str) -> Config:
    return load_config([f"output_dir={out}", *extra], world_size=1)


def problems(out: Path | str, *extra: str, writer: bool = True) -> list[str]:
    return output_problems(settings(out, *extra), writer)


NOT_A_RUN = {  # a user's directory that holds names a run writes, and no marker
    "config_yaml": {"config.yaml": "my: settings\n"},
    "metrics_and_plots": {"metrics.jsonl": "{}\n", "loss.png": "png", "generations.json": "[]"},
    "model_and_notes": {"final/my_model.bin": "weights", "checkpoints/important.txt": "keep", "summary.json": "{}"},
}


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("case", list(NOT_A_RUN))
def test_a_directory_that_is_not_a_run_is_never_written_over(tmp_path, case, overwrite):
    out = plant(tmp_path / "mine", NOT_A_RUN[case])
    before = tree(out)
    found = problems(out, f"overwrite_output_dir={str(overwrite).lower()}")
    assert len(found) == 1 and f"{out} is neither empty nor a run of this tool" in found[0] and "adopt" in found[0], found
    with pytest.raises(OutputRefused, match="neither empty nor a run"), own_output_dir(settings(out, f"overwrite_output_dir={str(overwrite).lower()}")):
        pass  # rank 0's own check under the lock, in case the directory changed after output_problems
    assert tree(out) == before and not (out / RUN_MARKER).exists() and not (out / LOCK).exists()


def test_output_dir_dot_in_a_repository_is_refused(tmp_path, monkeypatch):
    repo = plant(tmp_path / "repo", {".git/HEAD": "ref: refs/heads/main\n", "config.yaml": "untracked: true\n", "checkpoints/readme.md": "tracked\n"})
    monkeypatch.chdir(repo)
    for extra in ([], ["overwrite_output_dir=true"]):
        found = problems(".", *extra)
        assert len(found) == 1 and "neither empty nor a run of this tool (it holds .git, checkpoints, config.yaml" in found[0], found


def test_an_empty_or_absent_directory_is_taken_and_marked(tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "absent" / "run"):
        assert problems(out) == []
        with own_output_dir(Config(output_dir=str(out))):
            assert run_entries(out) == list(RUN_ENTRIES)


def test_a_new_dir_where_the_other_ranks_already_log_is_taken(tmp_path):
    """Rank 1 may start logs/rank_1.log before rank 0 (or rank 1 itself) has checked output_dir: that is this launch's."""
    out = plant(tmp_path / "run", {"logs/rank_1.log": "===== launch\n"})
    assert problems(out) == []
    with own_output_dir(Config(output_dir=str(out))):  # rank 0, under the lock
        assert run_entries(out) == list(RUN_ENTRIES)
    mine = plant(tmp_path / "mine", {"logs/rank_1.log": "", "logs/server.log": "mine"})  # a user's logs/ is not a launch's
    assert "neither empty nor a run of this tool (it holds logs," in problems(mine)[0]


def test_the_other_ranks_see_rank_0_marking_the_dir_as_this_run(tmp_path):
    """While rank 0 writes the marker (lock taken, marker staged, not yet renamed), rank 1's check finds nothing foreign."""
    out = plant(tmp_path / "run", {LOCK: "{}", MARKER_STAGING: "{"})
    assert occupancy_problem(Config(output_dir=str(out)), writer=False) is None


def fake_run(out: Path) -> Path:
    """A marked run dir with a file under each result name, as a finished run leaves it (no training needed)."""
    with own_output_dir(Config(output_dir=str(out))):
        plant(out, {"config.yaml": "a: 1\n", "metrics.jsonl": "{}\n", "summary.json": "{}", "final/model.safetensors": "A", "checkpoints/step_00000002/state.json": "{}",
                    "tensorboard/events.A": "A", "logs/rank_0.log": "launch A\n"})  # fmt: skip
    return out


def test_an_overwrite_sets_aside_only_what_the_run_wrote(tmp_path):
    out = fake_run(tmp_path / "run")
    plant(out, {"notes.txt": "mine", "my_eval/scores.csv": "1,2"})  # the user's, beside the run's
    cfg = Config(output_dir=str(out), overwrite_output_dir=True)
    with own_output_dir(cfg):
        assert sorted(p.name for p in (out / PREVIOUS).iterdir()) == ["checkpoints", "config.yaml", "final", "metrics.jsonl", "summary.json", "tensorboard"]
        assert sorted(p.name for p in out.iterdir()) == sorted([".lock", PREVIOUS, RUN_MARKER, "logs", "my_eval", "notes.txt"])  # no old events under the new run's
        plant(out, {"final/model.safetensors": "B"})
        drop_previous(str(out))  # this run's final/ is written
    assert (out / "notes.txt").read_text() == "mine" and (out / "my_eval" / "scores.csv").read_text() == "1,2"
    assert (out / "logs" / "rank_0.log").read_text() == "launch A\n"  # appended to, never set aside
    assert (out / "final" / "model.safetensors").read_text() == "B" and not (out / PREVIOUS).exists()


def test_a_preempted_overwrite_keeps_its_checkpoint_and_the_run_it_replaces(tmp_path):
    from finetune.preemption import Preempted

    out = fake_run(tmp_path / "run")
    with pytest.raises(Preempted), own_output_dir(Config(output_dir=str(out), overwrite_output_dir=True)):
        plant(out, {"checkpoints/step_00000003/state.json": "B"})
        raise Preempted(3, out / "checkpoints" / "step_00000003")
    assert (out / "checkpoints" / "step_00000003" / "state.json").read_text() == "B"  # its resume goes on from here
    assert (out / PREVIOUS / "final" / "model.safetensors").read_text() == "A"
    assert problems(out, "resume_from=latest") == []  # the resume finishes the overwrite; any other run is refused (below)


def killed_overwrite(tmp_path: Path) -> Path:
    """Run A set aside in .previous-run/ by an overwrite that was SIGKILLed while writing final/ (its files beside)."""
    out = fake_run(tmp_path / "run")
    (out / PREVIOUS).mkdir()
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final", "checkpoints", "tensorboard"):
        (out / name).rename(out / PREVIOUS / name)
    return plant(out, {"config.yaml": "b: 1\n", "metrics.jsonl": "{}\n", "final.partial/model.safetensors": "B, half"})


@pytest.mark.parametrize("extra", [[], ["overwrite_output_dir=true"]])
def test_a_run_set_aside_by_a_killed_overwrite_refuses_a_new_run(tmp_path, extra):
    out = killed_overwrite(tmp_path)
    found = problems(out, *extra)
    assert len(found) == 1 and f"{out / PREVIOUS} holds the run an unfinished overwrite set aside" in found[0], found
    assert f"python -m finetune.outputs restore {out}" in found[0] and f"rm -rf {out / PREVIOUS}" in found[0]
    # the other ranks may look only after their rank 0 has set the old run aside: that check is rank 0's
    assert problems(out, *extra, writer=False) == []


def test_restore_puts_the_set_aside_run_back(tmp_path, capsys):
    from finetune.outputs import main as outputs_main

    out = killed_overwrite(tmp_path)
    plant(out, {"notes.txt": "mine"})
    assert outputs_main(["restore", str(out)]) == 0
    assert (out / "final" / "model.safetensors").read_text() == "A" and (out / "config.yaml").read_text() == "a: 1\n"
    assert not (out / "final.partial").exists() and not (out / PREVIOUS).exists() and not (out / LOCK).exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert problems(out) == [f"output_dir: {out} holds another run (summary.json, checkpoints, final); use resume_from=latest to continue it, overwrite_output_dir=true to replace it, or another output_dir"]
    assert outputs_main(["restore", str(out)]) == 2 and capsys.readouterr().err == f"error: {out}: holds no {PREVIOUS}/ to restore\n"
    mine = plant(tmp_path / "mine", {f"{PREVIOUS}/final/a.bin": "old", "final/b.bin": "new"})  # not a run: nothing is deleted
    before = tree(mine)
    assert outputs_main(["restore", str(mine)]) == 2 and "not a run of this tool" in capsys.readouterr().err and tree(mine) == before


def test_adopt_marks_a_run_written_before_runs_were_marked(tmp_path):
    from finetune.outputs import main as outputs_main

    out = plant(tmp_path / "old_run", {"config.yaml": "a: 1\n", "checkpoints/step_00000002/state.json": "{}"})
    assert "neither empty nor a run" in problems(out, "resume_from=latest")[0]
    assert outputs_main(["adopt", str(out)]) == 0
    assert problems(out, "resume_from=latest") == [] and run_entries(out) == list(RUN_ENTRIES)
