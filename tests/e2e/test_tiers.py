"""The tier folders: a test whose folder is not its tier (its marker) fails the collection, naming where it belongs."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

# test file under tests/ -> its source; the three placed right, the rest not
FILES = {
    "unit/test_placed.py": "def test_in_process():\n    pass\n",
    "e2e/test_placed.py": "import pytest\n\n\n@pytest.mark.e2e\ndef test_launches_the_cli():\n    pass\n",
    "distributed/test_placed.py": "import pytest\n\npytestmark = pytest.mark.distributed\n\n\ndef test_launches_ranks():\n    pass\n",
    "unit/test_e2e.py": "import pytest\n\n\n@pytest.mark.e2e\ndef test_launches_the_cli():\n    pass\n",
    "e2e/test_unit.py": "import pytest\n\n\n@pytest.mark.parametrize('case', [1, 2])\ndef test_in_process(case):\n    pass\n",
    "test_top.py": "def test_in_no_tier_folder():\n    pass\n",
    "distributed/test_both.py": "import pytest\n\n\n@pytest.mark.e2e\n@pytest.mark.distributed\ndef test_two_tiers():\n    pass\n",
}
ERRORS = [
    "tests/unit/test_e2e.py::test_launches_the_cli is marked e2e: it belongs in tests/e2e/",
    "tests/e2e/test_unit.py::test_in_process[1] is a unit test (not marked e2e or distributed): it belongs in tests/unit/",
    "tests/e2e/test_unit.py::test_in_process[2] is a unit test (not marked e2e or distributed): it belongs in tests/unit/",
    "tests/test_top.py::test_in_no_tier_folder is a unit test (not marked e2e or distributed): it belongs in tests/unit/",
    "tests/distributed/test_both.py::test_two_tiers is marked e2e and distributed: a test belongs to one tier",
]


@pytest.mark.e2e
def test_a_test_outside_its_tier_folder_fails_the_collection(tmp_path):
    """This repository's pytest.ini and tests/conftest.py over a tree of their own: only the misplaced files fail."""
    shutil.copy(REPO / "pytest.ini", tmp_path)
    for folder in ("tests", "tests/unit", "tests/e2e", "tests/distributed"):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "__init__.py").touch()
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "tests")
    for name, source in FILES.items():
        (tmp_path / "tests" / name).write_text(source)
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-rN", "-p", "no:cacheprovider", "tests"],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr  # interrupted: errors during collection
    # -rN: no short summary, whose copy of a message is cut to the terminal's width, and not in CI (pytest checks $CI)
    reported = [line for line in result.stdout.splitlines() if line.startswith("tests/") and " is " in line]
    assert sorted(reported) == sorted(ERRORS), result.stdout
    assert "3 tests collected, 4 errors" in result.stdout, result.stdout
