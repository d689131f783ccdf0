"""Dataset preparation: ImageNet and MS-COCO -> sharded VAE latents, caption embeddings and encoder features
(FORMATS.md). Entry points: python -m data_prep.imagenet, python -m data_prep.coco (or through accelerate launch)."""
import core  # noqa: F401  (core/compat.py's torchvision fix, before any module of this package imports a user of it)
