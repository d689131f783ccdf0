"""Frozen target encoders for REPA: patch tokens of a pretrained vision encoder on the clean image (paper Sec. 3).

A spec string names an encoder, "NAME" or "NAME@SOURCE", where SOURCE replaces the default weights (a local
directory or file, a hub id, or an open_clip pretrained tag; "random": the real architecture, random weights,
for throughput benchmarks where no weights can be fetched). `encoder_dim(spec)` gives the token width without
loading anything, so a model's projectors can be built first. The "-tiny" encoders are random-init models of
the same classes as the real ones, for tests and CPU demos.

Position embeddings are resampled once at load time to the encoder's token grid with timm's
`resample_abs_pos_embed` (bicubic, antialiased): the reference implementation's method for DINOv2, MAE and MoCo v3
(16x16 at 256 px, 32x32 at 512 px). Resampling on the fly (transformers' default) gives different embeddings.
DINOv3 encodes positions with RoPE, computed from the input size, so it has nothing to resample.
"""
import contextlib
import os
import pickle
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence, Tuple, Union
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from core.hub import require_weights


@dataclass(frozen=True)
class _Entry:
    family: str  # "dinov2", "dinov3", "mae", "ijepa" (transformers), "clip" (open_clip ViT), "siglip" (open_clip
    # tower over a timm ViT), "mocov3" (timm ViT, weights from the MoCo v3 release's checkpoint file)
    dim: int  # token width D
    arch: Optional[str] = None  # open_clip model name
    source: Optional[str] = None  # default weights (hub id or open_clip tag); None: random init ("-tiny")


# Widths: hidden_size of the facebook/dinov2-* configs, vision_cfg.width of open_clip's bundled configs, and
# embed_dim of timm's vit_base_patch16_siglip_224.
_ENCODERS = {
    "dinov2-s": _Entry("dinov2", 384, source="facebook/dinov2-small"),
    "dinov2-b": _Entry("dinov2", 768, source="facebook/dinov2-base"),
    "dinov2-l": _Entry("dinov2", 1024, source="facebook/dinov2-large"),
    "dinov2-g": _Entry("dinov2", 1536, source="facebook/dinov2-giant"),
    "dinov2-tiny": _Entry("dinov2", 32),
    "clip-b": _Entry("clip", 768, "ViT-B-16", "openai"),
    "clip-l": _Entry("clip", 1024, "ViT-L-14", "openai"),
    "clip-tiny": _Entry("clip", 32, "ViT-B-16"),
    "siglip-b": _Entry("siglip", 768, "ViT-B-16-SigLIP", "webli"),
    "siglip-tiny": _Entry("siglip", 32, "ViT-B-16-SigLIP"),
    "mae-b": _Entry("mae", 768, source="facebook/vit-mae-base"),
    "mae-l": _Entry("mae", 1024, source="facebook/vit-mae-large"),
    "mae-h": _Entry("mae", 1280, source="facebook/vit-mae-huge"),
    "mae-tiny": _Entry("mae", 32),
    "ijepa-h": _Entry("ijepa", 1280, source="facebook/ijepa_vith14_1k"),
    "ijepa-tiny": _Entry("ijepa", 32),
    # MoCo v3: the checkpoint file names of the release (no hub copy); the weights must be given as NAME@FILE
    "mocov3-s": _Entry("mocov3", 384, source="vit-s-300ep.pth.tar"),
    "mocov3-b": _Entry("mocov3", 768, source="vit-b-300ep.pth.tar"),
    "mocov3-tiny": _Entry("mocov3", 32),
    "dinov3-s": _Entry("dinov3", 384, source="facebook/dinov3-vits16-pretrain-lvd1689m"),
    "dinov3-b": _Entry("dinov3", 768, source="facebook/dinov3-vitb16-pretrain-lvd1689m"),
    "dinov3-l": _Entry("dinov3", 1024, source="facebook/dinov3-vitl16-pretrain-lvd1689m"),
    "dinov3-tiny": _Entry("dinov3", 32),
}
ENCODER_NAMES = tuple(_ENCODERS)
RANDOM_SOURCE = "random"  # NAME@random: the real architecture with random weights (benchmarks: same FLOPs, no download)
# The facebook/dinov2-* configs (width, layers, heads, SwiGLU MLP), for NAME@random without the hub.
_DINOV2_ARCH = {"dinov2-s": (384, 12, 6, False), "dinov2-b": (768, 12, 12, False), "dinov2-l": (1024, 24, 16, False),
                "dinov2-g": (1536, 40, 24, True)}
# (width, layers, heads, patch) of the other released encoders (MLP 4x width), for NAME@random and the attention
# table: the hub configs of facebook/vit-mae-*, ijepa_vith14_1k and dinov3-vit*16; MoCo v3's vits.py (ViT-S: 12 heads).
_VIT_ARCH = {"mae-b": (768, 12, 12, 16), "mae-l": (1024, 24, 16, 16), "mae-h": (1280, 32, 16, 14),
             "ijepa-h": (1280, 32, 16, 14), "mocov3-s": (384, 12, 12, 16), "mocov3-b": (768, 12, 12, 16),
             "dinov3-s": (384, 12, 6, 16), "dinov3-b": (768, 12, 12, 16), "dinov3-l": (1024, 24, 16, 16)}
# Families whose attention logits `TargetEncoder.targets` returns (query/key projections hooked; DINOv3's RoPE
# applied to them as its attention does). MoCo v3's timm ViT fuses q, k and v in one layer and is not hooked.
_ATTENTION_FAMILIES = ("dinov2", "dinov3", "mae", "ijepa")
# Families whose class token (after the final norm) `TargetEncoder.targets(..., with_cls=True)` returns (REG).
_CLASS_TOKEN_FAMILIES = ("dinov2", "dinov3", "mae", "mocov3")
# Tokens per side at 256 px for MAE, I-JEPA, MoCo v3 and DINOv3 when no model grid is given: 224 px for patch 14
# (the reference resizes I-JEPA to 224 * res / 256) and 256 px for patch 16 (it feeds MAE and MoCo v3 unresized).
_GRID_AT_256 = 16

# The tiny encoders: width 32, 2 layers, 2 heads, MLP 64, patch 7, built for 28 px (4x4 tokens), seed 0.
_TINY = dict(width=32, layers=2, heads=2, mlp_ratio=2, patch=7, image=28, seed=0)


def parse_encoder_spec(spec: str) -> Tuple[str, Optional[str]]:
    """"NAME" or "NAME@SOURCE" -> (NAME, SOURCE or None); raises ValueError listing the valid names."""
    name, _, source = spec.strip().partition("@")
    name, source = name.strip(), source.strip() or None
    if name not in _ENCODERS:
        raise ValueError(f"unknown encoder {name!r} in spec {spec!r}; valid names: {', '.join(ENCODER_NAMES)}")
    return name, source


def encoder_names(specs: Sequence[str]) -> list[str]:
    """The NAME of each "NAME[@SOURCE]" spec (as stored-feature keys and manifests name encoders)."""
    return [parse_encoder_spec(s)[0] for s in specs]


def random_weights_spec(spec: str) -> str:
    """The spec of the same encoder with random weights: NAME@random, or the spec itself for a -tiny encoder
    (random-init already, it takes no @SOURCE)."""
    name, _ = parse_encoder_spec(spec)
    return spec if _ENCODERS[name].source is None else f"{name}@{RANDOM_SOURCE}"


def encoder_dim(spec: str) -> int:
    """Token width D of an encoder spec, from the table (no weights are loaded)."""
    return _ENCODERS[parse_encoder_spec(spec)[0]].dim


def encoder_has_class_token(spec: str) -> bool:
    """Whether `TargetEncoder.targets(..., with_cls=True)` gives this encoder's class token (REG), from the table."""
    return _ENCODERS[parse_encoder_spec(spec)[0]].family in _CLASS_TOKEN_FAMILIES


def encoder_attention(spec: str) -> Tuple[int, int]:
    """(blocks, heads per block) of an encoder whose attention logits `TargetEncoder.targets` can return (HASTE's
    attention distillation), from the table; ValueError for an encoder that cannot."""
    name, _ = parse_encoder_spec(spec)
    if _ENCODERS[name].family not in _ATTENTION_FAMILIES:
        able = ", ".join(n for n, e in _ENCODERS.items() if e.family in _ATTENTION_FAMILIES)
        raise ValueError(f"encoder {name!r} cannot give its attention logits: attention distillation takes a DINOv2 "
                         f"encoder or another whose attention can be read ({able})")
    if name in _DINOV2_ARCH:
        _, layers, heads, _ = _DINOV2_ARCH[name]
        return layers, heads
    if name in _VIT_ARCH:
        _, layers, heads, _ = _VIT_ARCH[name]
        return layers, heads
    return _TINY["layers"], _TINY["heads"]


class TargetEncoder(nn.Module):
    """A frozen vision encoder whose patch tokens are REPA's alignment targets.

    Subclasses wrap one library model (`self.model`); they fit its position embeddings to the token grid
    (`_fit_grid`) and return its patch tokens on preprocessed pixels (`_tokens`).
    Attributes: name (spec), description, embed_dim (D), patch_size, resolution (image px the encoder serves),
    input_size (encoder px), num_tokens ((input_size/patch_size)^2).

    input_size: patch_size * grid when the model's token grid is given, so each model token has one encoder patch
    whatever the encoder's patch size (224 px for DINOv2 at 256 px with a /2 model, as the reference; 256 px for a
    patch-16 CLIP or SigLIP, whose 224 px input would give 196 patches for 256 tokens); otherwise, with
    `grid_per_256`, patch_size * grid_per_256 * resolution / 256 (grid_per_256 tokens per side at 256 px), else the
    reference's 224 * resolution / 256.
    """

    def __init__(self, name: str, model: nn.Module, embed_dim: int, patch_size: int, resolution: int,
                 mean: Sequence[float], std: Sequence[float], description: Optional[str] = None,
                 grid: Optional[int] = None, grid_per_256: Optional[int] = None):
        super().__init__()
        if grid:
            input_size, rule = patch_size * grid, f"{patch_size} * grid {grid}"
        elif grid_per_256:
            input_size = round(patch_size * grid_per_256 * resolution / 256)
            rule = f"{patch_size * grid_per_256} * {resolution} / 256"
        else:
            input_size, rule = round(224 * resolution / 256), f"224 * {resolution} / 256"
        if input_size % patch_size:
            raise ValueError(f"encoder {name!r}: input size {input_size} px ({rule}) is not divisible by its patch "
                             f"size {patch_size}")
        self.name, self.description = name, description or name
        self.embed_dim, self.patch_size, self.resolution = int(embed_dim), int(patch_size), resolution
        self.input_size = input_size
        self.grid = input_size // patch_size
        self.num_tokens = self.grid**2
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self.model = model
        with torch.no_grad():
            self._fit_grid()
        self.requires_grad_(False)
        self.train(False)

    def _fit_grid(self) -> None:
        raise NotImplementedError

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def train(self, mode: bool = True) -> "TargetEncoder":
        """Always eval: the encoder is frozen, whatever a parent module asks."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) uint8 or float in 0..255 -> (B, 3, input_size, input_size) float32.

        The reference order: x / 255, normalise with the encoder's mean/std, then bicubic resize.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"encoder {self.name!r}: expected images (B, 3, H, W), got {tuple(images.shape)}")
        x = images.float() / 255.0
        x = (x - self.mean.float().view(1, 3, 1, 1)) / self.std.float().view(1, 3, 1, 1)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False)
        return x

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in 0..255 -> (B, num_tokens, embed_dim) float32 patch tokens (no CLS/registers)."""
        return self._run(self._tokens, images)

    @torch.no_grad()
    def targets(self, images: torch.Tensor, attn_blocks: Sequence[int] = (),
                with_cls: bool = False) -> Tuple[torch.Tensor, list, Optional[torch.Tensor]]:
        """images: (B, 3, H, W) in 0..255 -> (the patch tokens of forward; one float32 (B, heads, num_tokens,
        num_tokens) tensor of attention logits q k^T / sqrt(head_dim) per 1-indexed block of `attn_blocks`, the
        prefix (CLS) rows and columns dropped (HASTE); with `with_cls` the class token after the final norm (B, D),
        else None (REG)). All come from one forward."""
        if with_cls and not encoder_has_class_token(self.name):
            raise ValueError(f"encoder {self.name!r} gives no class token, and REG needs one: take an encoder with a "
                             f"CLS token (DINOv2, DINOv3, MAE, MoCo v3)")
        if not attn_blocks and not with_cls:
            return self(images), [], None
        return self._run(lambda x: self._all_targets(x, tuple(attn_blocks)), images)

    def _all_targets(self, x: torch.Tensor, blocks: tuple) -> Tuple[torch.Tensor, list, torch.Tensor]:
        raise ValueError(f"encoder {self.name!r} cannot give its attention logits or class token (attention "
                         f"distillation takes a DINOv2, DINOv3, MAE or I-JEPA encoder, REG one of these but I-JEPA)")

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in 0..255 -> (B, embed_dim) float32, one vector per image: the encoder's image
        embedding (DINOv2: the CLS token after the final norm, the feature of FD-DINOv2, Stein et al. 2023), else
        the mean patch token."""
        return self._run(self._embedding, images)

    def _embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self._tokens(x).mean(1)

    def _run(self, fn, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        x = x.to(next(self.model.parameters()).dtype)
        on_cuda = x.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext():
            with torch.inference_mode():  # no autograd bookkeeping at all (version counters, views) for the frozen net
                out = fn(x)
        # float32 copies made outside inference mode: normal tensors, which the alignment losses' backward may save
        fp32 = lambda t: t.to(torch.float32, copy=True)  # noqa: E731
        if isinstance(out, tuple):  # (tokens, [attention logits], class token or None)
            return fp32(out[0]), [fp32(a) for a in out[1]], None if out[2] is None else fp32(out[2])
        return fp32(out)

    def extra_repr(self) -> str:
        return (f"name={self.description!r}, input_size={self.input_size}, patch_size={self.patch_size}, "
                f"num_tokens={self.num_tokens}, embed_dim={self.embed_dim}")


class DinoV2Encoder(TargetEncoder):
    """transformers Dinov2Model; tokens = last_hidden_state[:, 1:] (after the final layernorm, the reference's
    x_norm_patchtokens)."""

    def _fit_grid(self) -> None:
        emb = self.model.embeddings
        emb.position_embeddings = _resampled(emb.position_embeddings, self.grid, num_prefix_tokens=1)
        self.model.config.image_size = self.input_size

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).last_hidden_state[:, 1:]

    def _embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).last_hidden_state[:, 0]

    def _all_targets(self, x: torch.Tensor, blocks: tuple) -> Tuple[torch.Tensor, list, torch.Tensor]:
        """Forward hooks on the query and key projections of the requested blocks catch q and k (DINOv2 has no
        q/k norm), so the attention implementation the model runs (SDPA, eager) does not matter."""
        hidden, logits = _attention_logits(lambda: self.model(pixel_values=x).last_hidden_state,
                                           self.model.encoder.layer, blocks, self.model.config.num_attention_heads,
                                           prefix=1, name=self.name)
        return hidden[:, 1:], logits, hidden[:, 0]


class OpenClipViTEncoder(TargetEncoder):
    """open_clip VisionTransformer; tokens = output of the last transformer block without the CLS token and
    before ln_post, as the reference's CLIP wrapper (open_clip's output_tokens=True would apply ln_post)."""

    def _fit_grid(self) -> None:
        visual = self.model
        visual.positional_embedding = _resampled(visual.positional_embedding, self.grid, num_prefix_tokens=1)
        visual.grid_size = (self.grid, self.grid)
        visual.image_size = (self.input_size, self.input_size)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_intermediates(x, indices=1, intermediates_only=True, output_fmt="NLC")
        return out["image_intermediates"][0]


class OpenClipTimmEncoder(TargetEncoder):
    """open_clip TimmModel (SigLIP); tokens = trunk.forward_features (after the trunk's final norm) without the
    trunk's prefix tokens (none for SigLIP, which pools with attention)."""

    def _fit_grid(self) -> None:
        self.model.set_input_size((self.input_size, self.input_size))  # timm resamples pos_embed the same way

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        trunk = self.model.trunk
        return trunk.forward_features(x)[:, trunk.num_prefix_tokens:]


class _TransformersViTEncoder(TargetEncoder):
    """A transformers ViT (MAE, I-JEPA, DINOv3) whose `_forward` gives (patch tokens, class token or None) and
    whose blocks (`_layers`) have q_proj/k_proj projections: `targets` reads attention logits from those."""
    num_prefix = 1  # leading non-patch tokens (CLS, registers) in the model's sequence

    def _forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError

    def _layers(self) -> nn.ModuleList:
        return self.model.layers

    def _rotate(self, x: torch.Tensor) -> Optional[Callable]:
        """None, or (q, k) -> (q, k): a position encoding the attention applies after the projections."""
        return None

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)[0]

    def _all_targets(self, x: torch.Tensor, blocks: tuple) -> Tuple[torch.Tensor, list, Optional[torch.Tensor]]:
        rotate = self._rotate(x) if blocks else None
        (tokens, cls), logits = _attention_logits(lambda: self._forward(x), self._layers(), blocks,
                                                  self.model.config.num_attention_heads, self.num_prefix, self.name,
                                                  rotate)
        return tokens, logits, cls


class MaeEncoder(_TransformersViTEncoder):
    """transformers ViTMAEModel with masking off: mask ratio 0 and a noise that sorts to raster order, so no token
    is dropped or moved. Tokens = output of the last block without the CLS token, before the final layernorm (the
    reference's MAE ViT skips that norm); the class token is taken after it."""

    def _fit_grid(self) -> None:
        _fit_hf_position_embeddings(self.model, self.grid, self.input_size, num_prefix_tokens=1)
        self.model.config.mask_ratio = 0.0

    def _forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # MAE shuffles patches by argsort(noise) before its blocks; an increasing noise keeps their order
        noise = torch.arange(self.num_tokens, device=x.device, dtype=torch.float32).expand(x.shape[0], -1)
        out = self.model(pixel_values=x, noise=noise, output_hidden_states=True)
        return out.hidden_states[-1][:, 1:], out.last_hidden_state[:, 0]


class IJepaEncoder(_TransformersViTEncoder):
    """transformers IJepaModel; tokens = last_hidden_state (after the final layernorm, as the reference's I-JEPA
    encoder). I-JEPA has no class token."""
    num_prefix = 0

    def _fit_grid(self) -> None:
        _fit_hf_position_embeddings(self.model, self.grid, self.input_size, num_prefix_tokens=0)

    def _forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return self.model(pixel_values=x).last_hidden_state, None


class DinoV3Encoder(_TransformersViTEncoder):
    """transformers DINOv3ViTModel; tokens = last_hidden_state after the CLS and register tokens (after the final
    norm), class token = last_hidden_state[:, 0]. RoPE positions follow the input size: nothing to resample."""

    @property
    def num_prefix(self) -> int:
        return 1 + self.model.config.num_register_tokens

    def _fit_grid(self) -> None:
        self.model.config.image_size = self.input_size

    def _layers(self) -> nn.ModuleList:
        return self.model.model.layer

    def _forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(pixel_values=x).last_hidden_state
        return hidden[:, self.num_prefix:], hidden[:, 0]

    def _rotate(self, x: torch.Tensor) -> Callable:
        """The RoPE rotation DINOv3's attention applies to the patch tokens' q and k (cos, sin: a function of the
        input size alone, the encoder being in eval mode)."""
        # heavy (transformers): imported only when attention logits are asked for
        from transformers.models.dinov3_vit.modeling_dinov3_vit import apply_rotary_pos_emb

        cos, sin = self.model.rope_embeddings(x.to(self.model.embeddings.patch_embeddings.weight.dtype))
        return lambda q, k: apply_rotary_pos_emb(q, k, cos, sin)


class MocoV3Encoder(TargetEncoder):
    """timm VisionTransformer with the MoCo v3 base encoder's weights; tokens = forward_features (after the final
    norm) without the CLS token, as the reference; class token = forward_features[:, 0]."""

    def _fit_grid(self) -> None:
        self.model.set_input_size((self.input_size, self.input_size))  # resample_abs_pos_embed, as the reference

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)[:, self.model.num_prefix_tokens:]

    def _all_targets(self, x: torch.Tensor, blocks: tuple) -> Tuple[torch.Tensor, list, torch.Tensor]:
        if blocks:
            raise ValueError(f"encoder {self.name!r} cannot give its attention logits (timm fuses its q, k, v "
                             f"projections): attention distillation takes a DINOv2, DINOv3, MAE or I-JEPA encoder")
        hidden = self.model.forward_features(x)
        return hidden[:, self.model.num_prefix_tokens:], [], hidden[:, 0]


def load_encoder(spec: str, resolution: int, device: Union[str, torch.device] = "cpu",
                 grid: Optional[int] = None) -> TargetEncoder:
    """Build the frozen encoder named by `spec` for images of `resolution` px, in eval mode on `device`; with
    `grid` (the model's tokens per side) its input is sized to give grid x grid patches."""
    name, source = parse_encoder_spec(spec)
    entry = _ENCODERS[name]
    if entry.source is None and source is not None:
        raise ValueError(f"encoder {name!r} is random-init and takes no @SOURCE (got {source!r})")
    build = {"dinov2": _build_dinov2, "clip": _build_clip, "siglip": _build_siglip, "mae": _build_transformers_vit,
             "ijepa": _build_transformers_vit, "dinov3": _build_transformers_vit, "mocov3": _build_mocov3}[entry.family]
    encoder = build(spec, entry, source or entry.source, resolution, grid)
    if encoder.embed_dim != entry.dim:
        raise ValueError(
            f"encoder {spec!r} has token width {encoder.embed_dim} but {name!r} is {entry.dim} wide; "
            f"the weights at {source!r} are not a {name} model"
        )
    return encoder.to(device)


def load_encoders(specs: Union[str, Sequence[str]], resolution: int,
                  device: Union[str, torch.device] = "cpu", grid: Optional[int] = None) -> list:
    """load_encoder for each spec (a single string is one spec) -> list[TargetEncoder]."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    return [load_encoder(spec, resolution, device, grid) for spec in specs]


def _build_dinov2(spec: str, entry: _Entry, source: Optional[str], resolution: int,
                 grid: Optional[int]) -> TargetEncoder:
    # heavy (transformers): imported only when this model is built
    from transformers import Dinov2Config, Dinov2Model
    from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if source is None:
        config = Dinov2Config(
            hidden_size=_TINY["width"], num_hidden_layers=_TINY["layers"], num_attention_heads=_TINY["heads"],
            mlp_ratio=_TINY["mlp_ratio"], patch_size=_TINY["patch"], image_size=_TINY["image"],
        )
        with _seeded(_TINY["seed"]):
            model, description = Dinov2Model(config), f"{spec} (random init)"
    elif source == RANDOM_SOURCE:
        width, layers, heads, swiglu = _DINOV2_ARCH[parse_encoder_spec(spec)[0]]
        config = Dinov2Config(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                              use_swiglu_ffn=swiglu, patch_size=14, image_size=518)
        with _seeded(0):
            model, description = Dinov2Model(config), f"{spec} (random weights, real architecture)"
    else:
        model, description = _from_pretrained(spec, Dinov2Model, source, "DINOv2"), f"{spec} ({source})"
    patch = model.config.patch_size
    patch = patch if isinstance(patch, int) else patch[0]
    return DinoV2Encoder(spec, model, model.config.hidden_size, patch, resolution,
                         IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, description, grid)


def _from_pretrained(spec: str, model_cls, source: str, what: str) -> nn.Module:
    """`model_cls.from_pretrained(source)` in float32, failing at once with the fix when the weights are missing."""
    _check_local_path(spec, source)
    name = parse_encoder_spec(spec)[0]
    require_weights(source, f"encoder {spec!r}: its weights", f"name the copy as {name}@DIR (repa.encoders, "
                    "data_prep --features, eval.representation --encoder)")
    try:
        return model_cls.from_pretrained(os.path.expanduser(source), dtype=torch.float32)
    except OSError as e:
        raise OSError(f"encoder {spec!r}: cannot load {what} weights from {source!r}: {e}") from e


def _build_transformers_vit(spec: str, entry: _Entry, source: Optional[str], resolution: int,
                            grid: Optional[int]) -> TargetEncoder:
    """MAE (ViTMAEModel), I-JEPA (IJepaModel) or DINOv3 (DINOv3ViTModel), all with ImageNet mean/std."""
    # heavy (transformers): imported only when this model is built
    from transformers import DINOv3ViTConfig, DINOv3ViTModel, IJepaConfig, IJepaModel, ViTMAEConfig, ViTMAEModel
    from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    config_cls, model_cls, encoder_cls, what, extra = {
        "mae": (ViTMAEConfig, ViTMAEModel, MaeEncoder, "MAE", dict(mask_ratio=0.0)),
        "ijepa": (IJepaConfig, IJepaModel, IJepaEncoder, "I-JEPA", {}),
        # the released DINOv3 ViT-S/B/L: 4 registers, no key bias, layer scale (value irrelevant to the shapes)
        "dinov3": (DINOv3ViTConfig, DINOv3ViTModel, DinoV3Encoder, "DINOv3",
                   dict(num_register_tokens=4, key_bias=False, layerscale_value=1e-5)),
    }[entry.family]
    name = parse_encoder_spec(spec)[0]
    if source is None or source == RANDOM_SOURCE:
        if source is None:
            width, layers, heads, patch = _TINY["width"], _TINY["layers"], _TINY["heads"], _TINY["patch"]
            mlp, image, seed, description = _TINY["mlp_ratio"], _TINY["image"], _TINY["seed"], f"{spec} (random init)"
        else:
            width, layers, heads, patch = _VIT_ARCH[name]
            mlp, image, seed, description = 4, 224, 0, f"{spec} (random weights, real architecture)"
        config = config_cls(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=mlp * width, patch_size=patch, image_size=image, **extra)
        with _seeded(seed):
            model = model_cls(config)
    else:
        model, description = _from_pretrained(spec, model_cls, source, what), f"{spec} ({source})"
    patch = model.config.patch_size
    patch = patch if isinstance(patch, int) else patch[0]
    return encoder_cls(spec, model, model.config.hidden_size, patch, resolution, IMAGENET_DEFAULT_MEAN,
                       IMAGENET_DEFAULT_STD, description, grid, _grid_per_256(source, patch))


def _build_mocov3(spec: str, entry: _Entry, source: Optional[str], resolution: int,
                  grid: Optional[int]) -> TargetEncoder:
    """A timm ViT in MoCo v3's layout (qkv bias, LayerNorm eps 1e-6, no head) with ImageNet mean/std; the weights
    from the release's checkpoint file, which must be given as NAME@FILE."""
    # heavy (timm): imported only when this model is built
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.models.vision_transformer import VisionTransformer

    name, given = parse_encoder_spec(spec)
    if source is None:
        with _seeded(_TINY["seed"]):
            model = VisionTransformer(img_size=_TINY["image"], patch_size=_TINY["patch"], embed_dim=_TINY["width"],
                                      depth=_TINY["layers"], num_heads=_TINY["heads"], mlp_ratio=_TINY["mlp_ratio"],
                                      num_classes=0)
        description = f"{spec} (random init)"
    else:
        url = f"https://dl.fbaipublicfiles.com/moco-v3/{entry.source.removesuffix('.pth.tar')}/{entry.source}"
        if given is None:
            raise FileNotFoundError(
                f"encoder {spec!r} takes the MoCo v3 release's checkpoint as a local file: download {entry.source} "
                f"({url}, listed in github.com/facebookresearch/moco-v3) and pass {name}@/path/to/{entry.source} "
                f"(repa.encoders, data_prep --features, eval.representation --encoder), or {name}@{RANDOM_SOURCE} "
                "for random weights")
        state = None if source == RANDOM_SOURCE else _read_mocov3(spec, source, url)  # before a model is built
        width, layers, heads, patch = _VIT_ARCH[name]
        with _seeded(0):  # built at the release's 224 px (14x14 position embeddings), resampled by the encoder
            model = VisionTransformer(img_size=224, patch_size=patch, embed_dim=width, depth=layers, num_heads=heads,
                                      mlp_ratio=4, qkv_bias=True, num_classes=0)
        if state is None:
            description = f"{spec} (random weights, real architecture)"
        else:
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise RuntimeError(f"encoder {spec!r}: cannot load MoCo v3 weights from {source!r}: {e}") from e
            description = f"{spec} ({source})"
    return MocoV3Encoder(spec, model, model.embed_dim, model.patch_embed.patch_size[0], resolution,
                         IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, description, grid,
                         _grid_per_256(source, model.patch_embed.patch_size[0]))


def mocov3_state_dict(checkpoint: dict) -> dict:
    """A MoCo v3 training checkpoint ({"state_dict": {"module.base_encoder.<timm ViT key>": tensor, ...}, ...})
    -> the base encoder's state dict for a timm VisionTransformer without head (the projector MLP that MoCo v3
    puts in `head`, the momentum encoder and the predictor are dropped)."""
    state = checkpoint.get("state_dict", checkpoint)
    prefix = "module.base_encoder."
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not k.startswith(prefix + "head.")}
    if not out:
        raise ValueError(f"not a MoCo v3 checkpoint: no '{prefix}*' keys under 'state_dict' "
                         f"(found e.g. {', '.join(list(state)[:3]) or 'nothing'})")
    return out


def _read_mocov3(spec: str, source: str, url: str) -> dict:
    """The base encoder's state dict from the MoCo v3 checkpoint file `source` (`mocov3_state_dict`)."""
    path = os.path.expanduser(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"encoder {spec!r}: MoCo v3 checkpoint {source!r} is not a file; download it from "
                                f"{url} and pass its path")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        return mocov3_state_dict(checkpoint)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        raise RuntimeError(f"encoder {spec!r}: cannot load MoCo v3 weights from {source!r}: {e}") from e


def _grid_per_256(source: Optional[str], patch: int) -> int:
    """Tokens per side at 256 px: the reference's for a released encoder (16), the other tiny encoders' for a -tiny
    one (224 px / patch 7 = 32)."""
    return 224 // patch if source is None else _GRID_AT_256


def _build_clip(spec: str, entry: _Entry, source: Optional[str], resolution: int,
                 grid: Optional[int]) -> TargetEncoder:
    # heavy (open_clip): imported only when this model is built
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    if source is None:
        cfg = CLIPVisionCfg(width=_TINY["width"], layers=_TINY["layers"], head_width=_TINY["width"] // _TINY["heads"],
                            mlp_ratio=_TINY["mlp_ratio"], patch_size=_TINY["patch"], image_size=_TINY["image"])
        with _seeded(_TINY["seed"]):
            visual = _build_vision_tower(embed_dim=_TINY["width"], vision_cfg=cfg, quick_gelu=True)
        mean, std, description = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, f"{spec} (random init)"
    else:
        visual, mean, std, description = _open_clip_visual(spec, entry, source)
    return OpenClipViTEncoder(spec, visual, visual.transformer.width, visual.patch_size[0], resolution,
                              mean, std, description, grid)


def _build_siglip(spec: str, entry: _Entry, source: Optional[str], resolution: int,
                 grid: Optional[int]) -> TargetEncoder:
    # heavy (open_clip, timm): imported only when this model is built
    import open_clip
    import timm
    from open_clip.constants import INCEPTION_MEAN, INCEPTION_STD
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    if source is None:
        # The ViT-B-16-SigLIP tower config (timm trunk, attention pool, no projection) with a tiny trunk: open_clip
        # passes no size arguments to timm, so they are added to timm.create_model while the tower is built.
        vision_cfg = dict(open_clip.get_model_config(entry.arch)["vision_cfg"], image_size=_TINY["image"])
        tiny_trunk = dict(embed_dim=_TINY["width"], depth=_TINY["layers"], num_heads=_TINY["heads"],
                          mlp_ratio=_TINY["mlp_ratio"], patch_size=_TINY["patch"], img_size=_TINY["image"])
        with _seeded(_TINY["seed"]), mock.patch.object(timm, "create_model", partial(timm.create_model, **tiny_trunk)):
            visual = _build_vision_tower(embed_dim=_TINY["width"], vision_cfg=CLIPVisionCfg(**vision_cfg))
        mean, std, description = INCEPTION_MEAN, INCEPTION_STD, f"{spec} (random init)"
    else:
        visual, mean, std, description = _open_clip_visual(spec, entry, source)
    trunk = visual.trunk
    return OpenClipTimmEncoder(spec, visual, trunk.embed_dim, trunk.patch_embed.patch_size[0], resolution,
                               mean, std, description, grid)


def _open_clip_visual(spec: str, entry: _Entry, source: str):
    """Image tower of open_clip model `entry.arch` with weights from a tag or a local file/directory.

    A local file is assumed to hold the default tag's weights (OpenAI CLIP: QuickGELU; SigLIP: webli).
    Returns (visual, mean, std, description).
    """
    # heavy (open_clip): imported only when this model is built
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    path = os.path.expanduser(source)
    if source == RANDOM_SOURCE:
        pcfg = open_clip.get_pretrained_cfg(entry.arch, entry.source)
        with _seeded(0):
            model = open_clip.create_model(entry.arch, pretrained=None, force_quick_gelu=pcfg.get("quick_gelu", False),
                                           device="cpu")
        return model.visual, pcfg["mean"], pcfg["std"], f"{spec} ({entry.arch}, random weights)"
    if os.path.isdir(path):
        found = [os.path.join(path, f) for f in (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)
                 if os.path.isfile(os.path.join(path, f))]
        if not found:
            raise FileNotFoundError(f"encoder {spec!r}: no {HF_SAFE_WEIGHTS_NAME} or {HF_WEIGHTS_NAME} in {source!r}")
        path, tag = found[0], entry.source
    elif os.path.isfile(path):
        tag = entry.source
    else:
        _check_local_path(spec, source)
        tags = open_clip.list_pretrained_tags_by_model(entry.arch)
        if source not in tags:
            raise ValueError(f"encoder {spec!r}: {source!r} is neither a local file nor an open_clip pretrained tag "
                             f"of {entry.arch} ({', '.join(tags)})")
        path = tag = source
    pcfg = open_clip.get_pretrained_cfg(entry.arch, tag)
    try:
        model = open_clip.create_model(entry.arch, pretrained=path, force_quick_gelu=pcfg.get("quick_gelu", False),
                                       require_pretrained=True, device="cpu")
    except RuntimeError as e:
        raise RuntimeError(f"encoder {spec!r}: cannot load open_clip {entry.arch} weights from {source!r}: {e}") from e
    return model.visual, pcfg["mean"], pcfg["std"], f"{spec} ({entry.arch}, {source})"


def _attention_logits(run, layers: nn.ModuleList, blocks: tuple, heads: int, prefix: int, name: str,
                      rotate=None):
    """Run `run()` with forward hooks on the query and key projections (`_query_key`) of the 1-indexed `blocks` of
    `layers` -> (run's result, [(B, heads, N - prefix, N - prefix) logits q k^T / sqrt(head_dim) per block], the
    `prefix` leading tokens' rows and columns dropped). `rotate(q, k)` -> (q, k): a position encoding applied
    after the projections (DINOv3's RoPE). Hooks on the projections make the attention kernel (SDPA, eager)
    irrelevant."""
    caught: dict = {}
    handles = []
    for block in blocks:
        if not 1 <= block <= len(layers):
            raise ValueError(f"encoder {name!r} has blocks 1..{len(layers)}, not {block}")
        for kind, module in zip("qk", _query_key(layers[block - 1])):
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, key=(block, kind): caught.__setitem__(key, out)))
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    logits = []
    for block in blocks:
        q, k = (caught[(block, kind)] for kind in "qk")
        B, N, D = q.shape
        q, k = (t.reshape(B, N, heads, D // heads).transpose(1, 2) for t in (q, k))
        if rotate is not None:
            q, k = rotate(q, k)
        logits.append(((q * (D // heads) ** -0.5) @ k.transpose(-2, -1))[:, :, prefix:, prefix:])
    return result, logits


def _fit_hf_position_embeddings(model: nn.Module, grid: int, input_size: int, num_prefix_tokens: int) -> None:
    """Resample a transformers ViT's absolute position embeddings (MAE, I-JEPA) to grid x grid and set the input
    size its embeddings check against."""
    emb = model.embeddings
    emb.position_embeddings = _resampled(emb.position_embeddings, grid, num_prefix_tokens=num_prefix_tokens)
    emb.image_size = emb.patch_embeddings.image_size = (input_size, input_size)
    emb.patch_embeddings.num_patches = grid**2
    model.config.image_size = input_size


def _query_key(layer: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """The query and key Linear layers of a transformers ViT layer (Dinov2, ViTMAE, IJepa, DINOv3ViT): named
    attention.q_proj/k_proj since transformers 5, attention.attention.query/key before."""
    attn = layer.attention
    if hasattr(attn, "q_proj"):
        return attn.q_proj, attn.k_proj
    return attn.attention.query, attn.attention.key


def _check_local_path(spec: str, source: str) -> None:
    """Fail fast on a local path that does not exist (instead of a hub lookup of a path-like id)."""
    path = os.path.expanduser(source)
    if source.startswith(("/", "./", "../", "~")) and not os.path.exists(path):
        raise FileNotFoundError(f"encoder {spec!r}: weights path {source!r} does not exist")


def _resampled(pos: torch.Tensor, grid: int, num_prefix_tokens: int) -> nn.Parameter:
    """Position embeddings ((1,) N, D) with `num_prefix_tokens` leading non-spatial rows -> a grid x grid copy."""
    # heavy (timm): imported only when an encoder is built
    from timm.layers import resample_abs_pos_embed

    batched = pos.dim() == 3  # transformers/timm store (1, N, D); open_clip stores (N, D)
    new = resample_abs_pos_embed(pos.detach() if batched else pos.detach()[None], [grid, grid],
                                 num_prefix_tokens=num_prefix_tokens)
    return nn.Parameter(new if batched else new[0], requires_grad=False)


@contextlib.contextmanager
def _seeded(seed: int):
    """Run a block under torch.manual_seed(seed) without changing the caller's CPU RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
