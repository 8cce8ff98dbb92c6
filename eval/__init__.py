"""The eval stage: zero-shot accuracy on the eight tasks (or your own), and the text heads.

>>> from clipship.eval import evaluate, get_tasks
>>> report = evaluate("merged/", get_tasks("all"), device="cuda")   # doctest: +SKIP
"""

from clipship.eval.evaluate import evaluate, evaluate_pool
from clipship.runtime.heads import build_heads, load_heads, save_heads
from clipship.runtime.tasks import Task, builtin_tasks, get_tasks, select_tasks, standard_tasks

__all__ = [
    "Task",
    "build_heads",
    "builtin_tasks",
    "evaluate",
    "evaluate_pool",
    "get_tasks",
    "load_heads",
    "save_heads",
    "select_tasks",
    "standard_tasks",
]
