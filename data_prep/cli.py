"""The command-line options data_prep.imagenet and data_prep.coco share, model building, and the multi-process run.

Processes come from `accelerate launch` (or one plain `python -m` process): accelerate's PartialState gives the
rank, the world size, the device and the barrier before the manifest.
"""
import argparse
import logging
import os
import sys

import torch
from accelerate import PartialState

from core.encoders import encoder_names, load_encoder, parse_encoder_spec
from core.latents import DEFAULT_VAE, build_autoencoder, latent_layout
from core.shards import feature_record
from core.text_encoders import load_text_encoder
from data_prep.images import EXIF_CHOICES
from data_prep.pipeline import Job, Models, PrepError, check_job_record, prepare_rank, reopen_fixed_shards

log = logging.getLogger("data_prep")


def common_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="dataset directory to write (FORMATS.md)")
    p.add_argument("--resolution", type=int, default=256, help="image size in px (the paper: 256 or 512)")
    p.add_argument("--vae", default=DEFAULT_VAE,
                   help="AutoencoderKL hub id or local path, or pixel-s2dF (weight-free, for tests and demos)")
    p.add_argument("--features", nargs="*", default=[], metavar="ENCODER",
                   help="precompute patch tokens of these REPA encoders (core/encoders.py names, NAME[@SOURCE])")
    p.add_argument("--feature-grid", type=int, default=None, metavar="G",
                   help="encoder input sized for G x G patch tokens: the token grid of the model to train, latent "
                        "side / patch size (default: latent side / 2, the /2 models: resolution / 16 with the SD-VAE; "
                        "a /1 model on an f16 VAE such as VA-VAE needs resolution / 16 too)")
    p.add_argument("--store-images", action="store_true",
                   help="also store the cropped uint8 image (needed by a REPA encoder that runs at train time)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder forward")
    p.add_argument("--workers", type=int, default=None,
                   help="image decoding processes per rank (default: the rank's share of the CPU cores, at most 16)")
    p.add_argument("--limit", type=int, default=None, help="use only N inputs, spread evenly (smoke runs)")
    p.add_argument("--exif", choices=EXIF_CHOICES, default="apply",
                   help="apply: turn photos upright by their EXIF Orientation tag (counted as rotated); ignore: "
                        "keep the stored pixel order, as the ADM and U-ViT preprocessing scripts do")
    return p


def spread(items: list, limit) -> list:
    """`limit` items spread evenly over `items` (all of them without a limit)."""
    if limit is None or limit >= len(items):
        return items
    if limit <= 0:
        raise PrepError(f"--limit must be positive, got {limit}")
    return [items[i * len(items) // limit] for i in range(limit)]


def check_common(args) -> None:
    if args.resolution < 8 or args.resolution % 8:
        raise PrepError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.shard_size < 1 or args.batch_size < 1:
        raise PrepError("--shard-size and --batch-size must be positive")
    if getattr(args, "flip", False) and args.shard_size % 2:
        raise PrepError(f"--shard-size must be even with --flip (an image and its flip share a shard), "
                        f"got {args.shard_size}")
    names = [parse_encoder_spec(spec)[0] for spec in args.features]  # ValueError listing the valid names
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PrepError(f"--features names {twice[0]!r} twice: a sample stores one feat_{twice[0]}.npy")
    try:  # the autoencoder's config alone: its downsampling must divide the resolution
        layout = latent_layout(args.vae, args.resolution)
    except ValueError as err:
        raise PrepError(f"--vae {args.vae}: {err}") from None
    if args.feature_grid is None and args.features:
        args.feature_grid = layout["shape"][1] // 2
    if args.feature_grid is not None and args.feature_grid < 1:
        raise PrepError(f"--feature-grid must be positive, got {args.feature_grid}")
    if not args.features and not args.store_images:
        log.warning("neither --store-images nor --features: REPA training on this dataset will have no target "
                    "encoder input (fine for training without REPA)")


def build_models(args, device, text_encoder: str = None, text_tokens: int = None) -> Models:
    models = Models(build_autoencoder(args.vae, device))
    models.encoders = [(name, load_encoder(spec, args.resolution, device, grid=args.feature_grid))
                       for name, spec in zip(encoder_names(args.features), args.features)]
    if text_encoder:
        models.text = load_text_encoder(text_encoder, device, tokens=text_tokens)
    return models


def feature_records(models: Models) -> list[dict]:
    """The manifest's "features": per encoder its spec as given, token count and width (FORMATS.md)."""
    return [feature_record(enc.name, enc.num_tokens, enc.embed_dim) for _, enc in models.encoders]


def job_features(args) -> dict:
    """The job record's encoder options: a rerun with other specs or another grid is refused."""
    return {"features": list(args.features), **({"feature_grid": args.feature_grid} if args.features else {})}


def default_workers(world: int) -> int:
    return max(0, min(16, (os.cpu_count() or 1) // max(1, world) - 1))


def run_job(job: Job, make_models, finish, single_process: bool = False) -> int:
    """Prepare `job` on every process of the launch, then (main process) `finish(job, models)` writes the
    manifest. `make_models(device) -> Models`. `single_process`: do all shards here, ignoring any launcher
    environment (for a caller that is itself one rank of a distributed program). Returns the exit code."""
    if single_process:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        rank, world, is_main, barrier = 0, 1, True, lambda: None
    else:

        # cpu=True when there is no GPU: accelerate then joins the processes with gloo (its default expects CUDA)
        state = PartialState(cpu=not torch.cuda.is_available())
        rank, world, device = state.process_index, state.num_processes, state.device
        is_main, barrier = state.is_main_process, state.wait_for_everyone
        if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # no oversubscription between ranks
    if job.workers is None:
        job.workers = default_workers(world)
    os.makedirs(job.out, exist_ok=True)
    if is_main:
        check_job_record(job, write=True)
        reopen_fixed_shards(job)  # before any process lists its unfinished shards
    barrier()
    check_job_record(job, write=False)
    models = make_models(device)
    log.info("rank %d of %d on %s: %d shards of %d samples in all", rank, world, device, job.num_shards,
             job.shard_size)
    prepare_rank(job, models, rank, world, device, progress=is_main)
    barrier()  # the manifest is written after every process has finished its shards
    if is_main:
        finish(job, models)
    barrier()
    return 0


def main_guard(main, argv=None) -> int:
    """Run `main(argv)`: clear one-line errors (exit code 2) for bad arguments, inputs and earlier runs."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return main(argv)
    except (PrepError, ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
