"""EMA weights for evaluation, from a run directory, a checkpoint directory, or an exported .safetensors file.

Every source yields the same record (`meta`): {"step", "model": {"task", "kwargs"}, "latent": {"autoencoder",
"scale_factor", "shift", "shape"}, "data" (the training data's identity), "objective", "source"}, which is what core.checkpoint writes in state.json and
export .json; "objective" is the training config's objective section (config.yaml of a checkpoint, "config" of an
export or import), SiT's transport when a record has none.
"""
import dataclasses
import json
import os

import torch
import yaml
from torch import nn

from core.checkpoint import check_state_dict, latest_checkpoint, load_weights, read_state
from core.config import ObjectiveConfig
from core.task import get_task


def resolve_weights(source: str) -> tuple[str, dict]:
    """(path of the EMA .safetensors, meta) for a run dir (newest checkpoint, else export/ema.safetensors), a
    step_* checkpoint dir, or a .safetensors file with its .json beside it."""
    if os.path.isdir(source):
        ckpt = source if os.path.isfile(os.path.join(source, "state.json")) else latest_checkpoint(source)
        if ckpt is not None:
            weights, meta = os.path.join(ckpt, "ema.safetensors"), read_state(ckpt)
            config_path = os.path.join(ckpt, "config.yaml")
            if os.path.isfile(config_path):
                with open(config_path) as f:
                    meta["config"] = yaml.safe_load(f) or {}
        elif os.path.isfile(os.path.join(source, "export", "ema.safetensors")):
            return resolve_weights(os.path.join(source, "export", "ema.safetensors"))
        else:
            raise FileNotFoundError(f"{source!r} holds no checkpoint (checkpoints/step_*) and no export/ema.safetensors")
    elif os.path.isfile(source) and source.endswith(".safetensors"):
        weights, meta_path = source, os.path.splitext(source)[0] + ".json"
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{source!r} has no {os.path.basename(meta_path)} beside it (written by "
                                    "`python -m core.checkpoint RUN --out FILE` or class_cond.import_repa)")
        with open(meta_path) as f:
            meta = json.load(f)
    else:
        raise FileNotFoundError(f"--run {source!r} is neither a directory nor a .safetensors file")
    for key in ("model", "latent"):
        if key not in meta:
            raise ValueError(f"the record of {source!r} has no {key!r} entry (written by an older version); "
                             "re-export it with `python -m core.checkpoint RUN --out FILE`")
    objective = (meta.get("config") or {}).get("objective") or {}
    return weights, {"step": meta.get("step"), "model": meta["model"], "latent": meta["latent"],
                     "data": meta.get("data", {}), "objective": objective, "source": os.path.abspath(source)}


def objective_config(meta: dict) -> ObjectiveConfig:
    """The ObjectiveConfig a model was trained with, from its record (defaults for keys the record lacks)."""
    record = meta.get("objective") or {}
    valid = {f.name for f in dataclasses.fields(ObjectiveConfig)}
    unknown = sorted(set(record) - valid)
    if unknown:
        raise ValueError(f"the record of {meta.get('source')!r} has objective keys {unknown} this version does not "
                         f"know; valid: {', '.join(sorted(valid))}")
    return ObjectiveConfig(**record)


def load_eval_model(source: str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """The model of `source` with its EMA weights (strict), in eval mode on `device`, and its meta record.

    Weights of another architecture than the record describes are a ValueError naming the first mismatched key
    and both shapes; a truncated weights file is a ValueError naming the file."""
    weights, meta = resolve_weights(source)
    model = get_task(meta["model"]["task"]).build_model(meta["model"]["kwargs"])
    state = load_weights(weights)
    check_state_dict(model.state_dict(), state, weights)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False), meta
