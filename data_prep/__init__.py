"""Dataset preparation: ImageNet and MS-COCO -> sharded VAE latents, caption embeddings and encoder features
(FORMATS.md). Entry points: python -m data_prep.imagenet, python -m data_prep.coco (or through accelerate launch)."""
import core  # noqa: F401  (the torchvision import fix, before anything imports torchvision)
