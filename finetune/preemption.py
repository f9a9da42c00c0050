"""Preemption: SIGTERM or SIGUSR1 (Slurm's --signal) stops a run at a step boundary with a checkpoint.

The handler only sets a flag; after every step all ranks agree (an all-reduce of the flag), so every
rank stops after the same step, writes the checkpoint together, and exits with PREEMPTED_EXIT_CODE.
launch/slurm.sbatch requeues the job on that code, and the requeued job resumes with resume_from=latest.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 3
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised out of the training loop once the preemption checkpoint is written."""

    def __init__(self, step: int, checkpoint) -> None:
        super().__init__(f"preempted: stopped after step {step}, checkpoint {checkpoint}; resume with resume_from=latest")
        self.step = step


class Preemption:
    """Whether a stop signal reached this rank, and the collective decision to stop."""

    def __init__(self) -> None:
        self.requested = False
        for sig in SIGNALS:
            signal.signal(sig, self._request)

    def _request(self, signum, frame) -> None:
        self.requested = True  # the step in flight finishes; fit() decides at its end

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank was signalled (every rank calls this after every step)."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
