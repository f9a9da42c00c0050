"""Config errors through the CLI: a bad config fails fast with one line, and a YAML alias bomb is one short line."""

from __future__ import annotations

import time

import pytest

from finetune.config import ConfigError, build_config, parse_args
from tests.conftest import TRAIN, run_python
from tests.unit.test_config import cuda_toolkit  # noqa: F401 (autouse: the same CUDA_HOME as the unit tests)


@pytest.mark.e2e
@pytest.mark.parametrize("argv", [["plugin.name=zero9"], ["train.max_step=3"]])
def test_cli_fails_fast_with_one_line(argv):
    started = time.perf_counter()
    result = run_python([TRAIN, *argv], {"FINETUNE_TEST_LAUNCH": "real"}, timeout=60)  # a fresh interpreter: what "fast" means
    elapsed = time.perf_counter() - started
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert elapsed < 10, f"bad config took {elapsed:.1f} s to reject"


def alias_bomb(levels: int = 8, width: int = 9) -> list[str]:
    """Anchors nested `levels` deep, each aliasing the one before `width` times: width**levels values expanded."""
    return ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]


BOMBS = {"nested_8_deep": alias_bomb(), "recursive": ["&a0 [1, *a0]"]}


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(BOMBS))
def test_a_yaml_alias_bomb_is_one_short_line(tmp_path, name):
    """A 600-byte config expanded to a 254 MB error line (a list where a number belongs, quoted in full):
    alias expansion is bounded before anything reads the values."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("train:\n  max_steps:\n" + "".join(f"    - {item}\n" for item in BOMBS[name]))
    assert bomb.stat().st_size < 700
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"its aliases expand to more than 100,000 values \(or refer to themselves\)") as err:
        build_config(parse_args(["--config", str(bomb)]))
    assert time.perf_counter() - started < 5 and len(str(err.value)) < 300
    with pytest.raises(ConfigError, match="its aliases expand"):  # the same bound for a key=value override
        parse_args(["train.max_steps=[" + ", ".join(BOMBS[name]) + "]"])
