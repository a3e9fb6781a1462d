"""Fine-tuning tasks: `TASKS` maps each `finetune.task` name to its `Task` (see docs/tasks.md).

Importing this package imports every task module, which registers it.
"""

from lm.tasks import chat, classification, regression, text_to_text, token_labels
from lm.tasks.base import TASKS, Task, register, task_for, task_named

__all__ = [
    "TASKS",
    "Task",
    "chat",
    "classification",
    "register",
    "regression",
    "task_for",
    "task_named",
    "text_to_text",
    "token_labels",
]
