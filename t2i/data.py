"""The tiny text-to-image dataset: generated shapes in COCO format, prepared by the real data_prep.coco path."""
import os
import subprocess
import sys

from t2i.shapes import make_shapes_coco


def prepare_coco_split(images: str, captions: str, out: str, resolution: int, text_encoder: str,
                       autoencoder: str, split: str, extra: tuple[str, ...] = ()) -> None:
    """Run `python -m data_prep.coco` on a COCO-format folder in a fresh process (its own device setup, not the
    calling trainer's process group). Raises RuntimeError with data_prep's output if it fails."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "data_prep.coco", "--images", images, "--captions", captions, "--out", out,
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
