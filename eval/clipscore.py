"""CLIP score of text-to-image samples: how well each image matches its caption, 100 * max(cos(image, text), 0)
between open_clip's image and text embeddings (Hessel et al. 2021 without their 2.5 weight, as torchmetrics'
CLIPScore and the T2I papers report it).

A spec names the model: "ARCH@TAG" (open_clip, e.g. "ViT-L-14@openai"; TAG may be a local weights file), or
"tiny": a random-init two-layer CLIP (seed 0) for tests and offline demos, whose scores are a labelled proxy.
"""
import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.hub import is_local_path

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's


class ClipScorer(nn.Module):
    """score(images uint8 (B, 3, H, W), captions) -> (B,) float32 CLIP scores in [0, 100]; `is_proxy`: the model
    is random-init (the "tiny" spec)."""

    def __init__(self, spec: str, device: torch.device | str = "cpu"):
        super().__init__()
        # heavy (open_clip imports timm and torchvision): only when a CLIP score is asked for
        import open_clip

        self.name, self.is_proxy = spec, spec == "tiny"
        if self.is_proxy:
            model, mean, std, tokenizer = self._tiny(open_clip)
        else:
            arch, _, tag = spec.partition("@")
            if arch not in open_clip.list_models():
                raise ValueError(f"CLIP score model {spec!r}: {arch!r} is not an open_clip model (ARCH@TAG, or tiny)")
            pretrained = tag or "openai"
            if not is_local_path(pretrained) and pretrained not in open_clip.list_pretrained_tags_by_model(arch):
                raise ValueError(f"CLIP score model {spec!r}: {pretrained!r} is neither a local file nor a tag of "
                                 f"{arch} ({', '.join(open_clip.list_pretrained_tags_by_model(arch))})")
            model = open_clip.create_model(arch, pretrained=pretrained, device="cpu")
            cfg = open_clip.get_pretrained_cfg(arch, pretrained) if not is_local_path(pretrained) else {}
            mean, std = cfg.get("mean", OPENAI_MEAN), cfg.get("std", OPENAI_STD)
            tokenizer = open_clip.get_tokenizer(arch)
        self.model, self.tokenizer = model.eval().requires_grad_(False).to(device), tokenizer
        size = model.visual.image_size
        self.size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.to(device)

    @staticmethod
    def _tiny(open_clip):
        """A two-layer, 32-wide CLIP at 28 px with open_clip's bundled tokenizer, seeded: no weights needed."""
        vision = dict(width=32, layers=2, head_width=16, mlp_ratio=2.0, patch_size=7, image_size=28)
        text = dict(width=32, heads=2, layers=2, mlp_ratio=2.0, context_length=77)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text)
        return model, OPENAI_MEAN, OPENAI_STD, open_clip.tokenizer.SimpleTokenizer(context_length=77)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> (B, 3, size, size): the short side resized (bicubic), the centre cropped,
        normalised as the model was trained (open_clip's image transform, on tensors)."""
        x = images.float().to(self.mean.device) / 255.0
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        x = F.interpolate(x, size=(max(self.size, round(h * scale)), max(self.size, round(w * scale))),
                          mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        return (x[..., top:top + self.size, left:left + self.size] - self.mean) / self.std

    @torch.no_grad()
    def score(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        device = self.mean.device
        on_cuda = device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext():
            img = self.model.encode_image(self.preprocess(images), normalize=True).float()
            txt = self.model.encode_text(self.tokenizer(list(captions)).to(device), normalize=True).float()
        return 100.0 * (img * txt).sum(-1).clamp(min=0)
