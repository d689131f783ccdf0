"""Latent spaces: stored VAE posterior moments, the SD-VAE (diffusers AutoencoderKL), and a weight-free
pixel space-to-depth autoencoder.

Shards store posterior moments (mean ‖ std along channels, float16). Training draws a fresh latent each step,
z = (mean + std * eps) * scale + shift, with scale 0.18215 for SD-VAE (the REPA reference's train.py and
generate.py) and 1 for the pixel space.
"""
import torch
import torch.nn.functional as F

from core.draws import RowDraws, as_draws
from core.hub import require_weights

SD_VAE_SCALE = 0.18215  # Rombach et al.; used by SiT/REPA with SD-VAE latents
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # the REPA reference's generate.py decodes with sd-vae-ft-ema (--vae ema)


def sample_latents(moments: torch.Tensor, generator: RowDraws | torch.Generator, scale: float,
                   shift: float = 0.0) -> torch.Tensor:
    """moments: (B, 2C, H, W) mean ‖ std -> (B, C, H, W) float32 latents scaled for the model."""
    mean, std = moments.float().chunk(2, dim=1)
    eps = as_draws(generator).randn(mean.shape, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps) * scale + shift


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

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return unit_to_images(F.pixel_shuffle(latents.float() / self.scale_factor, self.factor))


class SDVAE:
    """SD-VAE through diffusers' AutoencoderKL (hub id or local path; sd-vae-ft-ema by default)."""

    scale_factor = SD_VAE_SCALE

    def __init__(self, source: str = DEFAULT_VAE, device: str | torch.device = "cpu", vae=None):
        if vae is None:
            require_weights(source, "the autoencoder", "point --vae at it (eval.generate, eval.evaluate, t2i.sample, "
                            "data_prep)")
        from diffusers import AutoencoderKL  # heavy (seconds to import): only when an SD-VAE is used

        self.id = source
        self.vae = (vae if vae is not None else AutoencoderKL.from_pretrained(source)).to(device).eval()
        self.vae.requires_grad_(False)

    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> (B, 2C, H/8, W/8) float32 posterior mean ‖ std."""
        dist = self.vae.encode(images_to_unit(images).to(self.vae.device, self.vae.dtype)).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> uint8 images (B, 3, 8h, 8w)."""
        x = self.vae.decode(latents.to(self.vae.device, self.vae.dtype) / self.scale_factor).sample
        return unit_to_images(x)


def latent_layout(spec: str, resolution: int) -> dict:
    """The manifest's "latent" entry of autoencoder `spec` at `resolution` px, without loading any weights:
    pixel-s2dF gives 3F^2 channels at 1/F, anything else is taken for an SD-VAE (4 channels at 1/8)."""
    if spec.startswith("pixel"):
        ae = build_autoencoder(spec)
        channels, factor, scale = ae.latent_channels(), ae.factor, ae.scale_factor
    else:
        channels, factor, scale = 4, 8, SD_VAE_SCALE
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not divisible by the {spec} downsampling factor {factor}")
    side = resolution // factor
    return {"autoencoder": spec, "scale_factor": scale, "shift": 0.0, "shape": [channels, side, side],
            "moments": "mean||std float16"}


def build_autoencoder(spec: str, device: str | torch.device = "cpu"):
    """`pixel` / `pixel-s2dF` (weight-free) or an AutoencoderKL hub id / local path."""
    if spec == "pixel":
        return PixelAutoencoder()
    if spec.startswith("pixel-s2d"):
        return PixelAutoencoder(int(spec[len("pixel-s2d"):]))
    return SDVAE(spec, device)
