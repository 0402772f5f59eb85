"""Tasks behind one interface (base.Task): the embedded `arith` task and GSM8K, MATH, CommonsenseQA, MBPP.

    get_task(name) -> Task      name in TASKS; an unknown name raises ValueError listing the valid ones
    HarnessError                raised by a code task's verifier when its sandbox could not judge a program
"""

from __future__ import annotations

from minisirev.tasks.arith import Arith
from minisirev.tasks.base import DataError, HarnessError, Task, read_jsonl
from minisirev.tasks.csqa import CommonsenseQA
from minisirev.tasks.gsm8k import GSM8K
from minisirev.tasks.math_task import MATH
from minisirev.tasks.mbpp import MBPP

TASKS = {"arith": Arith, "gsm8k": GSM8K, "math": MATH, "csqa": CommonsenseQA, "mbpp": MBPP}


def get_task(name: str) -> Task:
    """A fresh Task object for `name` ("arith", "gsm8k", "math", "csqa", "mbpp")."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]()


__all__ = ["DataError", "HarnessError", "Task", "TASKS", "get_task", "read_jsonl"]
