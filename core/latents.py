"""Latent spaces: stored VAE posterior moments, any diffusers AutoencoderKL (the SD-VAE by default), a weight-free
pixel space-to-depth autoencoder, and the normalisation between an autoencoder's latents and the model's.

Shards store posterior moments (mean ‖ std along channels, float16). Training draws a fresh latent each step,
x = mean + std * eps, and hands the model z = LatentNorm.normalize(x):

- scalar (default): z = x * scale + shift, the autoencoder's own scaling (its config's scaling_factor and
  shift_factor: 0.18215 and 0 for the SD-VAE, as the REPA reference's train.py and generate.py; 1 for pixels);
- channel: z = (x - mean_c) / std_c * multiplier with the per-channel statistics of the prepared set
  (LightningDiT's latent_norm, for VAEs whose channels differ in scale: VA-VAE, REPA-E's E2E-VAE, ...).

Decoding inverts it (LatentNorm.denormalize). data_prep records the statistics of every prepared set
(`LatentStats`, in the manifest's latent entry), so either can be chosen at training time.
"""
import functools
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download

from core.draws import RowDraws, as_draws
from core.hub import in_hub_cache, is_local_path, require_weights

SD_VAE_SCALE = 0.18215  # Rombach et al.; used by SiT/REPA with SD-VAE latents
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # the REPA reference's generate.py decodes with sd-vae-ft-ema (--vae ema)
# The SD-VAEs by name, so their layout is known without a config file (4 channels at 1/8, scale 0.18215).
SD_VAES = ("sd-vae", "stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse")
LATENT_NORMS = ("scalar", "channel")


def sample_latents(moments: torch.Tensor, generator: RowDraws | torch.Generator, norm: "LatentNorm | float",
                   shift: float = 0.0) -> torch.Tensor:
    """moments: (B, 2C, H, W) mean ‖ std -> (B, C, H, W) float32 latents normalised for the model. `norm`: a
    LatentNorm, or a scalar scale (with `shift`)."""
    mean, std = moments.float().chunk(2, dim=1)
    eps = as_draws(generator).randn(mean.shape, device=mean.device, dtype=mean.dtype)
    if not isinstance(norm, LatentNorm):
        norm = LatentNorm(scale=float(norm), shift=shift)
    return norm.normalize(mean + std * eps)


# --------------------------------------------------------------------------------------------- normalisation


@dataclass(frozen=True)
class LatentNorm:
    """From an autoencoder's latents x (B, C, H, W) to the model's z and back; see the module docstring."""

    kind: str = "scalar"
    scale: float = 1.0  # scalar
    shift: float = 0.0
    mean: tuple = ()  # channel: per-channel statistics of the set, and the multiplier after them
    std: tuple = ()
    multiplier: float = 1.0

    @classmethod
    def from_record(cls, latent: dict) -> "LatentNorm":
        """The normalisation a run's (or a dataset's) latent entry records; ValueError for one it cannot be."""
        kind = latent.get("norm", "scalar")
        if kind == "scalar":
            return cls(scale=float(latent["scale_factor"]), shift=float(latent.get("shift", 0.0)))
        if kind != "channel":
            raise ValueError(f"latent norm {kind!r} is not one of {', '.join(LATENT_NORMS)}")
        stats = latent.get("channel_stats")
        if not stats:
            raise ValueError("latent norm 'channel' needs the latent entry's channel_stats (mean, std)")
        mean, std = tuple(map(float, stats["mean"])), tuple(map(float, stats["std"]))
        if len(mean) != latent["shape"][0] or len(std) != len(mean) or not all(s > 0 for s in std):
            raise ValueError(f"channel_stats of {len(mean)} means and {len(std)} positive stds do not fit latents "
                             f"of {latent['shape'][0]} channels")
        return cls("channel", mean=mean, std=std, multiplier=float(latent.get("multiplier", 1.0)))

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _channel_tensors(self.mean, self.std, x.device)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Autoencoder latents -> the model's (float32)."""
        if self.kind == "scalar":
            return x * self.scale + self.shift
        mean, std = self._stats(x)
        return (x.float() - mean) / std * self.multiplier  # LightningDiT's order: (x - mean) / std * multiplier

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The model's latents -> the autoencoder's: the inverse of `normalize`."""
        if self.kind == "scalar":
            return (z.float() - self.shift) / self.scale
        mean, std = self._stats(z)
        return z.float() * std / self.multiplier + mean  # LightningDiT's inference.py: z * std / multiplier + mean


@functools.lru_cache(maxsize=16)
def _channel_tensors(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, C, 1, 1) float32 mean and std on `device`, made once: a copy to the device each step would wait."""
    shape = (1, len(mean), 1, 1)
    return (torch.tensor(mean, dtype=torch.float32).view(shape).to(device),
            torch.tensor(std, dtype=torch.float32).view(shape).to(device))


def run_latent_record(latent: dict, norm: str = "scalar", multiplier: float = 1.0) -> dict:
    """A run's latent entry (state.json, exports): the dataset's, with the normalisation the run trains with.
    ValueError naming the fix when the dataset has no statistics for `norm`."""
    if norm not in LATENT_NORMS:
        raise ValueError(f"latent norm {norm!r} is not one of {', '.join(LATENT_NORMS)}")
    if norm == "scalar":
        return dict(latent)
    if not latent.get("channel_stats"):
        raise ValueError("its manifest has no per-channel latent statistics (prepared before data_prep recorded "
                         "them): add them with `python -m data_prep.latent_stats DATASET`")
    record = {**latent, "norm": "channel", "multiplier": float(multiplier)}
    LatentNorm.from_record(record)  # checks the statistics against the channels
    return record


class LatentStats:
    """Exact per-channel mean and unbiased std of the latents training draws, x = mu + sigma * eps, over stored
    moments mu ‖ sigma: E[x] = avg(mu), Var[x] = avg(mu^2 + sigma^2) - avg(mu)^2 (the expectation over eps, so no
    draw is needed), times n / (n - 1) with n the values per channel. Sums are float64 over the float16 values
    training reads, so shards and ranks combine by adding their records (`merge`)."""

    def __init__(self, channels: int):
        self.count = 0
        self.sum = np.zeros(channels, np.float64)
        self.sumsq = np.zeros(channels, np.float64)

    def add(self, moments: np.ndarray) -> None:
        """moments: (2C, H, W) or (B, 2C, H, W) mean ‖ std."""
        m = np.asarray(moments, dtype=np.float64)
        m = m[None] if m.ndim == 3 else m
        mu, sigma = np.split(m, 2, axis=1)
        self.count += mu.shape[0] * mu.shape[2] * mu.shape[3]
        self.sum += mu.sum(axis=(0, 2, 3))
        self.sumsq += (mu * mu + sigma * sigma).sum(axis=(0, 2, 3))

    def merge(self, other: "LatentStats") -> "LatentStats":
        self.count += other.count
        self.sum += other.sum
        self.sumsq += other.sumsq
        return self

    def to_record(self) -> dict:
        return {"count": self.count, "sum": self.sum.tolist(), "sumsq": self.sumsq.tolist()}

    @classmethod
    def from_record(cls, record: dict) -> "LatentStats":
        stats = cls(len(record["sum"]))
        stats.count = int(record["count"])
        stats.sum[:] = record["sum"]
        stats.sumsq[:] = record["sumsq"]
        return stats

    @classmethod
    def combined(cls, records: list) -> "LatentStats | None":
        """The statistics of several parts (shards) from their records (None for a part with no sample): their
        sums added; None when no part has a sample."""
        parts = [cls.from_record(r) for r in records if r]
        return functools.reduce(cls.merge, parts[1:], parts[0]) if parts else None

    def entry(self) -> dict:
        """The manifest's latent.channel_stats: {"mean", "std", "count"}."""
        if self.count < 2:
            raise ValueError(f"per-channel statistics need at least 2 values per channel, got {self.count}")
        mean = self.sum / self.count
        var = (self.sumsq - self.count * mean * mean) / (self.count - 1)
        return {"mean": mean.tolist(), "std": np.sqrt(np.maximum(var, 0.0)).tolist(), "count": self.count}


def latent_entry(autoencoder, shape, stats: "LatentStats | None" = None) -> dict:
    """A dataset manifest's latent entry for moments of `autoencoder` of latent `shape` (C, h, w)."""
    entry = {"autoencoder": autoencoder.id, "scale_factor": autoencoder.scale_factor, "shift": autoencoder.shift,
             "shape": list(shape), "moments": "mean||std float16"}
    if stats is not None:
        entry["channel_stats"] = stats.entry()
    return entry


# ------------------------------------------------------------------------------------------------ autoencoders


def images_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in 0..255 -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def unit_to_images(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] (B, 3, H, W) -> uint8 (B, 3, H, W), clamped and rounded."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class PixelAutoencoder:
    """Exact, weight-free "autoencoder": pixels in [-1, 1] rearranged space-to-depth by `factor`.

    encode: uint8 (B, 3, H, W) -> moments (B, 2 * 3 f^2, H/f, W/f) with std = 0; decode inverts it exactly.
    """

    scale_factor = 1.0
    shift = 0.0

    def __init__(self, factor: int = 4):
        if factor < 1:
            raise ValueError(f"pixel autoencoder factor must be >= 1, got {factor}")
        self.factor = factor
        self.id = f"pixel-s2d{factor}"

    def latent_channels(self) -> int:
        return 3 * self.factor**2

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"image size {h}x{w} is not divisible by the pixel autoencoder factor {self.factor}")
        mean = F.pixel_unshuffle(images_to_unit(images), self.factor)
        return torch.cat([mean, torch.zeros_like(mean)], dim=1)

    def decode_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Its own latents (B, 3f^2, h, w) -> uint8 images (B, 3, fh, fw)."""
        return unit_to_images(F.pixel_shuffle(x.float(), self.factor))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode_raw(latents.float() / self.scale_factor)


class KLAutoencoder:
    """Any diffusers AutoencoderKL by hub id or local path (the SD-VAE sd-vae-ft-ema by default; VA-VAE, REPA-E's
    E2E-VAEs, FLUX's ...): its channels, downsampling and scalar scaling come from its config."""

    def __init__(self, source: str = DEFAULT_VAE, device: str | torch.device = "cpu", vae=None):
        if vae is None:
            require_weights(source, "the autoencoder", "point --vae at it (eval.generate, eval.evaluate, t2i.sample, "
                            "data_prep)")
        from diffusers import AutoencoderKL  # heavy (seconds to import): only when an AutoencoderKL is used

        self.id = source
        self.vae = (vae if vae is not None else AutoencoderKL.from_pretrained(source)).to(device).eval()
        self.vae.requires_grad_(False)
        self.scale_factor, self.shift, _, self.factor = kl_layout(dict(self.vae.config))

    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> (B, 2C, H/f, W/f) float32 posterior mean ‖ std."""
        dist = self.vae.encode(images_to_unit(images).to(self.vae.device, self.vae.dtype)).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1).float()

    @torch.no_grad()
    def decode_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Its own (unscaled) latents (B, C, h, w) -> uint8 images (B, 3, fh, fw)."""
        return unit_to_images(self.vae.decode(x.to(self.vae.device, self.vae.dtype)).sample)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scalar-scaled latents z = (x - shift_factor) * scaling_factor -> uint8 images."""
        return self.decode_raw((latents.float() - self.shift) / self.scale_factor)


SDVAE = KLAutoencoder  # the name of the SD-VAE-only class it grew from


def kl_layout(config: dict) -> tuple[float, float, int, int]:
    """(scale, shift, channels, downsampling) of an AutoencoderKL config: z = x * scale + shift is diffusers'
    (x - shift_factor) * scaling_factor; downsampling 2 per block after the first."""
    scale = float(config.get("scaling_factor") or SD_VAE_SCALE)
    shift = -float(config.get("shift_factor") or 0.0) * scale
    return scale, shift, int(config.get("latent_channels", 4)), 2 ** (len(config.get("block_out_channels", [0] * 4)) - 1)


def kl_config(spec: str) -> dict:
    """The config.json of AutoencoderKL `spec` (a local directory, or a hub id from the hub cache or the hub),
    read without its weights; the SD-VAEs by name without any file."""
    if spec in SD_VAES and not is_local_path(spec):
        return {"latent_channels": 4, "block_out_channels": [128, 256, 512, 512], "scaling_factor": SD_VAE_SCALE}
    path = os.path.join(os.path.expanduser(spec), "config.json")
    if not os.path.isfile(path):
        require_weights(spec, "the autoencoder", "point --vae at a local copy")
        path = hf_hub_download(spec, "config.json", local_files_only=in_hub_cache(spec))
    with open(path) as f:
        return json.load(f)


def latent_layout(spec: str, resolution: int) -> dict:
    """The manifest's "latent" entry of autoencoder `spec` at `resolution` px, without loading any weights:
    pixel-s2dF gives 3F^2 channels at 1/F, an AutoencoderKL what its config says (the SD-VAE: 4 channels at 1/8),
    and C:F C channels at 1/F (a shape without an autoencoder, for benchmarks)."""
    if spec.startswith("pixel"):
        ae = build_autoencoder(spec)
        channels, factor, scale, shift = ae.latent_channels(), ae.factor, ae.scale_factor, 0.0
    elif re.fullmatch(r"\d+:\d+", spec):  # C:F, a shape only (benchmarks on random data)
        (channels, factor), scale, shift = map(int, spec.split(":")), 1.0, 0.0
    else:
        scale, shift, channels, factor = kl_layout(kl_config(spec))
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not divisible by the {spec} downsampling factor {factor}")
    side = resolution // factor
    return {"autoencoder": spec, "scale_factor": scale, "shift": shift, "shape": [channels, side, side],
            "moments": "mean||std float16"}


def build_autoencoder(spec: str, device: str | torch.device = "cpu"):
    """`pixel` / `pixel-s2dF` (weight-free) or an AutoencoderKL hub id / local path."""
    if spec == "pixel":
        return PixelAutoencoder()
    if spec.startswith("pixel-s2d"):
        return PixelAutoencoder(int(spec[len("pixel-s2d"):]))
    return KLAutoencoder(spec, device)
