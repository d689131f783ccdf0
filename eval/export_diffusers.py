"""Export a run's EMA model to diffusers: `python -m eval.export_diffusers RUN --out DIR`.

class_cond (SiT, and DiT on the DDPM objective) -> DiTTransformer2DModel; t2i (MMDiT) -> SD3Transformer2DModel.
DIR holds, as diffusers lays a pipeline out:

    transformer/    config.json + diffusion_pytorch_model.safetensors (the model's own class, stock diffusers)
    scheduler/      scheduler_config.json: FlowMatchEulerDiscreteScheduler (SiT/MMDiT, linear path, shift 1) or
                    DDPMScheduler (DiT: our betas, learned_range variance, epsilon prediction)
    repa_export.json  what diffusers has no field for: the latent (autoencoder, scale_factor, shift: decode
                    (z - shift) / scale_factor; with "norm": "channel" its channel_stats and multiplier instead:
                    decode z * std / multiplier + mean), the null condition, the time convention and qk_norm

Two things diffusers hard-codes differently, so a model is exact only after `match_reference` (README; diffusers
alone, no import of this project): diffusers' DiT time features use frequencies 10000^(-k/(half-1))
(downscale_freq_shift=1) where DiT/SiT use 10000^(-k/half); and our SiT/MMDiT take t in [0, 1] where diffusers'
flow-matching scheduler hands the model sigma * 1000. Both are attributes of the `Timesteps` modules
(downscale_freq_shift, scale), not config keys. SiT's optional q/k LayerNorm has no DiTTransformer2DModel config key
either: its weights are in the file and `match_reference` attaches them. docs/DIFFUSERS.md says what differs.
"""
import argparse
import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from eval.loading import load_eval_model, objective_config

EXTRAS = "repa_export.json"
FLOW_TIMESTEPS = 1000  # diffusers' flow-matching timesteps are sigma * num_train_timesteps


class ExportError(ValueError):
    """A model this export cannot write as a diffusers model; the message names what and why."""


def _linear(out: dict, prefix: str, sd: dict, src: str, rows: slice = slice(None)) -> None:
    out[f"{prefix}.weight"], out[f"{prefix}.bias"] = sd[f"{src}.weight"][rows], sd[f"{src}.bias"][rows]


def _thirds(dim: int) -> list[slice]:
    return [slice(i * dim, (i + 1) * dim) for i in range(3)]


def _check_mlp(kwargs: dict, what: str) -> None:
    if float(kwargs.get("mlp_ratio", 4.0)) != 4.0:
        raise ExportError(f"mlp_ratio {kwargs['mlp_ratio']}: diffusers' {what} has a fixed 4x feed-forward")


def dit_state_dict(sd: dict, kwargs: dict) -> dict:
    """Our SiT/DiT weights under DiTTransformer2DModel's names. Every block gets its own copy of the timestep and
    label embedders (diffusers gives each block a CombinedTimestepLabelEmbeddings; its final layer reads block 0's).
    The REPA projectors and the fixed pos_embed (diffusers recomputes the same) are left out."""
    dim = kwargs["hidden_size"]
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"]}
    for i in range(kwargs["depth"]):
        b, s = f"transformer_blocks.{i}", f"blocks.{i}"
        _linear(out, f"{b}.norm1.emb.timestep_embedder.linear_1", sd, "t_embedder.mlp.0")
        _linear(out, f"{b}.norm1.emb.timestep_embedder.linear_2", sd, "t_embedder.mlp.2")
        out[f"{b}.norm1.emb.class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
        _linear(out, f"{b}.norm1.linear", sd, f"{s}.adaLN_modulation.1")  # same chunk order (shift, scale, gate) x 2
        for name, rows in zip(("to_q", "to_k", "to_v"), _thirds(dim)):
            _linear(out, f"{b}.attn1.{name}", sd, f"{s}.attn.qkv", rows)
        _linear(out, f"{b}.attn1.to_out.0", sd, f"{s}.attn.proj")
        if kwargs.get("qk_norm"):  # attached by match_reference: DiTTransformer2DModel has no q/k norm key
            _linear(out, f"{b}.attn1.norm_q", sd, f"{s}.attn.q_norm")
            _linear(out, f"{b}.attn1.norm_k", sd, f"{s}.attn.k_norm")
        _linear(out, f"{b}.ff.net.0.proj", sd, f"{s}.mlp.fc1")
        _linear(out, f"{b}.ff.net.2", sd, f"{s}.mlp.fc2")
    _linear(out, "proj_out_1", sd, "final_layer.adaLN_modulation.1")  # (shift, scale) in both
    _linear(out, "proj_out_2", sd, "final_layer.linear")
    return out


def dit_config(kwargs: dict) -> dict:
    """DiTTransformer2DModel's config for our recorded SiT kwargs; ExportError for what it cannot express."""
    if kwargs.get("reg_dim"):
        raise ExportError(f"a REG model (reg_dim={kwargs['reg_dim']}) carries an extra class token in its state; "
                          "DiTTransformer2DModel has no such token, so it cannot be exported")
    switches = [f"{k}={kwargs[k]}" for k, plain in (("norm", "layernorm"), ("mlp", "gelu"), ("rope", False))
                if kwargs.get(k, plain) != plain]
    if switches:
        raise ExportError(f"a model with LightningDiT's {', '.join(switches)} cannot be exported: diffusers' "
                          "DiTTransformer2DModel has LayerNorm, a GELU feed-forward and no rotary embedding")
    _check_mlp(kwargs, "DiTTransformer2DModel")
    channels = kwargs.get("in_channels", 4)
    return {"num_attention_heads": kwargs["num_heads"], "attention_head_dim": kwargs["hidden_size"] // kwargs["num_heads"],
            "in_channels": channels, "out_channels": 2 * channels if kwargs.get("learn_sigma") else channels,
            "num_layers": kwargs["depth"], "sample_size": kwargs["input_size"], "patch_size": kwargs["patch_size"],
            "num_embeds_ada_norm": kwargs["num_classes"], "norm_type": "ada_norm_zero",
            "norm_elementwise_affine": False, "norm_eps": 1e-6, "activation_fn": "gelu-approximate",
            "attention_bias": True}


def _stream(out: dict, sd: dict, src: str, norm: str, attn: dict, ff: str | None, dim: int, qk_norm: bool) -> None:
    """One MMDiT stream (t2i.mmdit.Stream at `src`) onto SD3's names: its adaLN as `norm` (zero: 6 chunks in our
    order; pre-only: diffusers' AdaLayerNormContinuous wants (scale, shift), ours is (shift, scale))."""
    if ff is None:
        w, b = sd[f"{src}.adaLN_modulation.1.weight"], sd[f"{src}.adaLN_modulation.1.bias"]
        out[f"{norm}.linear.weight"] = torch.cat([w[dim:2 * dim], w[:dim]])
        out[f"{norm}.linear.bias"] = torch.cat([b[dim:2 * dim], b[:dim]])
    else:
        _linear(out, f"{norm}.linear", sd, f"{src}.adaLN_modulation.1")
        _linear(out, attn["out"], sd, f"{src}.proj")
        _linear(out, f"{ff}.net.0.proj", sd, f"{src}.mlp.fc1")
        _linear(out, f"{ff}.net.2", sd, f"{src}.mlp.fc2")
    for name, rows in zip(attn["qkv"], _thirds(dim)):
        _linear(out, name, sd, f"{src}.qkv", rows)
    if qk_norm:
        out[f"{attn['norm_q']}.weight"] = sd[f"{src}.q_norm.weight"]
        out[f"{attn['norm_k']}.weight"] = sd[f"{src}.k_norm.weight"]


def sd3_state_dict(sd: dict, kwargs: dict) -> dict:
    """Our MMDiT weights under SD3Transformer2DModel's names. SD3 always adds a pooled-text MLP to the time
    embedding: ours (the mean caption token) where the model has one, else zeros (it then adds nothing)."""
    dim, depth, qk = kwargs["hidden_size"], kwargs["depth"], bool(kwargs.get("qk_norm"))
    text_dim = kwargs.get("text_dim", 768)
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"]}
    _linear(out, "context_embedder", sd, "context_embedder")
    _linear(out, "time_text_embed.timestep_embedder.linear_1", sd, "t_embedder.mlp.0")
    _linear(out, "time_text_embed.timestep_embedder.linear_2", sd, "t_embedder.mlp.2")
    if kwargs.get("pooled_text"):
        _linear(out, "time_text_embed.text_embedder.linear_1", sd, "pooled_embedder.0")
        _linear(out, "time_text_embed.text_embedder.linear_2", sd, "pooled_embedder.2")
    else:
        for name, shape in (("linear_1", (dim, text_dim)), ("linear_2", (dim, dim))):
            out[f"time_text_embed.text_embedder.{name}.weight"] = torch.zeros(shape)
            out[f"time_text_embed.text_embedder.{name}.bias"] = torch.zeros(dim)
    for i in range(depth):
        b, s = f"transformer_blocks.{i}", f"blocks.{i}"
        image = {"qkv": [f"{b}.attn.to_{n}" for n in "qkv"], "out": f"{b}.attn.to_out.0",
                 "norm_q": f"{b}.attn.norm_q", "norm_k": f"{b}.attn.norm_k"}
        text = {"qkv": [f"{b}.attn.add_{n}_proj" for n in "qkv"], "out": f"{b}.attn.to_add_out",
                "norm_q": f"{b}.attn.norm_added_q", "norm_k": f"{b}.attn.norm_added_k"}
        _stream(out, sd, f"{s}.x_block", f"{b}.norm1", image, f"{b}.ff", dim, qk)
        pre_only = i == depth - 1  # SD3's last block is always text pre-only; ours' text output is unused there
        _stream(out, sd, f"{s}.context_block", f"{b}.norm1_context", text, None if pre_only else f"{b}.ff_context",
                dim, qk)
    w, bias = sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"]
    out["norm_out.linear.weight"] = torch.cat([w[dim:], w[:dim]])  # (shift, scale) -> (scale, shift)
    out["norm_out.linear.bias"] = torch.cat([bias[dim:], bias[:dim]])
    _linear(out, "proj_out", sd, "final_layer.linear")
    return out


def sd3_config(kwargs: dict) -> dict:
    """SD3Transformer2DModel's config for our recorded MMDiT kwargs (no pos-embed cropping, no dual attention)."""
    _check_mlp(kwargs, "SD3Transformer2DModel")
    text_dim, channels = kwargs.get("text_dim", 768), kwargs.get("in_channels", 4)
    return {"sample_size": kwargs["input_size"], "patch_size": kwargs["patch_size"], "in_channels": channels,
            "out_channels": channels, "num_layers": kwargs["depth"], "num_attention_heads": kwargs["num_heads"],
            "attention_head_dim": kwargs["hidden_size"] // kwargs["num_heads"], "joint_attention_dim": text_dim,
            "caption_projection_dim": kwargs["hidden_size"], "pooled_projection_dim": text_dim,
            "pos_embed_max_size": None, "dual_attention_layers": [],
            "qk_norm": "rms_norm" if kwargs.get("qk_norm") else None}


def scheduler_config(meta: dict) -> tuple[str, dict]:
    """(diffusers scheduler class name, its config) sampling our objective: flow matching on the linear path
    (sigma = our t, x_t = (1 - sigma) x0 + sigma eps, velocity eps - x0) or DiT's DDPM (core/diffusion.py)."""
    obj = objective_config(meta)
    if obj.kind == "transport":
        if obj.path != "linear":
            raise ExportError(f"objective.path {obj.path!r}: diffusers' flow-matching schedulers integrate the linear "
                              "path only (x_t = (1 - sigma) x0 + sigma eps)")
        return "FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": FLOW_TIMESTEPS, "shift": 1.0}
    if obj.kind == "ddpm":
        steps, scale = obj.diffusion_steps, 1000 / obj.diffusion_steps
        betas = ({"beta_schedule": "linear", "beta_start": scale * 1e-4, "beta_end": scale * 0.02}
                 if obj.beta_schedule == "linear" else {"beta_schedule": "squaredcos_cap_v2"})
        return "DDPMScheduler", {"num_train_timesteps": steps, **betas, "variance_type": "learned_range",
                                 "prediction_type": "epsilon", "clip_sample": False}
    raise ExportError(f"objective.kind {obj.kind!r} has no diffusers scheduler here (transport, ddpm)")


def convert(model: nn.Module, meta: dict) -> tuple[str, dict, dict, dict]:
    """(diffusers model class name, its config, its state dict, the extras record) for a loaded model."""
    task, kwargs = meta["model"]["task"], meta["model"]["kwargs"]
    sd = model.state_dict()
    obj = objective_config(meta)
    flow = obj.kind == "transport"
    if task == "class_cond":
        name, config, weights = "DiTTransformer2DModel", dit_config(kwargs), dit_state_dict(sd, kwargs)
        null = {"class_labels": kwargs["num_classes"]}
    elif task == "t2i":
        if not flow:
            raise ExportError(f"a t2i model on objective {obj.kind!r}: SD3's pipeline samples flow matching only")
        name, config, weights = "SD3Transformer2DModel", sd3_config(kwargs), sd3_state_dict(sd, kwargs)
        null = {"encoder_hidden_states": "the empty caption's text-encoder embedding (the training task's null)"}
    else:
        raise ExportError(f"task {task!r} has no diffusers counterpart here (class_cond, t2i)")
    extras = {"class_name": name, "task": task, "step": meta.get("step"), "latent": meta["latent"],
              "objective": meta.get("objective") or {}, "null_condition": null,
              # what match_reference sets on every Timesteps module (no diffusers config key holds them)
              "timestep_scale": 1.0 / FLOW_TIMESTEPS if flow else 1.0,
              "downscale_freq_shift": 0 if name == "DiTTransformer2DModel" else None,
              "qk_norm": bool(kwargs.get("qk_norm")) and name == "DiTTransformer2DModel",
              "pooled_projections": "context.mean(1)" if kwargs.get("pooled_text") else "ignored (zero weights)"}
    if task == "t2i":
        extras["text_encoder"] = (meta.get("data") or {}).get("text_encoder")
    # clone: the duplicated embedders (and the qkv slices) must not share storage in the safetensors file
    return name, config, {k: v.detach().clone().contiguous() for k, v in weights.items()}, extras


def _write(folder: str, name: str, config: dict, weights: dict, scheduler: tuple[str, dict], extras: dict) -> None:
    """The diffusers layout (module docstring) in `folder`."""
    import diffusers  # heavy (seconds to import): only to stamp the writing version into the configs

    stamp = {"_diffusers_version": diffusers.__version__}
    os.makedirs(os.path.join(folder, "transformer"))
    os.makedirs(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "transformer", "config.json"), "w") as f:
        json.dump({"_class_name": name, **stamp, **config}, f, indent=2)
    save_file(weights, os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": scheduler[0], **stamp, **scheduler[1]}, f, indent=2)
    with open(os.path.join(folder, EXTRAS), "w") as f:
        json.dump(extras, f, indent=2)


def export(source: str, out: str) -> dict:
    """Write `source` (run dir, step_* checkpoint, or .safetensors with its .json) as a diffusers folder `out`.

    Everything is checked before anything is written; the folder is built beside `out` and renamed into place, so
    a failure leaves nothing. Returns the extras record (repa_export.json)."""
    if os.path.exists(out):
        raise FileExistsError(f"--out {out!r} exists; choose a new folder (an export never overwrites)")
    model, meta = load_eval_model(source)
    name, config, weights, extras = convert(model, meta)
    scheduler = scheduler_config(meta)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export_diffusers-", dir=parent)
    try:
        _write(tmp, name, config, weights, scheduler, extras)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return extras


def match_reference(transformer: nn.Module, folder: str) -> nn.Module:
    """Make a loaded exported transformer compute exactly our model (the README's lines, as a function): our time
    features (repa_export.json's timestep_scale and downscale_freq_shift on every Timesteps module) and, for a
    q/k-norm SiT, the LayerNorms diffusers' DiT block lacks, with their exported weights. Returns `transformer`."""
    from diffusers.models.embeddings import Timesteps  # heavy: diffusers only when a diffusers model is at hand

    with open(os.path.join(folder, EXTRAS)) as f:
        extras = json.load(f)
    for module in transformer.modules():
        if isinstance(module, Timesteps):
            module.scale = extras["timestep_scale"]
            if extras["downscale_freq_shift"] is not None:
                module.downscale_freq_shift = extras["downscale_freq_shift"]
    if extras["qk_norm"]:
        head_dim = transformer.config.attention_head_dim
        for block in transformer.transformer_blocks:
            block.attn1.norm_q, block.attn1.norm_k = nn.LayerNorm(head_dim), nn.LayerNorm(head_dim)
        state = load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))
        transformer.load_state_dict(state, strict=True)
    return transformer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a run dir, a step_* checkpoint dir, or an exported .safetensors (with .json)")
    parser.add_argument("--out", required=True, help="the diffusers folder to create (must not exist)")
    args = parser.parse_args(argv)
    try:
        extras = export(args.run, args.out)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        parser.exit(2, f"export_diffusers: {err}\n")
    print(f"wrote {extras['class_name']} (step {extras['step']}) to {args.out}; load it as docs/DIFFUSERS.md shows")


if __name__ == "__main__":
    main()
