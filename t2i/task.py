"""The text-to-image task: MS-COCO latents + caption embeddings -> MMDiT, conditioned on caption tokens.

The core.task.Task of the MMDiT: it locates the dataset (or makes the generated shapes set through the real
data_prep.coco path), builds the MMDiT, and turns a batch into the model's `context` with caption dropout to the
empty caption's embedding (the CFG null condition). Which of an image's captions a draw uses is a function of
(run.seed, stream position), so it replays on resume.
"""
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from core.config import ConfigError, LatentDataConfig, TaskConfig, TrainConfig, check_choice, validate_task_config
from core.data import SkippingDataset, decode_training_sample
from core.dist import DistContext
from core.latents import latent_layout
from core.repa import projector_kwargs
from core.shards import ShardReader, decode_value, feature_key, read_manifest
from core.task import DataInfo, generated_dataset
from core.text_encoders import text_shape

from t2i.data import load_null_context, make_synthetic_t2i
from t2i.evaluation import CaptionConditioner, PromptConditioner
from t2i.mmdit import MMDIT_PRESETS, build_mmdit

NAME = "t2i"


@dataclass
class T2IModelConfig:
    preset: str = "base"  # tiny, base (App. K: hidden 768, depth 24, 24 heads), large (for 512 px)
    qk_norm: bool = False  # RMSNorm on queries and keys (SD3); helps stability at scale
    pooled_text: bool = False  # add an MLP of the mean caption token to the timestep embedding
    grad_checkpointing: bool = False


@dataclass
class T2IDataConfig(LatentDataConfig):
    kind: str = "shards"  # shards: a prepared COCO dataset (data_prep.coco); synthetic: generated shapes
    path: str = ""  # the prepared dataset directory (kind=shards); a synthetic set is generated in <run.dir>/data
    synthetic_samples: int = 512
    synthetic_resolution: int = 32
    synthetic_text_encoder: str = "clip-tiny"  # the generated set's caption encoder (random-init offline)
    synthetic_autoencoder: str = "pixel-s2d2"  # 32 px -> 12x16x16 exact pixel "latents"
    synthetic_text_tokens: int = 77  # caption tokens kept (the generated captions fit in 12; 77 = CLIP's all)


@dataclass
class T2IConfig(TaskConfig):
    task: str = NAME
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=150_000))  # App. K: 150K iterations
    model: T2IModelConfig = field(default_factory=T2IModelConfig)
    data: T2IDataConfig = field(default_factory=T2IDataConfig)

    def validate(self, check_data: bool = True) -> None:
        validate_task_config(self, NAME, MMDIT_PRESETS, "data_prep.coco", check_data)
        if not 1 <= self.data.synthetic_text_tokens <= 77:
            raise ConfigError(f"data.synthetic_text_tokens={self.data.synthetic_text_tokens} is outside 1..77 "
                              "(CLIP's 77-token context)")
        # The MMDiT has no learned-variance head, which the DDPM objective (class-conditional DiT) needs.
        check_choice("objective.kind (text-to-image)", self.objective.kind, ("transport",))
        if self.reg.coeff > 0:
            raise ConfigError("reg.coeff > 0: REG's class token is a feature of the class-conditional SiT; the "
                              "text-to-image MMDiT has none (set reg.coeff=0)")


def caption_index(seed: int, position: int, num_captions: int) -> int:
    """Which caption a draw uses: a pure function of the run seed and the draw's stream position."""
    return int(np.random.SeedSequence([seed, position, 7]).generate_state(1)[0] % num_captions)


def decode_t2i(raw: dict, position: int, seed: int, need_image: bool, feature_keys: tuple[str, ...]) -> dict:
    """Shard sample -> {"moments": (2C, h, w), "context": (L, D) one caption's tokens, "caption_index": int,
    ["image"], ["feats"]} (core/data.py)."""
    out = decode_training_sample(raw, ("txt_emb.npy",), need_image, feature_keys)
    embeddings = decode_value("txt_emb.npy", raw["txt_emb.npy"])  # (K, L, D)
    k = caption_index(seed, position, embeddings.shape[0])
    out.update(context=torch.from_numpy(np.ascontiguousarray(embeddings[k])), caption_index=k)  # float32 on the device
    return out


class T2ITask:
    """core.task.Task for the MMDiT: condition {"context": (B, L, D) caption tokens}, the empty caption's tokens
    for CFG. `null_context` (L, D): read from the dataset (zeros for random data) unless given."""

    name = NAME
    config_class = T2IConfig

    def __init__(self, cfg: T2IConfig, data: DataInfo, null_context: torch.Tensor | None = None):
        self.cfg, self.data = cfg, data
        if null_context is None:
            shape = data.manifest["text_embedding"]["shape"]
            null_context = torch.zeros(*shape) if data.random else load_null_context(data.root, data.manifest)
        self.null_context = null_context
        self._null_on = {}  # (device, dtype) -> null_context there, copied once rather than every micro-batch

    @classmethod
    def prepare_data(cls, cfg: T2IConfig, ctx: DistContext) -> DataInfo:
        d = cfg.data
        root = d.path
        if d.kind == "synthetic":
            root = os.path.join(generated_dataset(cfg, ctx, os.path.join("train", "manifest.json"), lambda out: (
                make_synthetic_t2i(out, d.synthetic_samples, d.synthetic_resolution, d.synthetic_text_encoder,
                                   d.synthetic_autoencoder, seed=cfg.run.seed, text_tokens=d.synthetic_text_tokens))),
                "train")
        info = DataInfo(root, read_manifest(root))
        stored = info.manifest.get("text_embedding", {}).get("shape", [None])[0]
        if d.kind == "synthetic" and stored != d.synthetic_text_tokens:
            raise ConfigError(f"the generated set in {os.path.dirname(root)} stores {stored} caption tokens but "
                              f"data.synthetic_text_tokens={d.synthetic_text_tokens}; delete it to regenerate it")
        return info

    @classmethod
    def random_data(cls, cfg: T2IConfig, resolution: int, autoencoder: str = "sd-vae") -> DataInfo:
        """The shapes of the configured data with nothing read: the generated set's for data.kind=synthetic, else
        COCO at `resolution` px in the latents of `autoencoder` (core.latents.latent_layout) with CLIP ViT-L/14
        text (77 x 768, App. K). The empty caption's embedding is zeros."""
        d = cfg.data
        if d.kind == "synthetic":
            resolution, latent, text = d.synthetic_resolution, d.synthetic_autoencoder, d.synthetic_text_encoder
            length, width = text_shape(text, d.synthetic_text_tokens)
        else:
            latent, text = autoencoder, "clip-l"
            length, width = text_shape(text)
        return DataInfo("(random)", {"kind": "t2i", "resolution": resolution, "features": [], "text_encoder": text,
                                     "text_embedding": {"shape": [length, width], "dtype": "float16"},
                                     "latent": latent_layout(latent, resolution)}, random=True)

    @staticmethod
    def build_model(kwargs: dict, grad_checkpointing: bool = False) -> torch.nn.Module:
        return build_mmdit(kwargs, grad_checkpointing=grad_checkpointing)

    @classmethod
    def conditioner(cls, record: dict, options: dict) -> CaptionConditioner:
        """The U-ViT caption protocol over the prepared val split in options["cond_file"] (t2i/evaluation.py)."""
        return CaptionConditioner(record, options)

    def model_kwargs(self, encoder_dims: list[int]) -> dict:
        c, h = self.data.square_latent()
        m = self.cfg.model
        return {**MMDIT_PRESETS[m.preset], "input_size": h, "in_channels": c,
                "text_dim": int(self.null_context.shape[-1]), "repa_depth": self.cfg.repa.depth,
                "encoder_dims": list(encoder_dims), "projector_dim": self.cfg.repa.projector_dim,
                "qk_norm": m.qk_norm, "pooled_text": m.pooled_text, **projector_kwargs(self.cfg.repa)}

    def dataset(self, need_image: bool, feature_names: list[str]):
        keys = tuple(feature_key(n) for n in feature_names)
        seed = self.cfg.run.seed
        return SkippingDataset(ShardReader(self.data.root),
                               lambda raw, position: decode_t2i(raw, position, seed, need_image, keys))

    def condition(self, batch: dict, drop: torch.Tensor, device: torch.device) -> dict:
        context = batch["context"].to(device, non_blocking=True).float()  # stored float16: converted here, exactly
        key = (str(device), context.dtype)
        if key not in self._null_on:  # a copy from pageable host memory per micro-batch would stall the host
            self._null_on[key] = self.null_context.to(device=device, dtype=context.dtype)
        return {"context": torch.where(drop[:, None, None], self._null_on[key].expand_as(context), context)}

    def random_condition(self, n: int, generator: torch.Generator) -> dict:
        length, width = self.data.manifest["text_embedding"]["shape"]
        return {"context": torch.randn(n, length, width, generator=generator)}

    def preview(self, n: int) -> tuple[PromptConditioner, list[str]]:
        """The first `n` training images' first captions, with their stored embeddings (no text encoder runs)."""
        reader = ShardReader(self.data.root)
        rows, captions = [], []
        for i in range(min(n, len(reader))):
            raw = reader[i]
            rows.append(decode_value("txt_emb.npy", raw["txt_emb.npy"])[0].astype(np.float32))
            captions.append(decode_value("captions.json", raw["captions.json"])[0])
        return PromptConditioner(torch.from_numpy(np.stack(rows)), self.null_context), captions
