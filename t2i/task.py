"""The text-to-image task: MS-COCO latents + caption embeddings -> MMDiT, conditioned on caption tokens.

A small adapter for the shared trainer (core/trainer.py): it locates the dataset, builds the MMDiT, and turns a
batch into the model's `context` with caption dropout to the empty caption's embedding (the CFG null condition).
Which of an image's captions a draw uses is a function of (run.seed, stream position), so it replays on resume.
"""
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from core.config import (ConfigError, ObjectiveConfig, RepaConfig, RunConfig, TrainConfig, check_block, check_choice,
                         check_prepared_dataset, validate_common)
from core.data import SkippingDataset, decode_training_sample
from core.dist import DistContext, barrier
from core.shards import ShardFormatError, ShardReader, decode_value, feature_key, read_manifest
from core.latents import latent_layout
from core.trainer import DataInfo
from t2i.mmdit import MMDIT_PRESETS, build_mmdit
from t2i.text_encoder import text_shape


@dataclass
class T2IModelConfig:
    preset: str = "base"  # tiny, base (App. K: hidden 768, depth 24, 24 heads), large (for 512 px)
    qk_norm: bool = False  # RMSNorm on queries and keys (SD3); helps stability at scale
    pooled_text: bool = False  # add an MLP of the mean caption token to the timestep embedding
    grad_checkpointing: bool = False


@dataclass
class T2IDataConfig:
    kind: str = "shards"  # shards: a prepared COCO dataset (data_prep.coco); synthetic: generated shapes
    path: str = ""  # the prepared dataset directory; for synthetic, where to write it ("" = <run.dir>/data)
    synthetic_samples: int = 512
    synthetic_resolution: int = 32
    synthetic_text_encoder: str = "clip-tiny"  # the generated set's caption encoder (random-init offline)
    synthetic_autoencoder: str = "pixel-s2d2"  # 32 px -> 12x16x16 exact pixel "latents"
    synthetic_text_tokens: int = 77  # caption tokens kept (the generated captions fit in 12; 77 = CLIP's all)


@dataclass
class T2IConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: T2IModelConfig = field(default_factory=T2IModelConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=150_000))  # App. K: 150K iterations
    data: T2IDataConfig = field(default_factory=T2IDataConfig)

    def validate(self, check_data: bool = True) -> None:
        validate_common(self)
        check_choice("model.preset", self.model.preset, tuple(MMDIT_PRESETS))
        check_choice("data.kind", self.data.kind, ("shards", "synthetic"))
        if not 1 <= self.data.synthetic_text_tokens <= 77:
            raise ConfigError(f"data.synthetic_text_tokens={self.data.synthetic_text_tokens} is outside 1..77 "
                              "(CLIP's 77-token context)")
        # The MMDiT has no learned-variance head, which the DDPM objective (class-conditional DiT) needs.
        check_choice("objective.kind (text-to-image)", self.objective.kind, ("transport",))
        if self.data.kind == "shards" and check_data:
            check_prepared_dataset("data.path", self.data.path, "t2i", "data_prep.coco")
        if self.repa.coeff > 0:
            check_block("repa.depth", self.repa.depth, self.model.preset, MMDIT_PRESETS[self.model.preset]["depth"])


def caption_index(seed: int, position: int, num_captions: int) -> int:
    """Which caption a draw uses: a pure function of the run seed and the draw's stream position."""
    return int(np.random.SeedSequence([seed, position, 7]).generate_state(1)[0] % num_captions)


def decode_t2i(raw: dict, position: int, seed: int, need_image: bool, feature_keys: tuple[str, ...]) -> dict:
    """Shard sample -> {"moments": (2C, h, w), "context": (L, D) one caption's tokens, "caption_index": int,
    ["image"], ["feats"]} (core/data.py)."""
    out = decode_training_sample(raw, ("txt_emb.npy",), need_image, feature_keys)
    embeddings = decode_value("txt_emb.npy", raw["txt_emb.npy"])  # (K, L, D)
    k = caption_index(seed, position, embeddings.shape[0])
    out.update(context=torch.from_numpy(embeddings[k].astype(np.float32)), caption_index=k)
    return out


def load_null_context(root: str, manifest: dict) -> torch.Tensor:
    """The empty caption's token embeddings (L, D) float32, stored once per dataset (FORMATS.md)."""
    name = manifest.get("null_text_embedding")
    if not name or not os.path.isfile(os.path.join(root, name)):
        raise ShardFormatError(f"dataset {root!r} has no empty-caption embedding (manifest 'null_text_embedding')")
    return torch.from_numpy(np.load(os.path.join(root, name), allow_pickle=False).astype(np.float32))


class T2ITask:
    name = "t2i"

    def __init__(self, cfg: T2IConfig):
        self.cfg = cfg
        self.null_context: torch.Tensor | None = None

    def prepare_data(self, ctx: DistContext) -> DataInfo:
        d = self.cfg.data
        root = d.path
        if d.kind == "synthetic":
            from t2i.data import make_synthetic_t2i

            root = d.path or os.path.join(self.cfg.run.dir, "data")
            if ctx.is_main and not os.path.isfile(os.path.join(root, "train", "manifest.json")):
                make_synthetic_t2i(root, d.synthetic_samples, d.synthetic_resolution, d.synthetic_text_encoder,
                                   d.synthetic_autoencoder, seed=self.cfg.run.seed,
                                   text_tokens=d.synthetic_text_tokens)
            barrier()
            root = os.path.join(root, "train")
        info = DataInfo(root, read_manifest(root))
        stored = info.manifest.get("text_embedding", {}).get("shape", [None])[0]
        if d.kind == "synthetic" and stored != d.synthetic_text_tokens:
            raise ConfigError(f"the generated set in {os.path.dirname(root)} stores {stored} caption tokens but "
                              f"data.synthetic_text_tokens={d.synthetic_text_tokens}; delete it to regenerate it")
        self.null_context = load_null_context(root, info.manifest)
        return info

    def dataset(self, info: DataInfo, need_image: bool, feature_names: list[str]):
        keys = tuple(feature_key(n) for n in feature_names)
        seed = self.cfg.run.seed
        return SkippingDataset(ShardReader(info.root),
                               lambda raw, position: decode_t2i(raw, position, seed, need_image, keys))

    def random_data(self, resolution: int) -> DataInfo:
        """The shapes of this config's data with nothing read (core.bench's random batches): the generated set's
        for data.kind=synthetic, else COCO at `resolution` px in SD-VAE latents with CLIP ViT-L/14 text (77 x 768,
        App. K). The empty caption's embedding is zeros."""
        d = self.cfg.data
        if d.kind == "synthetic":
            resolution, latent, text = d.synthetic_resolution, d.synthetic_autoencoder, d.synthetic_text_encoder
            length, width = text_shape(text, d.synthetic_text_tokens)
        else:
            latent, text = "sd-vae", "clip-l"
            length, width = text_shape(text)
        self.null_context = torch.zeros(length, width)
        return DataInfo("(random)", {"kind": "t2i", "resolution": resolution, "features": [], "text_encoder": text,
                                     "text_embedding": {"shape": [length, width], "dtype": "float16"},
                                     "latent": latent_layout(latent, resolution)})

    def random_condition(self, info: DataInfo, n: int, generator: torch.Generator) -> dict:
        """Batch fields of the condition for `n` random samples (host tensors)."""
        length, width = info.manifest["text_embedding"]["shape"]
        return {"context": torch.randn(n, length, width, generator=generator)}

    def model_kwargs(self, info: DataInfo, encoder_dims: list[int]) -> dict:
        c, h = info.square_latent()
        m = self.cfg.model
        return {**MMDIT_PRESETS[m.preset], "input_size": h, "in_channels": c,
                "text_dim": int(self.null_context.shape[-1]), "repa_depth": self.cfg.repa.depth,
                "encoder_dims": list(encoder_dims), "projector_dim": self.cfg.repa.projector_dim,
                "qk_norm": m.qk_norm, "pooled_text": m.pooled_text}

    def build_model(self, kwargs: dict) -> torch.nn.Module:
        return build_mmdit(kwargs, grad_checkpointing=self.cfg.model.grad_checkpointing)

    def condition(self, batch: dict, drop: torch.Tensor, device: torch.device) -> dict:
        context = batch["context"].to(device, non_blocking=True)
        null = self.null_context.to(device=device, dtype=context.dtype).expand_as(context)
        return {"context": torch.where(drop[:, None, None], null, context)}
