"""Experiment trackers (logging.tensorboard, logging.wandb): the metrics.jsonl records as scalars, on rank 0.

RunOutputs hands every record it appends to metrics.jsonl to the Tracker, so a tracker's curves are the
file's numbers: train/<key> for a step's record (loss, lr, grad_norm, tokens_per_s, memory_*), eval/<key>
for an eval's, memory/<stage>/<field> for the profiler's stages at the end of the run.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetune.config import Config

TENSORBOARD_DIR = "tensorboard"
GIB = 1024**3


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as tracker tags: train/* for a step, eval/* for an eval; numbers only, bytes in GiB."""
    tags = {}
    for key, value in record.items():
        if key == "step":
            continue
        if key == "memory" and isinstance(value, dict):
            tags.update({f"train/memory_{k.removesuffix('_bytes')}_gib": v / GIB for k, v in value.items() if _number(v)})
        elif key.startswith("eval_"):
            if _number(value):
                tags[f"eval/{key.removeprefix('eval_')}"] = float(value)
        elif _number(value):
            tags[f"train/{key}"] = float(value)
    return tags


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Tracker:
    """Fans the run's records out to TensorBoard and wandb (each only when switched on). Rank 0 only."""

    def __init__(self, cfg: Config, resume_step: int | None = None) -> None:
        """Open the switched-on trackers; a resumed run drops what a crashed launch logged after its checkpoint."""
        self.tensorboard = self.wandb = None
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides events at or after it from earlier launches, as metrics.jsonl drops those lines.
            purge = resume_step + 1 if resume_step is not None else None
            self.tensorboard = SummaryWriter(str(Path(cfg.output_dir) / TENSORBOARD_DIR), purge_step=purge)
        if cfg.logging.wandb:
            import wandb

            from finetune.config import to_dict

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=cfg.logging.wandb_project, dir=cfg.output_dir, config=to_dict(cfg), name=Path(cfg.output_dir).name)

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record (a step's or an eval's), at its step."""
        self._write(scalars(record), record["step"])

    def log_memory(self, stages: list, step: int) -> None:
        """The profiler's memory stages (start, model_loaded, boosted, ...) in GiB, at the run's last step."""
        from finetune.profiler import stage_dict

        tags = {}
        for stage in stages:
            fields = stage_dict(stage)
            tags.update({f"memory/{fields['name']}/{k.removesuffix('_bytes')}_gib": v / GIB for k, v in fields.items() if k.endswith("_bytes")})
        self._write(tags, step)

    def _write(self, tags: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            for tag, value in tags.items():
                self.tensorboard.add_scalar(tag, value, step)
            self.tensorboard.flush()  # a crashed run's event file still holds every logged line
        if self.wandb is not None and tags:
            self.wandb.log(tags, step=step)

    def close(self) -> None:
        """Flush and close the trackers."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
