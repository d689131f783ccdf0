"""Train a text-to-image MMDiT (+REPA) on MS-COCO through the shared trainer.

    deepspeed --num_gpus 8 t2i/train.py --config configs/t2i/coco256_mmdit_repa.yaml
    deepspeed --num_gpus 2 t2i/train.py --config configs/debug/t2i_tiny.yaml run.dir=runs/t2i_tiny
"""
import os
import sys

if __package__ in (None, ""):  # run as a file by a launcher: import from the repository root, not t2i/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from core.cli import run_training  # noqa: E402

from t2i.task import T2IConfig, T2ITask  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_training(T2IConfig, T2ITask, argv, "Train a text-to-image MMDiT with REPA.")


if __name__ == "__main__":
    sys.exit(main())
