"""`accelerate` with the torchvision import fix applied first: `python -m eval.accelerate_cli launch ...`.

On a CPU machine whose registry torchvision is a CUDA build, the plain `accelerate` command dies importing timm
("operator torchvision::nms does not exist", see core/compat.py). This runs the same CLI after the fix; on a
matching CUDA install it is identical to `accelerate`.
"""
import sys

from accelerate.commands.accelerate_cli import main

if __name__ == "__main__":
    sys.exit(main())
