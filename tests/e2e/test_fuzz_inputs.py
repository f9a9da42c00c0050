"""The exit-code contract for fuzzed input, for real: a few CLI runs each refuse in one bounded line with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TRAIN, run_python
from tests.unit.test_fuzz_inputs import MAX_LINE


# --- the exit-code contract, for real (each launch costs an interpreter start and the imports) ----------------


def _alias_bomb(root: Path) -> list[str]:
    items = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    (root / "bomb.yaml").write_text("train:\n  max_steps:\n" + "".join(f"    - {item}\n" for item in items))
    return ["--config", str(root / "bomb.yaml")]


def _bad_jsonl(root: Path) -> list[str]:
    rows = [json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(8)]
    rows[5] = rows[5][:-1] + ",}"
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    return [f"data.train_path={root / 'train.jsonl'}", "model.name=tiny-gpt2", "method=full"]


CLI_CASES = {
    "alias_bomb": (_alias_bomb, "its aliases expand to more than 100,000 values"),
    "bad_jsonl_line": (_bad_jsonl, "train.jsonl line 6: not valid JSON"),
    "huge_value": (lambda root: ["train.on_nan=" + "x" * 100_000], "train.on_nan: unknown value 'xxxx"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_fuzzed_input_in_one_line(tmp_path, case):
    """Exit 2, one `error:` line of bounded length, no traceback, nothing written outside output_dir."""
    make_args, fragment = CLI_CASES[case]
    args = make_args(tmp_path)
    before = sorted(p for p in tmp_path.rglob("*"))
    out = tmp_path / "out"
    result = run_python([TRAIN, *args, f"output_dir={out}"], timeout=180)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr[-2000:]
    assert len(lines[0]) <= MAX_LINE
    assert [p for p in sorted(tmp_path.rglob("*")) if p not in before and out not in (p, *p.parents)] == []
