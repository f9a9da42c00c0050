"""The task registry: `task=` names -> Task classes (see finetune/tasks/base.py for the interface)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.tasks.base import IGNORE_INDEX, DataError, LanguageModelingTask, Task
from finetune.tasks.chat import ChatTask
from finetune.tasks.classification import ClassificationTask
from finetune.tasks.instruction import InstructionTask
from finetune.tasks.preference import PreferenceTask, RewardTask
from finetune.tasks.summarization import SummarizationTask

if TYPE_CHECKING:
    from finetune.config import DataConfig

TASKS: dict[str, type[Task]] = {
    "instruction": InstructionTask,
    "summarization": SummarizationTask,
    "chat": ChatTask,
    "classification": ClassificationTask,
    "preference": PreferenceTask,
    "reward": RewardTask,
}

__all__ = ["IGNORE_INDEX", "TASKS", "DataError", "LanguageModelingTask", "Task", "batch_rows", "build_task"]


def batch_rows(name: str, batch_size: int) -> int:
    """Rows of a batch of `batch_size` samples of task `name` (what a pipeline schedule slices into micro-batches): two
    per preference pair, chosen and rejected side by side (finetune.data.collate); one otherwise."""
    task = TASKS.get(name)
    return batch_size * (task.sequences_per_sample if task is not None else 1)


def build_task(name: str, cfg_data: "DataConfig", labels: list[str] | tuple[str, ...] = ()) -> Task:
    """The task for `task=name`, set up from the data config (classification: field names and label set)."""
    task = TASKS[name].from_config(cfg_data)
    return task.with_labels(list(labels)) if labels else task
