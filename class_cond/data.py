"""Class-conditional data: prepared ImageNet shards (FORMATS.md) and a generated tiny learnable set."""
import os

import numpy as np
import torch

from core.latents import LatentStats, PixelAutoencoder, latent_entry
from core.data import decode_training_sample
from core.shards import decode_value, shard_name, write_manifest, write_shard


def decode_class_cond(raw: dict, need_image: bool, feature_keys: tuple[str, ...]) -> dict:
    """Shard sample -> {"moments": (2C, h, w) as stored, "label": int64, ["image"], ["feats"]} (core/data.py)."""
    out = decode_training_sample(raw, ("cls",), need_image, feature_keys)
    out["label"] = torch.tensor(decode_value("cls", raw["cls"]), dtype=torch.long)
    return out


# The generated set: each class is a background colour with a square of a second colour at a random place, so a
# class-conditional model can learn it quickly (the class mean explains most of the variance).
_PALETTE = np.array([[220, 40, 40], [40, 180, 60], [40, 80, 220], [230, 200, 40], [200, 60, 200], [40, 200, 200],
                     [240, 140, 30], [120, 120, 120], [250, 250, 250], [20, 20, 20]], dtype=np.int64)


def synthetic_image(label: int, rng: np.random.Generator, resolution: int) -> np.ndarray:
    """uint8 (H, W, 3) image of class `label` (< 10 * 9 classes)."""
    bg = _PALETTE[label % len(_PALETTE)]
    fg = _PALETTE[(label % len(_PALETTE) + 1 + label // len(_PALETTE)) % len(_PALETTE)]  # != bg below 90
    img = np.empty((resolution, resolution, 3), dtype=np.int64)
    img[:] = bg
    size = resolution // 3
    y, x = rng.integers(0, resolution - size + 1, size=2)
    img[y:y + size, x:x + size] = fg
    img += rng.integers(-12, 13, size=img.shape)  # mild noise so no two samples are identical
    return img.clip(0, 255).astype(np.uint8)


SYNTHETIC_FACTOR = 2  # the generated set's latents: exact 2x2 space-to-depth pixels (pixel-s2d2)


def make_synthetic_class_cond(root: str, num_samples: int, num_classes: int, resolution: int, seed: int = 0,
                              factor: int = SYNTHETIC_FACTOR, shard_size: int = 256) -> dict:
    """Write a class-conditional dataset of generated images in the shard format and return its manifest.

    Latents come from the exact pixel space-to-depth autoencoder (no weights needed); images are stored too, so
    the REPA encoder can run on them.
    """
    if num_classes > 90:
        raise ValueError(f"the generated set supports at most 90 classes, got {num_classes}")
    os.makedirs(root, exist_ok=True)
    ae = PixelAutoencoder(factor)
    rng = np.random.default_rng(seed)
    shards, stats = [], LatentStats(ae.latent_channels())
    for s, start in enumerate(range(0, num_samples, shard_size)):
        samples = []
        for i in range(start, min(start + shard_size, num_samples)):
            label = i % num_classes
            img = synthetic_image(label, rng, resolution)
            moments = ae.encode_moments(torch.from_numpy(img).permute(2, 0, 1)[None])[0]
            samples.append({"__key__": f"{i:08d}", "latent.npy": moments.numpy().astype(np.float16),
                            "cls": label, "image.png": img})
            stats.add(samples[-1]["latent.npy"])
        write_shard(os.path.join(root, shard_name(s)), samples)
        shards.append({"name": shard_name(s), "num_samples": len(samples)})
    h = resolution // factor
    manifest = {
        "kind": "class_cond", "source": f"generated (seed {seed})", "resolution": resolution,
        "num_classes": num_classes, "shards": shards, "features": [],
        "latent": latent_entry(ae, [ae.latent_channels(), h, h], stats),
    }
    write_manifest(root, manifest)
    return manifest
