"""Evaluation: samplers, classifier-free guidance, distributed generation, FID and friends."""
import core  # noqa: F401  (core/compat.py's torchvision fix, before any module of this package imports a user of it)
