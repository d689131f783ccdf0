"""Train any task: the YAML names it (`task: class_cond` or `task: t2i`), the loop is core.trainer's.

    deepspeed --num_gpus 8 --module core.train --config configs/t2i/coco256_mmdit_repa.yaml data.path=/data/coco256/train
    torchrun --nproc_per_node 2 -m core.train --config configs/debug/class_cond_tiny.yaml run.dir=runs/tiny
    python -m core.train --config configs/debug/class_cond_tiny.yaml

class_cond/train.py and t2i/train.py are the same entry point for their own task. A config problem exits with
code 2 and one line naming the key, before anything is built; a preempted run exits 75 after its checkpoint.
"""
import os
import sys

if __package__ in (None, ""):  # run as a file by a launcher: import from the repository root, not core/ (whose
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # logging.py would shadow logging)

import argparse  # noqa: E402
import logging  # noqa: E402

from core.checkpoint import CheckpointSaveError, latest_checkpoint  # noqa: E402
from core.config import ConfigError  # noqa: E402
from core.task import load_task_config, task_names  # noqa: E402
from core.trainer import NonFiniteLossError, train  # noqa: E402


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                epilog="Overrides: section.key=value, e.g. train.lr=2e-4 run.dir=runs/x")
    p.add_argument("--config", required=True, help="YAML preset, e.g. configs/debug/class_cond_tiny.yaml")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p


def main(argv: list[str] | None = None, task: str | None = None) -> int:
    """Parse `--config FILE key=value ...`, then train. `task`: the task an alias entry point trains (a YAML
    without a `task` key is taken for one; a YAML of another task is refused)."""
    what = f"a {task} model" if task else f"the YAML's task ({', '.join(task_names())})"
    args = parser(f"Train {what} with REPA.").parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = None
    try:
        _, cfg = load_task_config(args.config, args.overrides, default_task=task)
        return train(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, CheckpointSaveError) as err:
        print(f"training stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the second Ctrl-C (the first asks for a checkpoint after the step in progress)
        newest = latest_checkpoint(cfg.run.dir) if cfg is not None else None
        print(f"interrupted: stopped at once without a checkpoint; rerunning the same command resumes from the newest "
              f"one ({newest or 'none yet: it starts again'})", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
