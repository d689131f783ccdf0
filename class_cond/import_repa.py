"""Import an official REPA SiT checkpoint (github.com/sihyun-yu/REPA) or an official DiT checkpoint
(github.com/facebookresearch/DiT) as this project's class-conditional model.

    python -m class_cond.import_repa SiT-XL-2-repa.pt --out weights/sit_xl2_repa.safetensors
    accelerate launch -m eval.generate --run weights/sit_xl2_repa.safetensors --sampler sde --steps 250 ...
    python -m class_cond.import_repa DiT-XL-2-256x256.pt --objective ddpm --model DiT-XL/2 --out weights/dit_xl2.safetensors
    accelerate launch -m eval.generate --run weights/dit_xl2.safetensors --sampler ddpm --steps 250 ...

A DiT checkpoint is the same backbone (same key names) with doubled output channels (learned sigma) and no
projectors; `--objective ddpm` records DiT's diffusion (core/diffusion.py, 1000 linear steps) so generation picks
the DDPM/DDIM samplers, and the model gets DiT's timestep input (the step index), reproducing its outputs.

A reference checkpoint is a `.pt` dict with `model` and `ema` state dicts, an argparse `args` and `steps` (a bare
state dict is accepted too). It is read with torch.load(weights_only=True), argparse.Namespace allowed, so no
arbitrary code runs. The architecture comes from the tensor shapes (hidden size, depth, patch, channels, classes,
projector widths, learned sigma, qk-norm) and from `args` (`model` preset for the head count, `encoder_depth`);
what neither tells is given as an override by our SiT field names, e.g. num_heads=16, repa_depth=8.
Key names and shapes must match ours exactly (both follow timm's ViT naming; the reference's are listed in
tests/data/repa_sit_xl2_keys.txt).

A REG checkpoint (github.com/Martinser/REG: REPA's layout plus a class token, `cls_projectors2`, `wg_norm`,
`final_layer.linear_cls`; tests/data/reg_sit_xl2_keys.txt) imports the same way, as a SiT with reg_dim set from
its token embedding; eval.generate then integrates the token with the latents (--cls-cfg).
"""
import argparse
import json
import math
import os
import pickle
import re
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn

from class_cond.models import SIT_PRESETS, build_sit
from core.checkpoint import check_state_dict
from core.config import ObjectiveConfig, to_dict
from core.latents import DEFAULT_VAE, SD_VAE_SCALE


def read_repa_checkpoint(path: str, use_ema: bool = True) -> tuple[dict, dict, Optional[int]]:
    """(state dict, args as a dict, steps) of a reference checkpoint; `use_ema` picks `ema` over `model`."""
    with torch.serialization.safe_globals([argparse.Namespace]):  # scoped: not left allowed process-wide
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            detail = next((line for line in str(err).splitlines() if "global" in line.lower()), "")
            raise ValueError(f"{path!r} holds Python objects other than tensors and argparse.Namespace; refused "
                             f"(torch.load weights_only=True). {detail}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path!r} holds a {type(ckpt).__name__}, not a checkpoint dict")
    if "ema" in ckpt or "model" in ckpt:
        key = "ema" if use_ema else "model"
        if key not in ckpt:
            raise ValueError(f"{path!r} has no {key!r} state dict (keys: {', '.join(map(str, ckpt))})")
        state, args = ckpt[key], ckpt.get("args")
        args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
        return state, args, ckpt.get("steps")
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):  # a bare (EMA) state dict, e.g. the release's last.pt
        return ckpt, {}, None
    raise ValueError(f"{path!r} is neither a REPA checkpoint (model/ema/args/steps) nor a state dict")


def infer_sit_kwargs(state: dict, args: dict, **overrides) -> dict:
    """SiT constructor arguments from tensor shapes, the checkpoint's args and `overrides` (our field names)."""
    def shape(key):
        if key not in state:
            raise ValueError(f"checkpoint lacks {key!r}: not a REPA SiT state dict")
        return tuple(state[key].shape)

    hidden, in_ch, patch, _ = shape("x_embedder.proj.weight")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    reg_dim = shape("cls_projectors2.weight")[1] if "cls_projectors2.weight" in state else 0  # REG's class token
    grid = math.isqrt(shape("pos_embed")[1] - (1 if reg_dim else 0))  # REG: one position row for the token
    out_ch = shape("final_layer.linear.weight")[0] // patch**2
    projectors = sorted({int(m.group(1)) for k in state if (m := re.match(r"projectors\.(\d+)\.", k))})
    kwargs = {
        "input_size": grid * patch, "patch_size": patch, "in_channels": in_ch, "hidden_size": hidden,
        "depth": depth, "mlp_ratio": shape("blocks.0.mlp.fc1.weight")[0] / hidden,
        "num_classes": shape("y_embedder.embedding_table.weight")[0] - 1,  # the last row is the null class
        "learn_sigma": out_ch == 2 * in_ch,
        "encoder_dims": [shape(f"projectors.{k}.4.weight")[0] for k in projectors],
        "projector_dim": shape("projectors.0.0.weight")[0] if projectors else 2048,
        "qk_norm": "blocks.0.attn.q_norm.weight" in state,
        "repa_depth": int(args.get("encoder_depth", 8)),  # not visible in shapes; the reference's default is 8
    }
    if reg_dim:
        kwargs["reg_dim"] = reg_dim
    preset = _preset_of(args.get("model"))
    if preset is not None and SIT_PRESETS[preset]["hidden_size"] == hidden:
        kwargs["num_heads"] = SIT_PRESETS[preset]["num_heads"]
    unknown = set(overrides) - set(_SIT_FIELDS)
    if unknown:
        raise ValueError(f"unknown model override(s) {sorted(unknown)}; valid: {', '.join(_SIT_FIELDS)}")
    kwargs.update(overrides)
    if "num_heads" not in kwargs:
        raise ValueError(f"cannot tell the number of attention heads (args.model={args.get('model')!r}, hidden size "
                         f"{hidden}): pass num_heads=... (--num-heads)")
    return kwargs


_SIT_FIELDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
               "num_classes", "learn_sigma", "repa_depth", "encoder_dims", "projector_dim", "qk_norm", "reg_dim")


def _preset_of(model_name: Optional[str]) -> Optional[str]:
    """"SiT-XL/2" -> "XL/2" when it is one of our presets."""
    if not model_name:
        return None
    name = model_name.split("-", 1)[1] if model_name.startswith(("SiT-", "DiT-")) else model_name
    return name if name in SIT_PRESETS else None


def check_keys(model: nn.Module, state: dict, source: str = "checkpoint") -> None:
    """Strict match of names and shapes; raises naming the first mismatched key (and both shapes)."""
    check_state_dict(model.state_dict(), state, source, model="our model")


def load_repa_checkpoint(path: str, use_ema: bool = True, **model_overrides) -> nn.Module:
    """Our class-conditional SiT with the weights of a reference REPA checkpoint, in eval mode.

    model(x, t, y) with the reference conventions (t = 1 noise, y = num_classes null) -> (velocity, [zs]).
    model_overrides: SiT fields (num_heads, repa_depth, ...) the checkpoint cannot tell. `model.sit_kwargs` and
    `model.repa_steps` record what was built and the checkpoint's step count.
    """
    model, _, _ = _load(path, use_ema, model_overrides)
    return model


def _load(path: str, use_ema: bool, overrides: dict,
          model_name: Optional[str] = None) -> tuple[nn.Module, dict, dict]:
    state, args, steps = read_repa_checkpoint(path, use_ema)
    if model_name is not None:
        if _preset_of(model_name) is None:
            raise ValueError(f"--model {model_name!r} is not one of our presets (e.g. DiT-XL/2, SiT-L/2, XL/2)")
        args = {**args, "model": model_name}
    kwargs = infer_sit_kwargs(state, args, **overrides)
    model = build_sit(kwargs)
    check_keys(model, state, path)
    model.load_state_dict(state, strict=True)
    model.sit_kwargs, model.repa_steps = kwargs, steps
    return model.eval().requires_grad_(False), kwargs, {"args": args, "steps": steps}


def export_repa(path: str, out: str, use_ema: bool = True, autoencoder: str = DEFAULT_VAE,
                objective: str = "transport", model_name: Optional[str] = None, **overrides) -> str:
    """Write `out` (.safetensors) and its .json in the layout of core.checkpoint.export_ema, for eval.generate.

    objective: "transport" (SiT, REPA) or "ddpm" (DiT: needs learned sigma); recorded as the config's objective
    section with this project's defaults (DiT's 1000 linear steps), a transport's path and time sampling taken from
    the checkpoint's args (path_type, weighting; linear/uniform when absent). model_name: e.g. "DiT-XL/2", the
    preset that tells the head count when the checkpoint has no args (a bare state dict such as DiT-XL-2-256x256.pt).
    """
    if objective not in ("transport", "ddpm"):
        raise ValueError(f"objective {objective!r} is not one of: transport, ddpm")
    model, kwargs, info = _load(path, use_ema, overrides, model_name)
    objective_cfg = _objective_of(objective, info["args"], path)
    if objective == "ddpm" and not kwargs["learn_sigma"]:
        raise ValueError(f"{path!r} predicts {model.out_channels} channels for {model.in_channels}-channel latents: "
                         "the ddpm objective needs learned sigma (doubled output channels)")
    s = model.input_size
    meta = {
        "step": info["steps"],
        "model": {"task": "class_cond", "kwargs": kwargs},
        "latent": {"autoencoder": autoencoder, "scale_factor": SD_VAE_SCALE, "shift": 0.0,
                   "shape": [model.in_channels, s, s]},  # the reference trains on SD-VAE latents x 0.18215
        "config": {"imported_from": os.path.abspath(path), "weights": "ema" if use_ema else "model",
                   "objective": to_dict(objective_cfg),
                   "args": {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
                            for k, v in info["args"].items()}},
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out,
              metadata={"step": str(info["steps"]), "source": os.path.abspath(path)})
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    return out


def _objective_of(kind: str, args: dict, path: str) -> ObjectiveConfig:
    """The ObjectiveConfig of a reference checkpoint: the transport's path (args.path_type, which the SDE sampler's
    score needs) and time sampling (args.weighting) from its train.py args, our defaults where args lack them."""
    if kind != "transport":
        return ObjectiveConfig(kind=kind)
    path_type, weighting = args.get("path_type") or "linear", args.get("weighting") or "uniform"
    if path_type not in ("linear", "cosine"):
        raise ValueError(f"{path!r} was trained with path_type={path_type!r}; supported: linear, cosine")
    if weighting not in ("uniform", "lognormal"):
        raise ValueError(f"{path!r} was trained with weighting={weighting!r}; supported: uniform, lognormal")
    return ObjectiveConfig(kind=kind, path=path_type, time_sampling=weighting)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Convert an official REPA SiT checkpoint for eval.generate")
    p.add_argument("checkpoint", help="the reference .pt (model/ema/args/steps, or a bare state dict)")
    p.add_argument("--out", required=True, help="output .safetensors (a .json with step and model is written beside)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    p.add_argument("--num-heads", type=int, default=None, help="override when args.model does not tell")
    p.add_argument("--repa-depth", type=int, default=None, help="override args.encoder_depth")
    p.add_argument("--vae", default=DEFAULT_VAE, help="autoencoder recorded for decoding (hub id or local path)")
    p.add_argument("--objective", choices=("transport", "ddpm"), default="transport",
                   help="transport: a SiT (REPA release); ddpm: a DiT checkpoint (DDPM/DDIM sampling)")
    p.add_argument("--model", default=None, help="preset name when the checkpoint has no args, e.g. DiT-XL/2")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in (("num_heads", args.num_heads), ("repa_depth", args.repa_depth)) if v is not None}
    try:
        print(export_repa(args.checkpoint, args.out, args.weights == "ema", args.vae, args.objective, args.model,
                          **overrides))
    except ValueError as err:
        raise SystemExit(f"error: {err}")


if __name__ == "__main__":
    main()
