"""Fault injection for crash tests, driven by the environment variable FINETUNE_FAULT.

    FINETUNE_FAULT=kill_after_step:6      every rank SIGKILLs itself once step 6 (and its checkpoint) is done
    FINETUNE_FAULT=kill_in_checkpoint:6   every rank SIGKILLs itself while checkpoint 6 is half written
    FINETUNE_FAULT=nan_at_step:3          the loss of step 3 becomes NaN (the NaN guard must react)
    FINETUNE_FAULT=reload_mismatch:0      the reload check of final/ sees a probe loss off by 1.0 (the run must fail)
    FINETUNE_FAULT=stall_in_tp:1          rank 1 stops responding before step 1 (under tensor parallelism
                                          rank 0 then waits inside a TP collective until launch.timeout_s);
                                          the launcher's SIGTERM ends the stalled rank
    FINETUNE_FAULT=sigterm_after_step:3   rank 0 sends itself SIGTERM once step 3 is done (preemption)
    FINETUNE_FAULT=slow_tokenize:20       rank 1 takes 20 s longer over its share of the tokenization
    FINETUNE_FAULT=kill_in_generate:1     finetune.generate SIGKILLs itself half-way through writing batch 1 (from 0)

Real kills, not simulated exits: nothing gets to clean up, exactly as when a node dies. Unset, this
module does nothing.
"""

from __future__ import annotations

import os
import signal
import time


class Faults:
    """The faults this process was asked to inject."""

    def __init__(self, spec: str | None = None) -> None:
        spec = os.environ.get("FINETUNE_FAULT", "") if spec is None else spec
        self.points: dict[str, int] = {}
        for item in filter(None, spec.split(",")):
            name, _, step = item.partition(":")
            self.points[name.strip()] = int(step)

    def at(self, name: str, step: int) -> bool:
        """Whether fault `name` is set for this step."""
        return self.points.get(name) == step

    def maybe_kill(self, name: str, step: int) -> None:
        """SIGKILL this process if fault `name` is set for this step."""
        if self.at(name, step):
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_stall(self, name: str, step: int) -> None:
        """On rank 1, stop responding (sleep for an hour) if fault `name` is set for this step; SIGTERM ends it."""
        if self.at(name, step) and os.environ.get("RANK") == "1":
            print(f"fault: rank 1 stalls before step {step}", flush=True)
            # The launcher's SIGTERM, once another rank has failed, ends the stall: the run's preemption handler
            # would only note it, and the launcher would wait out its grace (30 s) before its SIGKILL.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(3600)

    def delay(self, name: str) -> None:
        """On rank 1, sleep the seconds fault `name` gives (slow work that is not a stall)."""
        if name in self.points and os.environ.get("RANK") == "1":
            print(f"fault: rank 1 is slowed by {self.points[name]} s", flush=True)
            time.sleep(self.points[name])

    def maybe_signal(self, name: str, step: int) -> None:
        """Rank 0 sends itself SIGTERM if fault `name` is set for this step: a preemption only one rank hears."""
        if self.at(name, step) and os.environ.get("RANK", "0") == "0":
            os.kill(os.getpid(), signal.SIGTERM)
