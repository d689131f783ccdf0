"""Shared machinery: config, layers, transport, REPA, encoders, latents, trainer, checkpoints."""
from core.compat import fix_torchvision_ops

# Before anything imports torchvision (transformers, open_clip, timm and clean-fid all may): see compat.py.
fix_torchvision_ops()
