"""Generate samples, then score them: one command for a checkpoint's FID.

    accelerate launch -m eval.evaluate --run runs/in256 --sampler ode --steps 50 --cfg 1.8 \
        --guidance-interval 0 0.7 --num-samples 50000 --ref VIRTUAL_imagenet256_labeled.npz

Samples go to --out (default: RUN/eval/<settings>/, beside the file for an exported .safetensors); every process
generates its shard, then the main process computes the metrics (eval.fid) into OUT/metrics.json. Rerunning resumes
the generation and recomputes the metrics.
"""
import argparse
import os
from typing import Optional

import torch
from accelerate import PartialState

from eval.fid import add_metric_args, evaluate_samples
from eval.generate import add_generation_args, apply_preset, exit_on_user_error, generate, validate_generation_args


def default_out(args: argparse.Namespace) -> str:
    """RUN/eval/ode50_cfg1.8_0-0.7_n50000_seed0 (settings in the name, so different runs never mix); a precision
    other than fp32 is appended (..._seed0_bf16), so fp32 folders keep the names they had before it was recorded;
    so is a REG class token's guidance scale when given (..._clscfg2.3), and a time shift other than 1 (..._shift0.3)."""
    root = args.run if os.path.isdir(args.run) else os.path.splitext(args.run)[0] + "_eval"
    sampler = f"{args.sampler}{args.steps}" + ("heun" if args.heun else "")
    low, high = args.guidance_interval
    name = f"{sampler}_cfg{args.cfg:g}_{low:g}-{high:g}_n{args.num_samples}_seed{args.seed}"
    if args.precision != "fp32":
        name += f"_{args.precision}"
    if args.cls_cfg is not None:
        name += f"_clscfg{args.cls_cfg:g}"
    if args.time_shift != 1.0:
        name += f"_shift{args.time_shift:g}"
    return os.path.join(root, "eval", name) if os.path.isdir(args.run) else os.path.join(root, name)


def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    p = argparse.ArgumentParser(description="Generate samples (eval.generate), then FID & co. (eval.fid)")
    add_generation_args(p)
    add_metric_args(p)
    p.add_argument("--out", default=None, help="samples directory (default: derived from --run and the settings)")
    apply_preset(p, argv)
    args = p.parse_args(argv)
    validate_generation_args(p, args)
    args.out = args.out or default_out(args)
    exit_on_user_error(generate, args)

    state = PartialState(cpu=not torch.cuda.is_available())
    metrics = exit_on_user_error(evaluate_samples, args, args.out) if state.is_main_process else None
    state.wait_for_everyone()
    return metrics


if __name__ == "__main__":
    main()
