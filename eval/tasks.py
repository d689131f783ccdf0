"""What generation needs to know about a task, keyed by the `model.task` name recorded in checkpoints.

A task says how to rebuild its model from the recorded constructor arguments and how to make the conditions of
sample indices and their null condition for CFG. "class_cond" is built in; another task registers itself with
`register_task(EvalTask(...))` (or by adding a "module:attribute" line to _LAZY, imported only when asked for):

    from eval.tasks import EvalTask, register_task
    register_task(EvalTask("t2i", build_model=build_mmdit, make_conditioner=CaptionConditioner))
"""
import importlib
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from eval.guidance import null_class_labels


class Conditioner(Protocol):
    """Conditions of sample indices. `num_available`: how many distinct samples exist, or None (any number).
    An optional `protocol` string names how sample i's condition is chosen: it is one of generation.json's
    sampling keys, so samples of another protocol are never mixed into one folder (None when absent)."""

    num_available: Optional[int]

    def cond(self, indices: Sequence[int], device: torch.device) -> dict:
        """Keyword tensors for model(x, t, **cond), batch len(indices)."""

    def null(self, cond: dict) -> dict:
        """The null condition for CFG, same keys (batch 1 or the same batch)."""

    def labels(self, indices: Sequence[int]) -> Optional[np.ndarray]:
        """Per-sample labels stored as arr_1 of the ADM .npz, or None."""


@dataclass(frozen=True)
class EvalTask:
    name: str
    build_model: Callable[[dict], nn.Module]  # model.kwargs of state.json -> model
    make_conditioner: Callable[[dict, dict], Conditioner]  # (checkpoint meta, options e.g. {"cond_file": ...})


class ClassConditioner:
    """Class-balanced labels: sample i gets class i % num_classes (50K ImageNet samples = 50 per class)."""

    num_available = None

    def __init__(self, meta: dict, options: dict):
        self.num_classes = int(meta["model"]["kwargs"]["num_classes"])
        if options.get("cond_file"):
            raise ValueError("the class_cond task takes no --cond-file (labels are i % num_classes)")

    def cond(self, indices: Sequence[int], device: torch.device) -> dict:
        return {"y": torch.as_tensor(self.labels(indices), dtype=torch.long, device=device)}

    def null(self, cond: dict) -> dict:
        return null_class_labels(cond["y"], self.num_classes)

    def labels(self, indices: Sequence[int]) -> np.ndarray:
        return np.asarray(indices, dtype=np.int64) % self.num_classes


def _build_sit(kwargs: dict) -> nn.Module:
    from class_cond.models import build_sit

    return build_sit(kwargs)


CLASS_COND = EvalTask("class_cond", build_model=_build_sit, make_conditioner=ClassConditioner)

_TASKS: dict[str, EvalTask] = {}
# name -> "module:attribute" of an EvalTask, imported on first use (t2i registers itself in t2i/evaluation.py)
_LAZY: dict[str, str] = {"class_cond": "eval.tasks:CLASS_COND", "t2i": "t2i.evaluation:T2I_EVAL"}


def register_task(task: EvalTask) -> None:
    """Make `task` available to eval.generate under task.name (a later registration replaces an earlier one)."""
    _TASKS[task.name] = task


def registered_tasks() -> list[str]:
    return sorted(set(_TASKS) | set(_LAZY))


def get_task(name: str) -> EvalTask:
    """The task registered as `name`; an unknown name is a ValueError listing the registered ones."""
    if name not in _TASKS and name in _LAZY:
        module, attr = _LAZY[name].split(":")
        register_task(getattr(importlib.import_module(module), attr))
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r} in the checkpoint's model record; registered tasks: "
                         f"{', '.join(registered_tasks())}")
    return _TASKS[name]
