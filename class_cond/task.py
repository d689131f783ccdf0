"""The class-conditional task: ImageNet latents (or a generated set) -> SiT/DiT with the class as condition."""
import os
from dataclasses import dataclass, field

import torch

from core.config import (ObjectiveConfig, RepaConfig, RunConfig, TrainConfig, check_block, check_choice,
                         check_prepared_dataset, validate_common)
from core.data import SkippingDataset
from core.dist import DistContext, barrier
from core.latents import latent_layout
from core.layers import check_labels
from core.shards import ShardReader, feature_key, read_manifest
from core.trainer import DataInfo
from core.transport import build_objective

from class_cond.data import SYNTHETIC_FACTOR, decode_class_cond, make_synthetic_class_cond
from class_cond.models import SIT_PRESETS, build_sit


@dataclass
class ModelConfig:
    preset: str = "XL/2"  # SiT-{S,B,L,XL}/{2,4,8} or tiny (class_cond/models.py)
    qk_norm: bool = False
    grad_checkpointing: bool = False  # activation checkpointing of every block: less memory, ~30% more compute


@dataclass
class DataConfig:
    kind: str = "shards"  # shards: a prepared dataset (data_prep.imagenet); synthetic: generated here
    path: str = ""  # the prepared dataset directory; for synthetic, where to write it ("" = <run.dir>/data)
    synthetic_samples: int = 1024
    synthetic_classes: int = 4
    synthetic_resolution: int = 32


@dataclass
class ClassCondConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self, check_data: bool = True) -> None:
        validate_common(self)
        check_choice("model.preset", self.model.preset, tuple(SIT_PRESETS))
        check_choice("data.kind", self.data.kind, ("shards", "synthetic"))
        if self.data.kind == "shards" and check_data:
            check_prepared_dataset("data.path", self.data.path, "class_cond", "data_prep.imagenet")
        if self.repa.coeff > 0:
            check_block("repa.depth", self.repa.depth, self.model.preset, SIT_PRESETS[self.model.preset]["depth"])


class ClassCondTask:
    name = "class_cond"

    def __init__(self, cfg: ClassCondConfig):
        self.cfg = cfg
        self.num_classes = 0  # from the dataset's manifest

    def prepare_data(self, ctx: DistContext) -> DataInfo:
        d = self.cfg.data
        if d.kind == "synthetic":
            root = d.path or os.path.join(self.cfg.run.dir, "data")
            if ctx.is_main and not os.path.isfile(os.path.join(root, "manifest.json")):
                make_synthetic_class_cond(root, d.synthetic_samples, d.synthetic_classes, d.synthetic_resolution,
                                          seed=self.cfg.run.seed)
            barrier()
        else:
            root = d.path
        info = DataInfo(root, read_manifest(root))
        self.num_classes = int(info.manifest["num_classes"])
        return info

    def dataset(self, info: DataInfo, need_image: bool, feature_names: list[str]):
        keys = tuple(feature_key(n) for n in feature_names)
        return SkippingDataset(ShardReader(info.root), lambda raw, _: decode_class_cond(raw, need_image, keys))

    def random_data(self, resolution: int) -> DataInfo:
        """The shapes of this config's data with nothing read (core.bench's random batches): the generated set's
        for data.kind=synthetic, else ImageNet at `resolution` px in SD-VAE latents, 1000 classes."""
        d = self.cfg.data
        if d.kind == "synthetic":
            resolution, classes, latent = d.synthetic_resolution, d.synthetic_classes, f"pixel-s2d{SYNTHETIC_FACTOR}"
        else:
            classes, latent = 1000, "sd-vae"
        self.num_classes = classes
        return DataInfo("(random)", {"kind": "class_cond", "resolution": resolution, "num_classes": classes,
                                     "features": [], "latent": latent_layout(latent, resolution)})

    def random_condition(self, info: DataInfo, n: int, generator: torch.Generator) -> dict:
        """Batch fields of the condition for `n` random samples (host tensors)."""
        return {"label": torch.randint(0, self.num_classes, (n,), generator=generator)}

    def model_kwargs(self, info: DataInfo, encoder_dims: list[int]) -> dict:
        """Every SiT constructor argument (JSON-serialisable): checkpoints record them so eval needs no data."""
        c, h = info.square_latent()
        m = self.cfg.model
        return {**SIT_PRESETS[m.preset], "input_size": h, "in_channels": c,
                "num_classes": int(info.manifest["num_classes"]), "repa_depth": self.cfg.repa.depth,
                "encoder_dims": list(encoder_dims), "projector_dim": self.cfg.repa.projector_dim,
                "qk_norm": m.qk_norm, "learn_sigma": build_objective(self.cfg.objective).learn_sigma}

    def build_model(self, kwargs: dict) -> torch.nn.Module:
        return build_sit(kwargs, grad_checkpointing=self.cfg.model.grad_checkpointing)

    def condition(self, batch: dict, drop: torch.Tensor, device: torch.device) -> dict:
        check_labels(batch["label"], self.num_classes)  # on the host copy: no device sync
        labels = batch["label"].to(device, non_blocking=True)
        null = torch.full_like(labels, self.num_classes)  # the null class index for CFG (NOTES.md)
        return {"y": torch.where(drop, null, labels)}
