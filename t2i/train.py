"""Train a text-to-image MMDiT (+REPA) on MS-COCO: core.train for configs of the t2i task.

    deepspeed --num_gpus 8 t2i/train.py --config configs/t2i/coco256_mmdit_repa.yaml
    deepspeed --num_gpus 2 t2i/train.py --config configs/debug/t2i_tiny.yaml run.dir=runs/t2i_tiny
"""
import os
import sys

if __package__ in (None, ""):  # run as a file by a launcher: import from the repository root, not t2i/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from core.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(task="t2i"))
