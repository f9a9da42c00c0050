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

__all__ = ["IGNORE_INDEX", "TASKS", "DataError", "LanguageModelingTask", "Task", "build_task"]


def build_task(name: str, cfg_data: "DataConfig", labels: list[str] | tuple[str, ...] = ()) -> Task:
    """The task for `task=name`, set up from the data config (classification: field names and label set)."""
    task = TASKS[name].from_config(cfg_data)
    return task.with_labels(list(labels)) if labels else task
