"""Sample a text-to-image run: prompts -> images with the ODE or SDE sampler and classifier-free guidance.

    python -m t2i.sample --run runs/coco --prompt "a red circle above a blue square" --sampler ode --steps 50 \
        --cfg 2.0 --out grid.png
    python -m t2i.sample --run runs/coco --prompt-file prompts.txt --sampler sde --steps 250 --out grid.png

Captions are encoded with the text encoder the run's data was prepared with (recorded in its checkpoints); the
empty caption is the null condition. The images come from eval.generate's Generator with the prompts as its
conditions (t2i.evaluation.PromptConditioner): the same seeding (sample i from (seed, i)), samplers and decode as
every other generation.
"""
import argparse
import sys

import numpy as np
import torch

from core.text_encoders import load_text_encoder
from eval.generate import Generator, caption_grid, exit_on_user_error
from eval.loading import load_eval_model, objective_config
from t2i.evaluation import PromptConditioner


def sample_images(model, meta: dict, contexts: torch.Tensor, null_context: torch.Tensor, sampler: str = "ode",
                  steps: int = 50, cfg: float = 1.0, interval: tuple[float, float] = (0.0, 1.0), seed: int = 0,
                  heun: bool = False, batch_size: int = 64, vae: str | None = None) -> np.ndarray:
    """uint8 images (N, H, W, 3) of `model` (record `meta`) for caption embeddings `contexts` (N, L, D), with
    `null_context` (L, D) the empty caption's; sample i's noise comes from (seed, i) (eval.generate)."""
    objective = objective_config(meta)
    if objective.kind != "transport":  # the ODE/SDE here integrate a velocity; DDPM models sample with eval.generate
        raise ValueError(f"t2i.sample draws from transport (velocity) models; this one was trained with "
                         f"objective.kind={objective.kind!r}")
    if sampler not in ("ode", "sde"):
        raise ValueError(f"sampler {sampler!r} is not one of: ode, sde")
    gen = Generator(model, meta, sampler, steps, heun, cfg, interval, seed=seed, vae=vae,
                    conditioner=PromptConditioner(contexts, null_context))
    out = [gen.images(range(start, min(start + batch_size, len(contexts))))
           for start in range(0, len(contexts), batch_size)]
    return torch.cat(out).permute(0, 2, 3, 1).cpu().numpy()


def read_prompts(prompts: list[str], prompt_file: str | None) -> list[str]:
    out = list(prompts)
    if prompt_file:
        with open(prompt_file) as f:
            out += [line.strip() for line in f if line.strip()]
    if not out:
        raise ValueError("no prompts: give --prompt TEXT or a --prompt-file with one non-empty line per prompt")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Text-to-image samples of a run as a captioned PNG grid.")
    p.add_argument("--run", required=True, help="run directory, step_* checkpoint, or exported .safetensors")
    p.add_argument("--prompt", action="append", default=[], help="a caption (repeatable)")
    p.add_argument("--prompt-file", help="a text file with one caption per line")
    p.add_argument("--sampler", choices=("ode", "sde"), default="ode")
    p.add_argument("--steps", type=int, default=50, help="NFE 50 for ODE, 250 for SDE in the paper")
    p.add_argument("--heun", action="store_true")
    p.add_argument("--cfg", type=float, default=2.0, help="guidance scale w (App. K: 2.0)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LOW", "HIGH"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-encoder", help="override the run's text encoder spec (core/text_encoders.py)")
    p.add_argument("--vae", help="override the autoencoder (e.g. a local sd-vae-ft-ema path)")
    p.add_argument("--out", required=True, help="PNG grid to write")
    args = p.parse_args(argv)
    try:
        prompts = read_prompts(args.prompt, args.prompt_file)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return exit_on_user_error(sample_grid, args, prompts)


def sample_grid(args, prompts: list[str]) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_eval_model(args.run, device)
    spec = args.text_encoder or meta["data"].get("text_encoder")
    if not spec:
        raise ValueError("the run records no text encoder; pass --text-encoder")
    tokens = meta["data"].get("text_embedding", {}).get("shape", [None])[0]  # the L the model was trained on
    text = load_text_encoder(spec, device, tokens=tokens)
    with torch.no_grad():
        contexts, null = text.encode(prompts).float(), text.encode([""])[0].float()
    images = sample_images(model, meta, contexts, null, args.sampler, args.steps, args.cfg,
                           tuple(args.guidance_interval), args.seed, args.heun, vae=args.vae)
    caption_grid(images, prompts).save(args.out)
    print(f"{len(prompts)} samples ({args.sampler}, {args.steps} steps, cfg {args.cfg}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
