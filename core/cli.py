"""Command line of the training entry points: `--config FILE key=value ...` (plus the launcher's --local_rank)."""
import argparse
import logging
import sys

from core.config import ConfigError, load_config


def parse_train_args(config_cls: type, argv: list[str] | None, description: str):
    """Parse `--config FILE` and dot-list overrides into a validated config; exits with the message on error."""
    p = argparse.ArgumentParser(description=description,
                                epilog="Overrides: section.key=value, e.g. train.lr=2e-4 run.dir=runs/x")
    p.add_argument("--config", required=True, help="YAML preset, e.g. configs/debug/class_cond_tiny.yaml")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)
    try:
        return load_config(config_cls, args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)


def run_training(config_cls: type, task_cls: type, argv: list[str] | None, description: str) -> int:
    """Parse the command line, then train; config problems exit with code 2 and one clear line."""
    from core.checkpoint import CheckpointSaveError
    from core.trainer import NonFiniteLossError, train

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_train_args(config_cls, argv, description)
    try:
        return train(cfg, task_cls(cfg))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, CheckpointSaveError) as err:
        print(f"training stopped: {err}", file=sys.stderr)
        return 1
