"""Several training runs in one launch: `torchrun --nproc_per_node=N tests/run_many.py PLAN.json`.

Each run is what `torchrun finetune/train.py ARGS` does (finetune.train.main on every rank, in the same
process group), without paying process start and the ColossalAI import once per run. tests/conftest.py's
run_many writes the plan and reads the results: per run and rank, its stdout, its stderr and its exit code
as train.py's cli() would give it (0, 2 for a user error, 3 preempted, 1 otherwise). After a failed run this
rank exits at once: the run may have left a collective half done, so run_many launches the rest anew.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_one(args: list[str], stem: str, rank: str) -> int:
    """One run on this rank with its output in STEM.rankR.out / .err; its exit code, as cli() would give it."""
    from finetune import train

    with open(f"{stem}.rank{rank}.out", "w") as out, open(f"{stem}.rank{rank}.err", "w") as err:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                return train.run_main(args)
            except BaseException:  # noqa: BLE001 - what the interpreter does with it: the traceback, exit code 1
                traceback.print_exc()
                return 1
            finally:
                sys.stdout.flush(), sys.stderr.flush()


def main(plan_file: str) -> None:
    rank = os.environ["RANK"]
    for run in json.loads(Path(plan_file).read_text()):
        code = run_one(run["args"], run["stem"], rank)
        Path(f"{run['stem']}.rank{rank}.rc").write_text(str(code))
        if code:
            os._exit(code)
    from finetune.distributed import destroy_process_groups

    destroy_process_groups()


if __name__ == "__main__":
    main(sys.argv[1])
