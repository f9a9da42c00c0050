"""Real single-process training runs: gradient accumulation, bf16 and checkpointing; no model pass twice."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, read_metrics, read_summary, run_python, run_train
from tests.distributed.test_train import check_run_contract, common_args


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_single_process_accumulation_bf16_checkpointing(instruction_file, tmp_path):
    out = tmp_path / "run"
    args = common_args(instruction_file, out) + [
        "model.name=tiny-gpt2",
        "method=lora",
        "train.lr=5e-3",
        "train.grad_accum_steps=2",
        "train.precision=bf16",
        "train.gradient_checkpointing=true",
        "train.lr_scheduler=linear",
    ]
    result = run_train(args, launcher="python")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = check_run_contract(out, world_size=1)
    assert summary["precision"] == "bf16"
    assert summary["checks"]["frozen_changed"] == 0
    lrs = [m["lr"] for m in read_metrics(out) if "lr" in m]
    assert lrs[-1] < lrs[1], "linear schedule did not decay"


# train.py's main in this process, counting the eval passes (finetune.evaluation.evaluate: the run's and the reload
# check's) and the models the reload check builds (finetune.model.build_model, which reload_final imports when called).
COUNTING_RUN = f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
from finetune import evaluation, model, train

calls = {{"evaluate": 0, "build_model": 0}}


def counted(name, function):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return function(*args, **kwargs)
    return wrapper


evaluation.evaluate, model.build_model = counted("evaluate", evaluation.evaluate), counted("build_model", model.build_model)
code = train.run_main(sys.argv[1:])
print(json.dumps(calls))
sys.exit(code)
"""


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_no_eval_pass_or_model_build_is_spent_twice(instruction_file, tmp_path):
    """16 eval samples are the whole reload probe: the trained model's probe loss is eval after's, not a third pass;
    a full fine-tune's reload check with no generation prompts builds no base (final/ loads alone)."""
    script, out = tmp_path / "counting.py", tmp_path / "run"
    script.write_text(COUNTING_RUN)
    args = [f"data.train_path={instruction_file}", "data.eval_fraction=0.25", f"output_dir={out}", "model.name=tiny-gpt2", "method=full",
            "train.max_steps=2", "eval.every_steps=0", "eval.num_generation_prompts=0", "checkpoint.every_steps=0"]
    result = run_python([str(script), *args])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {"evaluate": 3, "build_model": 0}  # before and after training; the reload's probe
    summary = read_summary(out)
    assert summary["data"]["eval_samples"] == 16 and summary["reload"]["ok"]
    assert summary["reload"]["trained_probe_loss"] == summary["eval"]["after"]["loss"]
