"""Clinical task packs: one module per task, each a `Task` (see `medtune.tasks.base`).

task = get_task("aria")
examples = task.generate_sft(1500, seed=1)
"""

from __future__ import annotations

import difflib
import importlib

from medtune.errors import MedtuneError
from medtune.tasks.base import Task

# name -> "module:Class"; a third task is one module and one line here.
_REGISTRY = {
    "aria": "medtune.tasks.aria:AriaTask",
    "headache": "medtune.tasks.headache:HeadacheTask",
}


def available_tasks() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str) -> Task:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise MedtuneError(f"unknown task {name!r} (known: {', '.join(available_tasks())}){hint}")
    module, _, cls = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["Task", "available_tasks", "get_task"]
