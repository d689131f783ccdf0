"""Frozen target encoders for REPA: patch tokens of a pretrained vision encoder on the clean image (paper Sec. 3).

A spec string names an encoder, "NAME" or "NAME@SOURCE", where SOURCE replaces the default weights (a local
directory or file, a hub id, or an open_clip pretrained tag; "random": the real architecture, random weights,
for throughput benchmarks where no weights can be fetched). `encoder_dim(spec)` gives the token width without
loading anything, so a model's projectors can be built first. The "-tiny" encoders are random-init models of
the same classes as the real ones, for tests and CPU demos.

Position embeddings are resampled once at load time to the encoder's token grid with timm's
`resample_abs_pos_embed` (bicubic, antialiased): the reference implementation's method for DINOv2 (16x16 at
256 px, 32x32 at 512 px). Resampling on the fly (transformers' default) gives different embeddings.
"""
import contextlib
import os
from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence, Tuple, Union
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from core.hub import require_weights


@dataclass(frozen=True)
class _Entry:
    family: str  # "dinov2" (transformers), "clip" (open_clip ViT), "siglip" (open_clip tower over a timm ViT)
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
}
ENCODER_NAMES = tuple(_ENCODERS)
RANDOM_SOURCE = "random"  # NAME@random: the real architecture with random weights (benchmarks: same FLOPs, no download)
# The facebook/dinov2-* configs (width, layers, heads, SwiGLU MLP), for NAME@random without the hub.
_DINOV2_ARCH = {"dinov2-s": (384, 12, 6, False), "dinov2-b": (768, 12, 12, False), "dinov2-l": (1024, 24, 16, False),
                "dinov2-g": (1536, 40, 24, True)}

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


def encoder_attention(spec: str) -> Tuple[int, int]:
    """(blocks, heads per block) of an encoder whose attention logits `TargetEncoder.targets` can return (HASTE's
    attention distillation), from the table; ValueError for an encoder that cannot."""
    name, _ = parse_encoder_spec(spec)
    if _ENCODERS[name].family != "dinov2":
        raise ValueError(f"encoder {name!r} cannot give its attention logits: attention distillation takes a DINOv2 "
                         f"encoder ({', '.join(n for n, e in _ENCODERS.items() if e.family == 'dinov2')})")
    if name in _DINOV2_ARCH:
        _, layers, heads, _ = _DINOV2_ARCH[name]
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
    patch-16 CLIP or SigLIP, whose 224 px input would give 196 patches for 256 tokens); otherwise the reference's
    224 * resolution / 256.
    """

    def __init__(self, name: str, model: nn.Module, embed_dim: int, patch_size: int, resolution: int,
                 mean: Sequence[float], std: Sequence[float], description: Optional[str] = None,
                 grid: Optional[int] = None):
        super().__init__()
        input_size = patch_size * grid if grid else round(224 * resolution / 256)
        if input_size % patch_size:
            raise ValueError(
                f"encoder {name!r}: input size {input_size} px (224 * {resolution} / 256) is not divisible by "
                f"its patch size {patch_size}"
            )
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
    def targets(self, images: torch.Tensor, attn_blocks: Sequence[int] = ()) -> Tuple[torch.Tensor, list]:
        """images: (B, 3, H, W) in 0..255 -> (the patch tokens of forward, one float32 (B, heads, num_tokens,
        num_tokens) tensor of attention logits q k^T / sqrt(head_dim) per 1-indexed block of `attn_blocks`, the
        prefix (CLS) rows and columns dropped). The logits come from the same forward as the tokens."""
        if not attn_blocks:
            return self(images), []
        tokens, logits = self._run(lambda x: self._tokens_and_attention(x, tuple(attn_blocks)), images)
        return tokens, logits

    def _tokens_and_attention(self, x: torch.Tensor, blocks: tuple) -> Tuple[torch.Tensor, list]:
        raise ValueError(f"encoder {self.name!r} cannot give its attention logits (attention distillation takes a "
                         f"DINOv2 encoder)")

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
            out = fn(x)
        if isinstance(out, tuple):  # (tokens, [attention logits])
            return out[0].float(), [a.float() for a in out[1]]
        return out.float()

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

    def _tokens_and_attention(self, x: torch.Tensor, blocks: tuple) -> Tuple[torch.Tensor, list]:
        """Forward hooks on the query and key projections of the requested blocks catch q and k (DINOv2 has no
        q/k norm), so the attention implementation the model runs (SDPA, eager) does not matter."""
        layers, config = self.model.encoder.layer, self.model.config
        heads = config.num_attention_heads
        caught: dict = {}
        handles = []
        for block in blocks:
            if not 1 <= block <= len(layers):
                raise ValueError(f"encoder {self.name!r} has blocks 1..{len(layers)}, not {block}")
            q_proj, k_proj = _query_key(layers[block - 1])
            for kind, module in (("q", q_proj), ("k", k_proj)):
                handles.append(module.register_forward_hook(
                    lambda _m, _i, out, key=(block, kind): caught.__setitem__(key, out)))
        try:
            tokens = self._tokens(x)
        finally:
            for h in handles:
                h.remove()
        logits = []
        for block in blocks:
            q, k = (caught[(block, kind)] for kind in ("q", "k"))
            B, N, D = q.shape
            q, k = (t.reshape(B, N, heads, D // heads).transpose(1, 2) for t in (q, k))
            logits.append(((q * (D // heads) ** -0.5) @ k.transpose(-2, -1))[:, :, 1:, 1:])
        return tokens, logits


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


def load_encoder(spec: str, resolution: int, device: Union[str, torch.device] = "cpu",
                 grid: Optional[int] = None) -> TargetEncoder:
    """Build the frozen encoder named by `spec` for images of `resolution` px, in eval mode on `device`; with
    `grid` (the model's tokens per side) its input is sized to give grid x grid patches."""
    name, source = parse_encoder_spec(spec)
    entry = _ENCODERS[name]
    if entry.source is None and source is not None:
        raise ValueError(f"encoder {name!r} is random-init and takes no @SOURCE (got {source!r})")
    build = {"dinov2": _build_dinov2, "clip": _build_clip, "siglip": _build_siglip}[entry.family]
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
        _check_local_path(spec, source)
        name = parse_encoder_spec(spec)[0]
        require_weights(source, f"encoder {spec!r}: its weights", f"name the copy as {name}@DIR (repa.encoders, "
                        "data_prep --features, eval.representation --encoder)")
        try:
            model = Dinov2Model.from_pretrained(os.path.expanduser(source), dtype=torch.float32)
        except OSError as e:
            raise OSError(f"encoder {spec!r}: cannot load DINOv2 weights from {source!r}: {e}") from e
        description = f"{spec} ({source})"
    patch = model.config.patch_size
    patch = patch if isinstance(patch, int) else patch[0]
    return DinoV2Encoder(spec, model, model.config.hidden_size, patch, resolution,
                         IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, description, grid)


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


def _query_key(layer: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """The query and key Linear layers of a transformers Dinov2Layer (named q_proj/k_proj since transformers 5,
    attention.query/attention.key before)."""
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
