"""Safe loading: pickles planted in a real checkpoint never run, and saving an adapter looks nothing up on the hub."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from finetune import checkpoint
from finetune.outputs import RUN_MARKER
from tests.conftest import run_train


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


PLANTED = ["optimizer/state.json", "optimizer/state.safetensors", "scheduler.json", "rng/rank_0.json", "rng/rank_0.safetensors", "model/adapter_model.safetensors"]


@pytest.fixture(scope="module")
def one_rank_checkpoint(tmp_path_factory):
    """A real single-process LoRA run with a checkpoint at step 2 (shared by the planted-payload tests)."""
    from tests.conftest import write_instruction_file

    root = tmp_path_factory.mktemp("planted")
    args = [f"data.train_path={write_instruction_file(root / 'train.jsonl')}", "model.name=tiny-gpt2", "method=lora", "train.max_steps=2",
            "train.batch_size=4", "checkpoint.every_steps=2", "eval.num_generation_prompts=0"]  # fmt: skip
    result = run_train([*args, f"output_dir={root / 'run'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run" / "checkpoints" / "step_00000002", args


def _plant(ckpt: Path, relative: str, marker: Path) -> None:
    """Replace (or add) a file with a pickle that would create `marker`, and update the manifest as an attacker would."""
    (ckpt / relative).parent.mkdir(parents=True, exist_ok=True)
    (ckpt / relative).write_bytes(pickle.dumps({"state": _Payload(marker)}))
    state = json.loads((ckpt / "state.json").read_text())
    state["files"] = checkpoint.manifest(ckpt)
    state["sha256"] = {name: checkpoint.file_sha256(ckpt / name) for name in state["files"]}  # the hashes are the attacker's to write too
    (ckpt / "state.json").write_text(json.dumps(state))


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_planted_pickles_never_run(one_rank_checkpoint, tmp_path):
    """Where the new format has its files: refused with one line; where format 1 had .pt/.bin files: never read."""
    original, args = one_rank_checkpoint
    marker = tmp_path / "pwned"
    for relative in PLANTED:  # each file alone, read in-process exactly as a resume reads it
        ckpt = tmp_path / relative.replace("/", "_")
        shutil.copytree(original, ckpt)
        _plant(ckpt, relative, marker)
        if relative.endswith(".safetensors"):  # its header does not parse: verify refuses it before any reader
            with pytest.raises(checkpoint.CheckpointError, match="not a"):
                checkpoint.verify(ckpt)
        else:
            checkpoint.verify(ckpt)  # the manifest matches: only the reader stands between the payload and a resume
        with pytest.raises(checkpoint.CheckpointError):
            if relative.startswith(("optimizer", "rng")):
                checkpoint.read_tree(ckpt / relative.rsplit(".", 1)[0])
            elif relative == "scheduler.json":
                checkpoint.read_json(ckpt / relative)
            else:
                checkpoint.read_adapter(ckpt / "model")
    # end to end: the old format's pickle files beside the new ones are never opened; an edited
    # weight index naming a pickle file is refused; a format-1 checkpoint is refused with the way on
    # (a checkpoint resumes only into its own run: each copy goes into the output_dir that resumes it)
    ckpt = tmp_path / "resumed" / "checkpoints" / original.name
    shutil.copytree(original, ckpt)
    for relative in ["scheduler.pt", "rng/rank_0.pt", "optimizer/pytorch_optim.bin", "optimizer/pytorch_optim.bin.index.json", "model/adapter_model.bin"]:
        _plant(ckpt, relative, marker)
    planted = tmp_path / "refused" / "checkpoints" / original.name
    shutil.copytree(ckpt, planted)
    for run in ("resumed", "refused"):  # each copy a run of this tool, as its checkpoint's own run dir is
        shutil.copy(original.parents[1] / RUN_MARKER, tmp_path / run)
    resumed = run_train([*args, "train.max_steps=3", f"output_dir={tmp_path / 'resumed'}", f"resume_from={ckpt}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    _plant(planted, "rng/rank_0.json", marker)
    refused = run_train([*args, "train.max_steps=3", f"output_dir={tmp_path / 'refused'}", f"resume_from={planted}"])
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1 and "rng/rank_0" in errors[0], refused.stderr[-2000:]
    assert not marker.exists()


@pytest.mark.e2e
def test_saving_an_adapter_of_a_named_config_looks_nothing_up_on_the_hub(monkeypatch, tmp_path):
    # peft's "auto" check for resized embeddings asks the hub for the base's config.json when the base
    # (here the name tiny-llama, recorded by the first save) is not a directory: at every later
    # checkpoint, and behind a firewall it hangs until its timeout.
    import socket
    import time
    import warnings

    from peft import get_peft_model

    from finetune.config import LoraConfig, ModelConfig
    from finetune.model import build_lora_config, build_model

    base, _ = build_model(ModelConfig(name="tiny-llama"), seed=42)
    lora_config = build_lora_config(base, LoraConfig())
    model = get_peft_model(base, lora_config)
    checkpoint.write_adapter_dir(checkpoint.local_adapter_state(model), lora_config, "tiny-llama", tmp_path / "step_1")  # the first checkpoint
    assert model.peft_config["default"].base_model_name_or_path == "tiny-llama"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # what a run on a hub model has
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    lookups: list = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: lookups.append(a) or (_ for _ in ()).throw(OSError("no network in this test")))
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: lookups.append(address) or (_ for _ in ()).throw(OSError("no network in this test")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.perf_counter()
        adapter = checkpoint.local_adapter_state(model)
        elapsed = time.perf_counter() - started
    assert adapter and all("lora_" in k for k in adapter)
    assert lookups == [] and elapsed < 1
    assert not [w for w in caught if "remote file" in str(w.message) or "config file" in str(w.message)]
