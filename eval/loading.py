"""EMA weights for evaluation, from a run directory, a checkpoint directory, or an exported .safetensors file.

Every source yields the same record (`meta`): {"step", "model": {"task", "kwargs"}, "latent": {"autoencoder",
"scale_factor", "shift", "shape"}, "source"}, which is what core.checkpoint writes in state.json and export .json.
"""
import json
import os

import torch
from safetensors.torch import load_file
from torch import nn

from core.checkpoint import latest_checkpoint, read_state
from eval.tasks import get_task


def resolve_weights(source: str) -> tuple[str, dict]:
    """(path of the EMA .safetensors, meta) for a run dir (newest checkpoint, else export/ema.safetensors), a
    step_* checkpoint dir, or a .safetensors file with its .json beside it."""
    if os.path.isdir(source):
        ckpt = source if os.path.isfile(os.path.join(source, "state.json")) else latest_checkpoint(source)
        if ckpt is not None:
            weights, meta = os.path.join(ckpt, "ema.safetensors"), read_state(ckpt)
        elif os.path.isfile(os.path.join(source, "export", "ema.safetensors")):
            return resolve_weights(os.path.join(source, "export", "ema.safetensors"))
        else:
            raise FileNotFoundError(f"{source!r} holds no checkpoint (checkpoints/step_*) and no export/ema.safetensors")
    elif os.path.isfile(source) and source.endswith(".safetensors"):
        weights, meta_path = source, os.path.splitext(source)[0] + ".json"
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{source!r} has no {os.path.basename(meta_path)} beside it (written by "
                                    "`python -m core.checkpoint RUN --out FILE` or eval.import_repa)")
        with open(meta_path) as f:
            meta = json.load(f)
    else:
        raise FileNotFoundError(f"--run {source!r} is neither a directory nor a .safetensors file")
    for key in ("model", "latent"):
        if key not in meta:
            raise ValueError(f"the record of {source!r} has no {key!r} entry (written by an older version); "
                             "re-export it with `python -m core.checkpoint RUN --out FILE`")
    return weights, {"step": meta.get("step"), "model": meta["model"], "latent": meta["latent"],
                     "source": os.path.abspath(source)}


def load_eval_model(source: str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """The model of `source` with its EMA weights (strict), in eval mode on `device`, and its meta record."""
    weights, meta = resolve_weights(source)
    model = get_task(meta["model"]["task"]).build_model(meta["model"]["kwargs"])
    model.load_state_dict(load_file(weights), strict=True)
    return model.to(device).eval().requires_grad_(False), meta
