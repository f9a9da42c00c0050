"""Using what a run trained (issue 28): finetune.generate and finetune.evaluate on tiny runs trained once per module."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from finetune.config import build_config, parse_args
from finetune.data import load_splits
from finetune.evaluation import RELOAD_TOLERANCE
from finetune.tasks import TASKS
from tests.conftest import REPO, free_port, read_summary, run_env, run_python, run_train, stop_session, write_classification_file, write_instruction_file

MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny LoRA runs (one with a checkpoint), a full fine-tune and a chat-task LoRA run of tiny-llama, each
    with 4 generation prompts, and a tiny-roberta classifier."""
    root = tmp_path_factory.mktemp("inference")
    data, topics = write_instruction_file(root / "train.jsonl"), write_classification_file(root / "topics.csv")
    common = [f"data.train_path={data}", "data.eval_fraction=0.25", "model.name=tiny-llama", "train.max_steps=8", "train.batch_size=4", "train.warmup_steps=1"]
    common += ["eval.num_generation_prompts=4", f"eval.max_new_tokens={MAX_NEW_TOKENS}"]
    # learning rates at which the greedy answers after training are neither the untrained ones nor empty
    settings = {"lora": [*common, "method=lora", "train.lr=3e-3", "lora.dropout=0", "checkpoint.every_steps=8"], "full": [*common, "method=full", "train.lr=1e-3"]}
    settings["lora_b"] = [*common, "method=lora", "train.lr=2e-3", "lora.r=4", "lora.dropout=0"]  # a second adapter on the same base
    conversations = root / "chat.jsonl"  # the instruction records as one-turn conversations: a chat run, with the chat task's template
    conversations.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}) + "\n" for r in map(json.loads, data.read_text().splitlines())))
    settings["chat"] = [*common[1:], f"data.train_path={conversations}", "task=chat", "method=lora", "train.lr=3e-3", "lora.dropout=0"]
    settings["classifier"] = [f"data.train_path={topics}", "task=classification", "model.name=tiny-roberta", "method=lora", "train.max_steps=8", "train.batch_size=8", "train.lr=3e-3"]
    for name, args in settings.items():
        result = run_train([*args, f"output_dir={root / name}"])
        assert result.returncode == 0, result.stderr[-3000:]
    return {"data": data, "topics": topics, **{name: root / name for name in settings}}


def generation_inputs(run: Path, data: Path) -> tuple[list[dict], list[dict]]:
    """(the run's generations.json, for each its record of the data file in the instruction layout)."""
    task = TASKS["instruction"]()
    records = {task.prompt_text(task.check(row, "")): row for row in map(json.loads, data.read_text().splitlines())}
    generations = json.loads((run / "generations.json").read_text())
    return generations, [records[g["prompt"]] for g in generations]


def generate(source, input: Path, output: Path, *extra: str, env: dict | None = None):
    return run_python(["-m", "finetune.generate", str(source), "--input", str(input), "--output", str(output), *extra], env=env, timeout=300)


def responses(output: Path) -> list[str]:
    return [json.loads(line)["response"] for line in output.read_text().splitlines()]


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_generate_greedy_equals_the_runs_own_generations(runs, tmp_path):
    """Batched and left-padded, the run dir, a checkpoint, final/ and the base model give the run's before/after answers."""
    for run, sources in (("lora", ["", "checkpoints/step_00000008"]), ("full", ["final"])):
        generations, rows = generation_inputs(runs[run], runs["data"])
        assert len(generations) == 4 and len({g["after"] for g in generations} | {g["before"] for g in generations}) > 2  # not all alike, none trivially equal
        prompts = tmp_path / f"{run}.jsonl"
        prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
        for source in sources:
            output = tmp_path / f"{run}-{source.replace('/', '-')}.out.jsonl"
            result = generate(runs[run] / source, prompts, output, "--max-new-tokens", str(MAX_NEW_TOKENS))
            assert result.returncode == 0, result.stderr[-3000:]
            assert responses(output) == [g["after"] for g in generations], source
            assert [{k: v for k, v in json.loads(line).items() if k != "response"} for line in output.read_text().splitlines()] == rows
    base = tmp_path / "base.out.jsonl"
    result = generate("tiny-llama", prompts, base, "--max-new-tokens", str(MAX_NEW_TOKENS))  # the runs' base: the same seed, the same init
    assert result.returncode == 0, result.stderr[-3000:]
    assert responses(base) == [g["before"] for g in generations]
    assert any(g["before"] for g in generations) and any(g["after"] for g in generations)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_generate_killed_half_way_then_resumed_writes_the_uninterrupted_file(runs, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Repeat the word {word} twice."} for word in ("apple", "river", "stone", "cloud", "green")]
    rows += [{"messages": [{"role": "user", "content": "Say hello."}]}] + [json.loads(line) for line in runs["data"].read_text().splitlines()[:4]]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    sampling = ["--temperature", "0.9", "--top-p", "0.95", "--seed", "5", "--batch-size", "3", "--max-new-tokens", "6"]
    whole = tmp_path / "whole.jsonl"
    assert generate(runs["lora"], prompts, whole, *sampling).returncode == 0
    resumed = tmp_path / "resumed.jsonl"
    killed = generate(runs["lora"], prompts, resumed, *sampling, env={"FINETUNE_FAULT": "kill_in_generate:2"})
    assert killed.returncode != 0
    lines = resumed.read_text().split("\n")
    # batches 0 and 1, then half of batch 2's text: one of its rows whole (dropped again: its batch was cut) and a torn line
    assert len(lines) == 8 and lines[-1] and lines[:6] == whole.read_text().split("\n")[:6]
    result = generate(runs["lora"], prompts, resumed, *sampling)
    assert result.returncode == 0 and "wrote 4 answer(s)" in result.stdout, result.stderr[-3000:]
    assert resumed.read_bytes() == whole.read_bytes() and len(responses(whole)) == len(rows)
    again = generate(runs["lora"], prompts, resumed, *sampling)
    assert again.returncode == 0 and "all 10 rows answered already" in again.stdout and resumed.read_bytes() == whole.read_bytes()
    other_seed = tmp_path / "other.jsonl"
    assert generate(runs["lora"], prompts, other_seed, *sampling[:4], "--seed", "6", *sampling[6:]).returncode == 0
    assert responses(other_seed) != responses(whole)  # sampled, and the seed decides the samples


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error")]


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_generate_bad_input_is_one_error_line_and_exit_2(runs, tmp_path, capsys):
    """In process (the checks come before the model is built; the context check after, before anything is written),
    then once through the CLI for the exit code."""
    from finetune.generate import main

    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    pickled = tmp_path / "pickled"
    shutil.copytree(runs["lora"], pickled, ignore=shutil.ignore_patterns("checkpoints"))
    (pickled / "final" / "adapter_model.safetensors").rename(pickled / "final" / "adapter_model.bin")
    remote_code, pickled_model = tmp_path / "remote_code", tmp_path / "pickled_model"
    for model in (remote_code, pickled_model):
        model.mkdir()
    (remote_code / "config.json").write_text(json.dumps({"model_type": "mystery", "auto_map": {"AutoModelForCausalLM": "modeling.Mystery"}}))
    (pickled_model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (pickled_model / "pytorch_model.bin").write_bytes(b"not loaded")
    foreign = tmp_path / "foreign.jsonl"
    hello = '{"prompt": "Hello"}\n'
    cases = {  # fragment of the error line: (input text, source, extra arguments, output)
        "row 2: field 'input' must be a string": (hello + '{"instruction": "Hi", "input": 3}\n', runs["lora"], [], out),
        "row 1: a JSON number, not an object": ("[1, 2]\n", runs["lora"], [], out),
        "message 1 has role 'robot'": ('{"messages": [{"role": "robot", "content": "Hi"}]}\n', "tiny-llama", [], out),
        f"generate: {pickled / 'final'} holds only pickle weights": (hello, pickled, [], out),
        "line 1 is not the answer to --input row 1": (hello, "tiny-llama", [], foreign),
        "exceed the model's context of 256 tokens": (hello, runs["full"], ["--max-new-tokens", "1000"], out),
        "file not found": (None, runs["lora"], [], out),
        "a plain model has no trained classification head": (hello, "tiny-llama", ["--task", "classification"], out),
        "is not a named model": (hello, "no-such-model", [], out),  # the model checks of training's config validation
        "that only its own Python code (config.json auto_map) can load": (hello, remote_code, [], out),
        f"model.name: {pickled_model} holds only pickle weights": (hello, pickled_model, [], out),
    }
    for fragment, (text, source, extra, output) in cases.items():
        prompts.unlink(missing_ok=True)
        if text is not None:
            prompts.write_text(text)
        foreign.write_text('{"prompt": "Other", "response": "x"}\n')
        assert main([str(source), "--input", str(prompts), "--output", str(output), *extra]) == 2, fragment
        err = capsys.readouterr().err
        assert fragment in err and len([line for line in err.splitlines() if line.startswith("error: ")]) == 1, (fragment, err[-2000:])
        assert not out.exists() and foreign.read_text() == '{"prompt": "Other", "response": "x"}\n'
    prompts.write_text(hello + '{"instruction": "Hi", "input": 3}\n')
    result = run_python(["-m", "finetune.generate", str(runs["lora"]), "--input", str(prompts), "--output", str(out)], timeout=300)
    assert result.returncode == 2 and error_lines(result) == [f"error: {prompts} row 2: field 'input' must be a string, got int"], result.stderr[-2000:]


def eval_split(run: Path, path: Path) -> Path:
    """The run's own held-out records (as training split them) written as a data file."""
    cfg = build_config(parse_args(["--config", str(run / "config.yaml")]))
    records = load_splits(cfg.data, cfg.train.seed, cfg.task).eval
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}) + "\n" for r in records))
    return path


def close(measured: float, reported: float) -> bool:
    return abs(measured - reported) <= RELOAD_TOLERANCE["fp32"] * max(1.0, abs(reported))


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_evaluate_base_and_fine_tunes_reproduces_the_runs_eval(runs, tmp_path):
    """The base model, a LoRA run and a full run's final/ side by side on the runs' eval split: each the loss its run reported."""
    data = eval_split(runs["lora"], tmp_path / "heldout.jsonl")
    assert data.read_text() == eval_split(runs["full"], tmp_path / "same.jsonl").read_text()  # the same seed: the same split
    result = run_python(["-m", "finetune.evaluate", "tiny-llama", str(runs["lora"]), str(runs["full"] / "final"), "--data", str(data), "--json", str(tmp_path / "e.json"), "--markdown", str(tmp_path / "e.md")], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads((tmp_path / "e.json").read_text())
    assert (evaluation["data"], evaluation["task"], evaluation["max_length"]) == (str(data), "instruction", 128)
    base, lora, full = evaluation["models"]
    lora_eval, full_eval = read_summary(runs["lora"])["eval"], read_summary(runs["full"])["eval"]
    assert close(base["loss"], lora_eval["before"]["loss"]) and close(base["loss"], full_eval["before"]["loss"]), (base, lora_eval["before"])
    assert close(lora["loss"], lora_eval["after"]["loss"]) and close(full["loss"], full_eval["after"]["loss"]), (lora, full, lora_eval["after"], full_eval["after"])
    assert lora["tokens"] == full["tokens"] == lora_eval["after"]["tokens"] and lora["loss"] < base["loss"] and full["perplexity"] < base["perplexity"]
    table = (tmp_path / "e.md").read_text().splitlines()
    assert table[0] == "| model | loss | perplexity | tokens |" and len(table) == 5 and table[2].startswith("| tiny-llama | ") and table == result.stdout.splitlines()


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_evaluate_a_classifier_checkpoint_and_bad_input(runs, tmp_path, capsys):
    """A classification run's accuracy and macro-F1 as it reported them; bad input one error line, exit 2 (in process)."""
    from finetune.evaluate import main

    data = eval_split(runs["classifier"], tmp_path / "heldout.jsonl")
    assert main([str(runs["classifier"]), "--data", str(data), "--json", str(tmp_path / "e.json")]) == 0
    (measured,) = json.loads((tmp_path / "e.json").read_text())["models"]
    reported = read_summary(runs["classifier"])["eval"]["after"]
    assert close(measured["loss"], reported["loss"]) and (measured["accuracy"], measured["macro_f1"], measured["samples"]) == (reported["accuracy"], reported["macro_f1"], reported["samples"])
    capsys.readouterr()
    foreign_label = tmp_path / "foreign.jsonl"
    foreign_label.write_text('{"text": "rain again", "label": "music"}\n')
    cases = {
        "label 'music' is not in the label set (food, sports, weather)": [str(runs["classifier"]), "--data", str(foreign_label)],
        "different tasks (classification, instruction)": [str(runs["classifier"]), str(runs["lora"]), "--data", str(data)],
        "a plain model has no trained classification head": ["tiny-roberta", str(runs["classifier"]), "--data", str(data)],
        "missing field 'instruction'": [str(runs["lora"]), "--data", str(data)],
        f"--task instruction: {runs['classifier']} was trained for task classification": [str(runs["classifier"]), "--data", str(data), "--task", "instruction"],
    }
    for fragment, argv in cases.items():
        assert main(argv) == 2, fragment
        err = capsys.readouterr().err
        assert fragment in err and len([line for line in err.splitlines() if line.startswith("error: ")]) == 1, (fragment, err)


# --------------------------------------------------------------------- finetune.serve

API_KEY = "test-key"


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    """`python -m finetune.serve` with the two LoRA runs on their base, an API key, on a free port: (base URL, process)."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "finetune.serve", str(runs["lora"]), str(runs["lora_b"] / "final"), "--port", str(port), "--api-key", API_KEY],
                                   cwd=REPO, env=run_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "serving " not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "serving tiny-llama, lora, lora_b on" in log.read_text(), log.read_text()[-3000:]
        yield f"http://127.0.0.1:{port}/v1", process
    finally:
        stop_session(process.pid)
        process.wait()


def client(url: str, key: str = API_KEY):
    import openai

    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=300)


def complete(api, model: str, prompt: str, stream: bool = False) -> str:
    """A greedy completion of MAX_NEW_TOKENS, as the reload check generates (stripped); streamed pieces joined."""
    if stream:
        return "".join(chunk.choices[0].text for chunk in api.completions.create(model=model, prompt=prompt, max_tokens=MAX_NEW_TOKENS, temperature=0, stream=True)).strip()
    return api.completions.create(model=model, prompt=prompt, max_tokens=MAX_NEW_TOKENS, temperature=0).choices[0].text.strip()


def chat(api, model: str, content: str, stream: bool = False) -> str:
    messages = [{"role": "user", "content": content}]
    if stream:
        return "".join(chunk.choices[0].delta.content or "" for chunk in api.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, stream=True))
    return api.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0).choices[0].message.content


def plain_prompts(runs, run: str) -> tuple[list[dict], list[str]]:
    """(the run's generations, their prompts as the run's task renders them for a tokenizer without a chat template)."""
    generations, rows = generation_inputs(runs[run], runs["data"])
    task = TASKS["instruction"]()
    return generations, [task.plain_prompt(task.check(row, "")) for row in rows]


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_serve_answers_as_the_runs_did_for_each_adapter_and_the_base(runs, server):
    api = client(server[0])
    assert [m.id for m in api.models.list().data] == ["tiny-llama", "lora", "lora_b"]
    for run in ("lora", "lora_b"):
        generations, prompts = plain_prompts(runs, run)
        assert [complete(api, run, p) for p in prompts] == [g["after"] for g in generations], run
        assert [complete(api, "tiny-llama", p) for p in prompts] == [g["before"] for g in generations]  # the adapters off
    assert [complete(api, "lora", p, stream=True) for p in prompts] == [complete(api, "lora", p) for p in prompts]
    answer = api.completions.create(model="lora", prompt=prompts[0], max_tokens=3, temperature=0)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 3 and answer.object == "text_completion"
    for model in ("lora", "lora_b", "tiny-llama"):
        assert chat(api, model, "Say hello.", stream=True) == chat(api, model, "Say hello.")
    assert len({chat(api, model, "Say hello.") for model in ("lora", "lora_b", "tiny-llama")}) == 3  # each model its own answer


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_serve_ten_concurrent_requests(runs, server):
    """Ten requests at once over the three models, streamed and not, greedy and sampled: each as it is alone."""
    api = client(server[0])
    _, prompts = plain_prompts(runs, "lora")
    calls = [(complete, model, prompt, stream) for model in ("lora", "lora_b", "tiny-llama") for prompt, stream in ((prompts[0], False), (prompts[1], False), (prompts[2], True))]
    calls.append((chat, "lora_b", "Say hello.", True))
    alone = [call(api, model, text, stream) for call, model, text, stream in calls]
    sampled = lambda: api.completions.create(model="lora", prompt=prompts[0], max_tokens=6, temperature=0.9, seed=7).choices[0].text
    with ThreadPoolExecutor(len(calls) + 1) as pool:
        together = [pool.submit(call, api, model, text, stream) for call, model, text, stream in calls]
        seeded = pool.submit(sampled)
        assert [f.result() for f in together] == alone
        assert seeded.result() == sampled()  # a seed gives the same sample, whatever else runs beside it


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_serve_bad_requests_get_openai_errors_and_the_server_goes_on(runs, server):
    import httpx2 as httpx
    import openai

    url, process = server
    api = client(url)
    user = [{"role": "user", "content": "Hi"}]
    refusals = {  # what the client raises, its status, the error's param or code
        "unknown model": (lambda: api.chat.completions.create(model="nope", messages=user), openai.NotFoundError, 404, "model_not_found"),
        "empty messages": (lambda: api.chat.completions.create(model="lora", messages=[]), openai.BadRequestError, 400, "messages"),
        "max_tokens beyond the context": (lambda: api.chat.completions.create(model="lora", messages=user, max_tokens=10_000), openai.BadRequestError, 400, "context_length_exceeded"),
        "a message with an unknown role": (lambda: api.chat.completions.create(model="lora", messages=[{"role": "robot", "content": "Hi"}]), openai.BadRequestError, 400, "messages"),
        "a negative temperature": (lambda: api.completions.create(model="lora", prompt="Hi", temperature=-1), openai.BadRequestError, 400, "temperature"),
        "a wrong API key": (lambda: client(url, "wrong").models.list(), openai.AuthenticationError, 401, "invalid_api_key"),
    }
    for case, (call, error, status, field) in refusals.items():
        with pytest.raises(error) as raised:
            call()
        body = raised.value.body
        assert raised.value.status_code == status and field in (body["param"], body["code"]) and body["message"] and body["type"], (case, body)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    for content in (b'{"model": "lora", "messages": [', b"[1, 2]", b"\xff\xfe"):  # malformed JSON, not an object, not UTF-8
        answer = httpx.post(f"{url}/chat/completions", content=content, headers=headers)
        assert answer.status_code == 400 and set(answer.json()["error"]) == {"message", "type", "param", "code"}, answer.text
    assert httpx.get(f"{url}/nowhere", headers=headers).json()["error"]["code"] == "not_found"
    assert process.poll() is None and [m.id for m in api.models.list().data] == ["tiny-llama", "lora", "lora_b"]
    _, prompts = plain_prompts(runs, "lora")
    assert complete(api, "lora", prompts[0]) == json.loads((runs["lora"] / "generations.json").read_text())[0]["after"]


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_serve_refuses_what_it_cannot_serve_before_loading(runs, tmp_path, capsys):
    """In process: each refusal one error line, exit 2, before any model is built."""
    import socket

    from finetune.serve import main

    other_seed = tmp_path / "other_seed"  # an adapter for another random init of tiny-llama
    shutil.copytree(runs["lora"], other_seed, ignore=shutil.ignore_patterns("checkpoints"))
    config = (other_seed / "config.yaml").read_text()
    assert "seed: 42\n" in config
    (other_seed / "config.yaml").write_text(config.replace("seed: 42\n", "seed: 43\n"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases = {
            "one model per server": [str(runs["full"]), "tiny-llama"],
            "is not the adapters' base model": [str(runs["full"]), str(runs["lora"])],
            "is a classification model": [str(runs["classifier"])],
            "two models would have the same id (lora)": [str(runs["lora"]), str(runs["lora"] / "final")],
            "cannot listen there": [str(runs["lora"]), "--port", str(taken.getsockname()[1])],
            "the adapters need different base models (tiny-llama (seed 42), tiny-llama (seed 43))": [str(runs["lora"]), str(other_seed)],
        }
        for fragment, argv in cases.items():
            assert main(argv) == 2, fragment
            err = capsys.readouterr().err
            assert fragment in err and len([line for line in err.splitlines() if line.startswith("error: ")]) == 1, (fragment, err)


# --------------------------------------------------------------------- finetune.chat


class Terminal:
    """`python -m finetune.chat ARGV` on a pseudo-terminal, read and typed into as a user would."""

    def __init__(self, argv: list[str]) -> None:
        self.master, follower = pty.openpty()
        self.process = subprocess.Popen([sys.executable, "-m", "finetune.chat", *argv], cwd=REPO, env=run_env(), stdin=follower, stdout=follower, stderr=follower, start_new_session=True)
        os.close(follower)
        self.pending = ""

    def read_until(self, marker: str, timeout: float = 240) -> str:
        """Everything the terminal shows up to `marker` (consumed with it; newlines as \\n)."""
        deadline = time.monotonic() + timeout
        while marker not in self.pending:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {marker!r} on the terminal within {timeout} s; it shows: {self.pending[-2000:]}")
            try:
                self.pending += os.read(self.master, 4096).decode("utf-8", "replace").replace("\r\n", "\n")
            except OSError:  # the program ended
                raise AssertionError(f"the program ended before {marker!r}; it showed: {self.pending[-2000:]}") from None
        shown, _, self.pending = self.pending.partition(marker)
        return shown

    def say(self, line: str) -> str:
        """Type a line; the answer shown before the next prompt (the terminal's echo of the line left out)."""
        os.write(self.master, (line + "\n").encode())
        shown = self.read_until("\n>>> ")
        echoed, _, answer = shown.partition("\n")
        assert echoed.endswith(line), (echoed, line)
        return answer

    def close(self) -> int:
        os.write(self.master, b"/exit\n")
        code = self.process.wait(timeout=60)
        os.close(self.master)
        return code


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_chat_in_a_terminal_answers_as_the_run_did_resets_and_trims(runs):
    generations = json.loads((runs["chat"] / "generations.json").read_text())
    messages = [g["prompt"].removeprefix("user: ") for g in generations]
    assert all(g["prompt"].startswith("user: ") and "\n" not in g["prompt"] for g in generations) and any(g["after"] for g in generations)
    terminal = Terminal([str(runs["chat"]), "--temperature", "0", "--max-new-tokens", str(MAX_NEW_TOKENS)])
    try:
        banner = terminal.read_until(">>> ")
        assert "(chat template, cpu, context 256 tokens)" in banner, banner
        for message, generation in zip(messages, generations):
            assert terminal.say(message).strip() == generation["after"]  # greedy, the run's template: the run's own answer
            assert terminal.say("/reset") == "[conversation forgotten]"  # the next message starts afresh
        first = terminal.say(messages[0])
        terminal.say(messages[1])  # in the conversation now: the same message gets another prompt
        assert terminal.say("/reset") == "[conversation forgotten]" and terminal.say(messages[0]) == first
        assert terminal.close() == 0
    finally:
        terminal.process.kill()
    long = " ".join(["apple river stone cloud"] * 15)  # ~60 tokens: with 120 new tokens, two such turns exceed 256
    terminal = Terminal(["tiny-llama", "--system", "Be brief.", "--max-new-tokens", "120", "--seed", "3"])
    try:
        assert "(plain completion, cpu, context 256 tokens)" in terminal.read_until(">>> ")
        assert "history trimmed" not in terminal.say(long)
        trimmed = terminal.say(long)
        assert re.match(r"\[history trimmed: the 1 oldest turn\(s\) no longer fit the context of 256 tokens with --max-new-tokens 120\]\n", trimmed), trimmed
        assert terminal.say(long * 5).startswith("[that message does not fit the context of 256 tokens")
        assert terminal.close() == 0
    finally:
        terminal.process.kill()


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_chat_streams_the_answer_and_refuses_bad_input(runs, capsys):
    """In process: the answer reaches the terminal in pieces as it is generated; a classifier is one error line, exit 2."""
    from finetune.chat import Session, main, parse_cli
    from finetune.inference import load, open_source

    written: list[str] = []
    args = parse_cli([str(runs["chat"]), "--temperature", "0", "--max-new-tokens", str(MAX_NEW_TOKENS)])
    session = Session(load(open_source(str(runs["chat"]), command="chat")), args, written.append)
    generation = next(g for g in json.loads((runs["chat"] / "generations.json").read_text()) if len(g["after"].split()) > 2)
    answer = session.say(generation["prompt"].removeprefix("user: "))
    assert answer.strip() == generation["after"] and "".join(written) == answer + "\n" and len([w for w in written if w.strip()]) > 2
    assert main([str(runs["classifier"])]) == 2
    err = capsys.readouterr().err
    assert "is a classification model" in err and len([line for line in err.splitlines() if line.startswith("error: ")]) == 1
