"""Reference FID statistics of the real val images (ADM centre crop at the dataset resolution) through eval/fid.py.

The statistics file is named after its extractor; a proxy extractor (an offline stand-in for Inception) is
labelled "proxy" in the file name, the manifest and the printed output, since its FIDs are not comparable to
published ones.
"""
import os
import re

import torch
from torch.utils.data import DataLoader, Dataset

from data_prep.images import load_image
from eval.fid import build_extractor, save_stats, stats_from_images
from data_prep.pipeline import PrepError, _identity, log


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def build_fid_extractor(kind: str, weights=None, device=None):
    """eval.fid's extractor: "inception" (TensorFlow-Inception features, legacy_tensorflow) or "proxy"."""
    try:
        return build_extractor(kind=kind, mode="legacy_tensorflow", weights=weights, device=device or _device())
    except Exception as e:  # e.g. Inception weights that cannot be downloaded offline
        raise PrepError(f"cannot build the {kind} FID feature extractor: {type(e).__name__}: {e}. Pass "
                        "--inception-weights PATH, --fid-features proxy, or --fid-features none") from None


def stats_file_name(extractor, resolution: int) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", str(extractor.name)).strip("-")
    return f"fid_stats_{'proxy_' if extractor.is_proxy else ''}{name}_{resolution}px.npz"


class _Images(Dataset):
    def __init__(self, paths: list, size: int, crop: str, exif: str):
        self.paths, self.size, self.crop, self.exif = paths, size, crop, exif

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return load_image(self.paths[i], self.size, self.crop, self.exif)


def _batches(paths: list, size: int, crop: str, exif: str, batch_size: int, workers: int):
    """uint8 (B, 3, size, size) tensors of the images at `paths`, loaded as the shards were (all readable: the
    shards were made from them)."""
    loader = DataLoader(_Images(paths, size, crop, exif), batch_size=None, num_workers=workers, collate_fn=_identity)
    batch = []
    for path, loaded in zip(paths, loader):
        if loaded.image is None:
            raise PrepError(f"{path} became unreadable since its shard was written: {loaded.skip}")
        batch.append(torch.from_numpy(loaded.image).permute(2, 0, 1))
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def write_fid_stats(job, extractor, skipped_files: dict) -> dict:
    """Statistics (mu, sigma) of the prepared val images -> job.out/<stats file>; returns the manifest entry.
    An existing file (written atomically) is kept, so a rerun does not recompute it."""
    name = stats_file_name(extractor, job.resolution)
    path = os.path.join(job.out, name)
    paths = [it.path for it in job.items if it.path not in skipped_files]
    entry = {"file": name, "extractor": str(extractor.name), "is_proxy": bool(extractor.is_proxy),
             "num_images": len(paths), "resolution": job.resolution, "crop": job.crop, "exif": job.exif}
    label = "PROXY extractor, not comparable to published FIDs" if extractor.is_proxy else "Inception"
    if os.path.isfile(path):
        print(f"FID reference statistics ({label}): {path} exists, kept")
        return entry
    mu, sigma = stats_from_images(_batches(paths, job.resolution, job.crop, job.exif, job.batch_size,
                                           job.workers or 0), extractor)
    save_stats(path, mu, sigma, **{k: v for k, v in entry.items() if k != "file"})  # atomic (temp + rename)
    print(f"FID reference statistics ({label}) of {len(paths)} val images at {job.resolution} px: {path}")
    log.info("fid stats: %s", entry)
    return entry
