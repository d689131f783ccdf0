"""The class-conditional task: ImageNet latents (or a generated set) -> SiT/DiT with the class as condition."""
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from core.config import ConfigError, LatentDataConfig, TaskConfig, check_choice, validate_task_config
from core.data import SkippingDataset
from core.dist import DistContext
from core.latents import latent_layout
from core.layers import MLPS, NORMS, check_labels
from core.repa import projector_kwargs
from core.shards import ShardReader, feature_key, read_manifest
from core.task import DataInfo, generated_dataset
from core.transport import build_objective

from class_cond.data import SYNTHETIC_FACTOR, decode_class_cond, make_synthetic_class_cond
from class_cond.models import SIT_PRESETS, build_sit

NAME = "class_cond"


@dataclass
class ModelConfig:
    preset: str = "XL/2"  # SiT-{S,B,L,XL}/{2,4,8} or tiny (class_cond/models.py)
    qk_norm: bool = False
    grad_checkpointing: bool = False  # activation checkpointing of every block: less memory, ~30% more compute
    # LightningDiT's switches (arXiv 2501.01423), each on its own: the blocks' norm, their MLP, 2-D RoPE in attention
    norm: str = "layernorm"  # layernorm (DiT/SiT) or rmsnorm
    mlp: str = "gelu"  # gelu (DiT/SiT) or swiglu
    rope: bool = False


@dataclass
class DataConfig(LatentDataConfig):
    kind: str = "shards"  # shards: a prepared dataset (data_prep.imagenet); synthetic: generated here
    path: str = ""  # the prepared dataset directory (kind=shards); a synthetic set is generated in <run.dir>/data
    synthetic_samples: int = 1024
    synthetic_classes: int = 4
    synthetic_resolution: int = 32


@dataclass
class ClassCondConfig(TaskConfig):
    task: str = NAME
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self, check_data: bool = True) -> None:
        validate_task_config(self, NAME, SIT_PRESETS, "data_prep.imagenet", check_data)
        check_choice("model.norm", self.model.norm, NORMS)
        check_choice("model.mlp", self.model.mlp, MLPS)
        if self.model.rope and self.reg.coeff > 0:
            raise ConfigError("model.rope=true rotates tokens by their grid position, and REG's class token "
                              "(reg.coeff > 0) has none: train one or the other")
        if self.model.rope and (SIT_PRESETS[self.model.preset]["hidden_size"]
                                // SIT_PRESETS[self.model.preset]["num_heads"]) % 4:
            raise ConfigError(f"model.rope=true needs a head dimension divisible by 4 ({self.model.preset})")


def lightningdit_kwargs(m: ModelConfig) -> dict:
    """The SiT arguments of the LightningDiT switches that are on (none otherwise, so other records are
    unchanged)."""
    return {k: v for k, v, off in (("norm", m.norm, "layernorm"), ("mlp", m.mlp, "gelu"), ("rope", m.rope, False))
            if v != off}


def null_labels(labels: torch.Tensor, num_classes: int) -> dict:
    """The null condition of CFG: every label replaced by the null class `num_classes` (the REPA reference's
    LabelEmbedder keeps row num_classes for it, models/sit.py)."""
    return {"y": torch.full_like(labels, num_classes)}


class ClassConditioner:
    """Class-balanced labels for evaluation: sample i gets class i % num_classes (50K ImageNet samples = 50 per
    class); the null condition is the null class, index num_classes."""

    num_available = None
    protocol = None

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def cond(self, indices: Sequence[int], device: torch.device) -> dict:
        return {"y": torch.as_tensor(self.labels(indices), dtype=torch.long, device=device)}

    def null(self, cond: dict) -> dict:
        return null_labels(cond["y"], self.num_classes)

    def labels(self, indices: Sequence[int]) -> np.ndarray:
        return np.asarray(indices, dtype=np.int64) % self.num_classes


class ClassCondTask:
    """core.task.Task for class-conditional SiT/DiT: condition {"y": labels}, the null class num_classes for CFG
    (the reference's convention)."""

    name = NAME
    config_class = ClassCondConfig

    def __init__(self, cfg: ClassCondConfig, data: DataInfo):
        self.cfg, self.data = cfg, data
        self.num_classes = int(data.manifest["num_classes"])

    @classmethod
    def prepare_data(cls, cfg: ClassCondConfig, ctx: DistContext) -> DataInfo:
        d = cfg.data
        root = d.path
        if d.kind == "synthetic":
            root = generated_dataset(cfg, ctx, "manifest.json", lambda out: make_synthetic_class_cond(
                out, d.synthetic_samples, d.synthetic_classes, d.synthetic_resolution, seed=cfg.run.seed))
        return DataInfo(root, read_manifest(root))

    @classmethod
    def random_data(cls, cfg: ClassCondConfig, resolution: int, autoencoder: str = "sd-vae") -> DataInfo:
        """The shapes of the configured data with nothing read: the generated set's for data.kind=synthetic, else
        ImageNet at `resolution` px in the latents of `autoencoder` (core.latents.latent_layout), 1000 classes."""
        d = cfg.data
        if d.kind == "synthetic":
            resolution, classes, latent = d.synthetic_resolution, d.synthetic_classes, f"pixel-s2d{SYNTHETIC_FACTOR}"
        else:
            classes, latent = 1000, autoencoder
        return DataInfo("(random)", {"kind": "class_cond", "resolution": resolution, "num_classes": classes,
                                     "features": [], "latent": latent_layout(latent, resolution)}, random=True)

    @staticmethod
    def build_model(kwargs: dict, grad_checkpointing: bool = False) -> torch.nn.Module:
        return build_sit(kwargs, grad_checkpointing=grad_checkpointing)

    @classmethod
    def conditioner(cls, record: dict, options: dict) -> ClassConditioner:
        if options.get("cond_file"):
            raise ValueError("the class_cond task takes no --cond-file (labels are i % num_classes)")
        return ClassConditioner(int(record["model"]["kwargs"]["num_classes"]))

    def model_kwargs(self, encoder_dims: list[int]) -> dict:
        """Every SiT constructor argument (JSON-serialisable): checkpoints record them so eval needs no data."""
        c, h = self.data.square_latent()
        m = self.cfg.model
        return {**SIT_PRESETS[m.preset], "input_size": h, "in_channels": c, "num_classes": self.num_classes,
                "repa_depth": self.cfg.repa.depth, "encoder_dims": list(encoder_dims),
                "projector_dim": self.cfg.repa.projector_dim, "qk_norm": m.qk_norm,
                "learn_sigma": build_objective(self.cfg.objective).learn_sigma, **projector_kwargs(self.cfg.repa),
                # REG: the first encoder's class token is token 0 (absent otherwise, so other records are unchanged)
                **({"reg_dim": int(encoder_dims[0])} if self.cfg.reg.coeff > 0 and encoder_dims else {}),
                **lightningdit_kwargs(m)}

    def dataset(self, need_image: bool, feature_names: list[str]):
        keys = tuple(feature_key(n) for n in feature_names)
        return SkippingDataset(ShardReader(self.data.root), lambda raw, _: decode_class_cond(raw, need_image, keys))

    def condition(self, batch: dict, drop: torch.Tensor, device: torch.device) -> dict:
        check_labels(batch["label"], self.num_classes)  # on the host copy: no device sync
        labels = batch["label"].to(device, non_blocking=True)
        return {"y": torch.where(drop, null_labels(labels, self.num_classes)["y"], labels)}

    def random_condition(self, n: int, generator: torch.Generator) -> dict:
        return {"label": torch.randint(0, self.num_classes, (n,), generator=generator)}

    def preview(self, n: int) -> tuple[ClassConditioner, list[str]]:
        """Classes 0, 1, ... (mod num_classes), named as the dataset's class folders when it records them."""
        names = self.data.manifest.get("classes") or [f"class {c}" for c in range(self.num_classes)]
        return ClassConditioner(self.num_classes), [names[i % self.num_classes] for i in range(n)]
