"""Shared machinery: config, the task protocol, layers, objectives, REPA, encoders, latents, data, the trainer,
checkpoints. Importing core applies the torchvision import fix once (every other package imports core first)."""
from core.compat import fix_torchvision_ops

# Before anything imports torchvision (transformers, open_clip, timm and clean-fid all may): see compat.py.
fix_torchvision_ops()
