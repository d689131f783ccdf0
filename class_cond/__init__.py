"""Class-conditional ImageNet: SiT/DiT models and presets, the task, its generated set, the official-checkpoint
import and the train entry point."""
import core  # noqa: F401  (core/compat.py's torchvision fix, before any module of this package imports a user of it)
