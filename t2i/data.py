"""Text-to-image data: the empty caption's stored embedding, and the tiny generated dataset (shapes in COCO
format, prepared by the real data_prep.coco path)."""
import os
import subprocess
import sys

import numpy as np
import torch

from core.shards import ShardFormatError
from data_prep import coco
from t2i.shapes import make_shapes_coco


def load_null_context(root: str, manifest: dict) -> torch.Tensor:
    """The empty caption's token embeddings (L, D) float32, stored once per dataset (FORMATS.md)."""
    name = manifest.get("null_text_embedding")
    if not name or not os.path.isfile(os.path.join(root, name)):
        raise ShardFormatError(f"dataset {root!r} has no empty-caption embedding (manifest 'null_text_embedding')")
    return torch.from_numpy(np.load(os.path.join(root, name), allow_pickle=False).astype(np.float32))


def prepare_coco_split(images: str, captions: str, out: str, resolution: int, text_encoder: str,
                       autoencoder: str, split: str, extra: tuple[str, ...] = ()) -> None:
    """Run `python -m data_prep.coco` on a COCO-format folder in a fresh process (its own device setup, not the
    calling trainer's process group). Raises RuntimeError with data_prep's output if it fails."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, "-m", coco.__name__, "--images", images, "--captions", captions, "--out", out,
           "--resolution", str(resolution), "--split", split, "--text-encoder", text_encoder, "--vae", autoencoder,
           "--store-images", "--shard-size", "256", "--workers", "0", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def make_synthetic_t2i(root: str, num_samples: int, resolution: int, text_encoder: str, autoencoder: str,
                       seed: int = 0, text_tokens: int | None = None) -> None:
    """root/raw: generated shapes images + COCO captions; root/train and root/val: their prepared datasets.

    The val split gets an eighth of the train size, its FID caption list, and reference statistics from
    random-init (proxy) features, labelled as such.
    """
    raw = os.path.join(root, "raw")
    for split, n in (("train", num_samples), ("val", max(8, num_samples // 8))):
        images, captions = make_shapes_coco(raw, split, n, resolution, seed)
        extra = ("--fid-features", "proxy") if split == "val" else ()
        extra += ("--text-tokens", str(text_tokens)) if text_tokens is not None else ()
        prepare_coco_split(images, captions, os.path.join(root, split), resolution, text_encoder, autoencoder,
                           split, extra)
