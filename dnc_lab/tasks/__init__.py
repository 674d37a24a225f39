"""Tasks: each generates (inputs, targets, mask) batches on the training device.

``TASKS`` maps a config's ``task.name`` to the task class; each class has a ``Config`` dataclass
(its config keys), ``input_size``, ``output_size`` and ``sample(batch_size, generator, ...)``.
``output_kind`` (default "bits") is "categorical" for a task whose answer is one class per step
(bAbI's words): the training loop then scores it with a softmax; ``length_meaning`` names what
``dnclab eval --lengths`` counts (None: lengths do not apply).
"""

from __future__ import annotations

import torch

from dnc_lab.tasks.base import Batch, Curriculum, TaskConfig
from dnc_lab.tasks.associative_recall import AssociativeRecallTask
from dnc_lab.tasks.babi import BabiTask
from dnc_lab.tasks.copy import CopyTask
from dnc_lab.tasks.key_value import KeyValueTask
from dnc_lab.tasks.priority_sort import PrioritySortTask
from dnc_lab.tasks.repeat_copy import RepeatCopyTask

TASKS = {"copy": CopyTask, "repeat_copy": RepeatCopyTask, "associative_recall": AssociativeRecallTask,
         "priority_sort": PrioritySortTask, "key_value": KeyValueTask, "babi": BabiTask}


def make_task(cfg: TaskConfig, device: torch.device | str = "cpu"):
    """The task named by ``cfg.name``, generating on ``device``."""
    return TASKS[cfg.name](cfg, device)


__all__ = ["TASKS", "Batch", "Curriculum", "TaskConfig", "make_task", "CopyTask", "RepeatCopyTask",
           "AssociativeRecallTask", "PrioritySortTask", "KeyValueTask", "BabiTask"]
