"""Text-to-image: MMDiT (joint text-image attention), the T2I task, its conditioners and generated set, prompt
sampling, the demo and the train entry point."""
import core  # noqa: F401  (core/compat.py's torchvision fix, before any module of this package imports a user of it)
