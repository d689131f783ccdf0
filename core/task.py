"""The task: what differs between class-conditional and text-to-image training, behind one protocol.

A task turns a prepared dataset into model inputs. The trainer, the benchmark and evaluation all use the same
object and know nothing else of the task:

    data  = Task.prepare_data(cfg, ctx)      locate the prepared dataset, or generate the tiny one (rank 0)
    task  = Task(cfg, data)                  everything it needs is read here, nothing is filled in later
    kw    = task.model_kwargs(encoder_dims)  the model's constructor arguments, recorded in every checkpoint
    model = Task.build_model(kw)             the same from a checkpoint's record, with no data at hand
    cond  = task.condition(batch, drop)      a batch's model condition, the null condition where `drop`
    cond  = task.random_condition(n, g)      the same fields with random values (benchmark batches)
    task.preview(n)                          fixed conditions of the sample grids shown while training
    Task.conditioner(record, options)        the conditions of sample indices for evaluation (Conditioner)

Tasks are found by name (the YAML's `task:`, the `model.task` of a checkpoint record) among the entry points of
group "repa_train.tasks" (pyproject.toml), so core imports no task: a new task is a class with these members and
one line in pyproject.toml.
"""
import os
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, ClassVar, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from core.config import ConfigError, load_config, parse_overrides, read_yaml
from core.dist import DistContext, barrier

ENTRY_POINT_GROUP = "repa_train.tasks"


@dataclass
class DataInfo:
    """A prepared dataset as the trainer sees it: its directory and manifest (data_prep/FORMATS.md).
    `random`: the shapes of a dataset with nothing to read (core.bench's random batches)."""

    root: str
    manifest: dict
    random: bool = False

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["latent"]["shape"])

    @property
    def scale(self) -> float:
        return float(self.manifest["latent"]["scale_factor"])

    @property
    def shift(self) -> float:
        return float(self.manifest["latent"].get("shift", 0.0))

    @property
    def resolution(self) -> int:
        return int(self.manifest["resolution"])

    def identity(self) -> dict:
        """What eval needs to know of the training data: kind, resolution, text encoder (t2i), classes."""
        keys = ("kind", "resolution", "num_classes", "text_encoder", "text_embedding")
        return {"path": os.path.abspath(self.root), **{k: self.manifest[k] for k in keys if k in self.manifest}}

    def square_latent(self) -> tuple[int, int]:
        """(channels, side) of the dataset's latents; a ConfigError if they are not square."""
        c, h, w = self.latent_shape
        if h != w:
            raise ConfigError(f"latents of {self.root} are {h}x{w}; the models need square latents")
        return c, h


class Conditioner(Protocol):
    """The conditions of generated sample indices. `num_available`: how many distinct conditions exist, or None
    (any number). `protocol` names how sample i's condition is chosen; it is one of generation.json's sampling
    keys, so samples of another protocol are never mixed into one folder (None when it does not apply)."""

    num_available: Optional[int]
    protocol: Optional[str]

    def cond(self, indices: Sequence[int], device: torch.device) -> dict:
        """Keyword tensors for model(x, t, **cond), batch len(indices)."""

    def null(self, cond: dict) -> dict:
        """The null condition for CFG, same keys (batch 1 or the same batch)."""

    def labels(self, indices: Sequence[int]) -> Optional[np.ndarray]:
        """Per-sample labels stored as arr_1 of the ADM .npz, or None."""


class Task(Protocol):
    """What a task supplies (module docstring). Class-level members work from a config or a checkpoint record
    alone; an instance is built from the config and the prepared data."""

    name: ClassVar[str]  # recorded in checkpoints (model.task): which task's build_model reads model.kwargs
    config_class: ClassVar[type]  # the top-level config dataclass, with a `task` key equal to `name`

    @classmethod
    def prepare_data(cls, cfg, ctx: DistContext) -> DataInfo:
        """Locate the prepared dataset (or generate the configured tiny one, on rank 0); a clear error if unusable."""

    @classmethod
    def random_data(cls, cfg, resolution: int, autoencoder: str = "sd-vae") -> DataInfo:
        """The shapes of the configured data at `resolution` px with nothing read (benchmark batches)."""

    @staticmethod
    def build_model(kwargs: dict, grad_checkpointing: bool = False) -> nn.Module:
        """The model from its recorded kwargs; forward(x, t, **condition) -> (output, [projected tokens])."""

    @classmethod
    def conditioner(cls, record: dict, options: dict) -> Conditioner:
        """Evaluation conditions for a checkpoint `record` (state.json / export .json); options from the command
        line (e.g. {"cond_file": ...})."""

    data: DataInfo

    def model_kwargs(self, encoder_dims: list[int]) -> dict:
        """JSON-serialisable constructor arguments of the model (recorded in every checkpoint)."""

    def dataset(self, need_image: bool, feature_names: list[str]):
        """A map-style dataset of dicts with "moments", the condition's fields, and "image" or "feats"."""

    def condition(self, batch: dict, drop: torch.Tensor, device: torch.device) -> dict:
        """Model keyword arguments for `batch`, with the null condition where `drop` (B,) is True."""

    def random_condition(self, n: int, generator: torch.Generator) -> dict:
        """Batch fields of the condition for `n` random samples (host tensors), as `dataset` yields them."""

    def preview(self, n: int) -> tuple[Conditioner, list[str]]:
        """Fixed conditions of an in-training sample grid (up to `n`) and a caption for each."""


def generated_dataset(cfg, ctx: DistContext, manifest: str, make: Callable[[str], None]) -> str:
    """The directory of a task's generated tiny dataset (data.kind=synthetic): run.dir/data. Rank 0 makes it with
    make(directory) unless `manifest` (a path inside it) exists; the other ranks wait for it."""
    root = os.path.join(cfg.run.dir, "data")
    if ctx.is_main and not os.path.isfile(os.path.join(root, manifest)):
        print(f"data: generating the configured tiny dataset in {root}", flush=True)
        make(root)
    barrier()
    return root


def task_names() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def plugin(group: str, name: str, what: str) -> Any:
    """The object registered as `name` among the entry points of `group` (pyproject.toml); ValueError naming
    the registered ones otherwise. `what` names the kind in the message ("task")."""
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    if not found:
        names = sorted(ep.name for ep in entry_points(group=group))
        hint = ("" if names else f" (none are: install the project with `pip install -e .`, which registers the "
                f"{what}s of pyproject.toml)")
        raise ValueError(f"unknown {what} {name!r}; registered {what}s: {', '.join(names)}{hint}")
    return found[0].load()


def get_task(name: str) -> Any:
    """The task class registered as `name`; ValueError listing the registered names otherwise."""
    return plugin(ENTRY_POINT_GROUP, name, "task")


def load_task_config(path: str, overrides: Sequence[str] = (), default_task: str | None = None,
                     check_data: bool = True) -> tuple[Any, Any]:
    """(task class, validated config) for the YAML at `path` with dot-list `overrides`; the task is the config's
    `task` key (an override `task=...` wins), else `default_task`. ConfigError naming what is wrong."""
    named = read_yaml(path).get("task")
    for key, value in parse_overrides(list(overrides)):
        if key == "task":
            named = value
    name = named or default_task
    if name is None:
        raise ConfigError(f"{path} names no task: add `task: <name>` ({', '.join(task_names())})")
    if default_task is not None and name != default_task:
        raise ConfigError(f"task: {path} is a {name!r} config, and this entry point trains {default_task!r} "
                          f"models; use `python -m core.train --config {path}`")
    try:
        task = get_task(str(name))
    except ValueError as err:
        raise ConfigError(f"task: {err}") from None
    return task, load_config(task.config_class, path, overrides, check_data=check_data)
