"""Only finetune.distributed calls torch's process-group teardown."""

from __future__ import annotations

import re

from tests.conftest import REPO


def test_only_destroy_process_groups_calls_torchs_teardown():
    """Every script ends its groups through finetune.distributed, the one place that knows how."""
    torch_teardown = re.compile(r"\bdestroy_process_group\(")
    scripts = [p for p in REPO.glob("**/*.py") if ".venv" not in p.parts and p != REPO / "finetune" / "distributed.py"]
    found = [f"{p.relative_to(REPO)}:{n}" for p in scripts for n, line in enumerate(p.read_text().splitlines(), 1) if torch_teardown.search(line.split("#", 1)[0])]
    assert not found, found
