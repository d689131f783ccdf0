"""Train a class-conditional SiT/DiT (+REPA): core.train for configs of the class_cond task.

    deepspeed --num_gpus 8 class_cond/train.py --config configs/class_cond/sit_xl2_repa_in256.yaml
    torchrun --nproc_per_node 2 class_cond/train.py --config configs/debug/class_cond_tiny.yaml run.dir=runs/tiny
    python -m class_cond.train --config configs/debug/class_cond_tiny.yaml
"""
import os
import sys

if __package__ in (None, ""):  # run as a file by a launcher: import from the repository root, not class_cond/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from core.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(task="class_cond"))
