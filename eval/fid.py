"""FID and friends through clean-fid's Inception: FID, Inception Score, precision/recall (ADM definitions).

    python -m eval.fid samples/in256_ode50 --ref VIRTUAL_imagenet256_labeled.npz    # prints FID, writes metrics.json

Features: clean-fid's TorchScript port of the TF Inception (`inception-2015-12-05.pt`), in `legacy_tensorflow`
mode by default (resizing inside the network, as the ADM/TensorFlow evaluator behind the paper's numbers) or
`clean` mode (PIL bicubic resize to 299). The weights come from clean-fid's download, or `--inception-weights` (the
file or its folder) offline. `--features proxy` uses a deterministic random-init network instead: every number it
gives is keyed and printed as "proxy_*" and is not comparable to any published FID.

Reference: an .npz with `mu` and `sigma` (ADM reference batches; files written by `save_stats`), or a folder of
images. Precision/recall need reference images: the ADM batch's `arr_0` or the folder.
sFID (ADM: spatial features of Inception's mixed_6/conv) is reported only for extractors exposing spatial
features; clean-fid's TorchScript Inception does not, so with it sFID is recorded as null with the reason.
"""
import argparse
import glob
import json
import os
import sys
import warnings
import zipfile
import zlib
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from core.fileio import WriteError, atomic_write, write_json_atomic
from core.hub import WeightsUnavailable, reachable
from core.shards import ShardReader, decode_value

INCEPTION_FILE = "inception-2015-12-05.pt"  # clean-fid's name for the TorchScript TF-Inception
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 "inception-2015-12-05.pt")  # where clean-fid downloads it from (cleanfid/downloads_helper.py)
MODES = ("legacy_tensorflow", "clean")
PROXY_LABEL = "PROXY FID (random-init features, not comparable to published FID)"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ------------------------------------------------------------------------------------------------ feature networks


class FeatureExtractor:
    """Callable on uint8 (B, 3, H, W) tensors -> (B, D) float64 pool features.

    name: identifies the features (reference statistics must come from the same); is_proxy: random-init network.
    probs(images) -> (B, K) class probabilities for the Inception Score; spatial(images) -> (B, S) for sFID or None.
    """

    name: str = ""
    is_proxy: bool = False

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def probs(self, images: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def spatial(self, images: torch.Tensor) -> Optional[np.ndarray]:
        return None


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        desc = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"feature extractors take uint8 images (B, 3, H, W), got {desc}")


class InceptionExtractor(FeatureExtractor):
    """clean-fid's TorchScript Inception-v3 (pool3, 2048-d; softmax over 1008 classes for IS)."""

    def __init__(self, mode: str = "legacy_tensorflow", weights: Optional[str] = None, device="cpu"):
        # heavy (cleanfid): imported only when this model is built
        from cleanfid.inception_torchscript import InceptionV3W

        if mode not in MODES:
            raise ValueError(f"FID mode {mode!r} is not one of: {', '.join(MODES)}")
        self.mode, self.device, self.name = mode, torch.device(device), f"inception-{mode}"
        if weights is None:  # clean-fid's default: download to /tmp unless it is there
            folder, download = "/tmp", True
            if not os.path.isfile(os.path.join(folder, INCEPTION_FILE)) and not reachable(INCEPTION_URL):
                raise WeightsUnavailable(f"the Inception network ({INCEPTION_FILE}) is not on this machine and its "
                                         f"download ({INCEPTION_URL}) cannot be reached; fetch it where there is a "
                                         "network and pass --inception-weights FILE (or --features proxy for a "
                                         "labelled stand-in)")
        else:
            folder = weights if os.path.isdir(weights) else os.path.dirname(os.path.abspath(weights))
            download = False
            if not os.path.isfile(os.path.join(folder, INCEPTION_FILE)) or (
                    not os.path.isdir(weights) and os.path.basename(weights) != INCEPTION_FILE):
                raise FileNotFoundError(f"--inception-weights {weights!r}: expected the file {INCEPTION_FILE} "
                                        "(or a folder holding it), clean-fid's TorchScript Inception")
        self.model = InceptionV3W(folder, download=download, resize_inside=mode == "legacy_tensorflow")
        self.model = self.model.to(self.device).eval()

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> float 0..255 as clean-fid feeds it: any size (legacy_tensorflow) or PIL-bicubic 299 (clean)."""
        _check_images(images)
        if self.mode == "legacy_tensorflow":
            return images.to(self.device, torch.float32)
        # heavy (cleanfid imports torchvision and scipy): only where clean-mode resizing is used
        from cleanfid.resize import build_resizer

        resize = build_resizer("clean")
        arr = [resize(img.permute(1, 2, 0).cpu().numpy()).transpose(2, 0, 1) for img in images]
        return torch.from_numpy(np.stack(arr)).to(self.device, torch.float32)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.model(self._prepare(images)).double().cpu().numpy()

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> np.ndarray:
        # The TorchScript net's plain forward is the softmax; no_output_bias as the original IS (and ADM's) code.
        return self.model.base(self._prepare(images), no_output_bias=True).double().cpu().numpy()


class ProxyNet(nn.Module):
    """Random-init conv net standing in for Inception in tests/offline demos: fixed seed, fixed 64-px input."""

    def __init__(self, seed: int = 0, width: int = 32, dim: int = 64, classes: int = 10):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList([nn.Conv2d(3, width, 4, 2, 1), nn.Conv2d(width, width, 4, 2, 1),
                                    nn.Conv2d(width, dim, 4, 2, 1)])
        self.head = nn.Linear(dim, classes)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * (1.0 / max(1, p[0].numel()) ** 0.5)
        self.head.weight.data *= dim**0.5 / 4  # logits of std ~4 on normalised features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, 3, H, W) float 0..255 -> pool (B, dim), spatial (B, 4*8*8), logits (B, classes)."""
        x = F.interpolate(x / 127.5 - 1, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        h1 = F.relu(self.convs[0](x))
        h2 = F.relu(self.convs[1](h1))
        pool = F.relu(self.convs[2](h2)).mean((2, 3))
        spatial = F.adaptive_avg_pool2d(h2[:, :4], 8).flatten(1)
        return pool, spatial, self.head(F.layer_norm(pool, pool.shape[-1:]))  # O(1)-scale logits: IS can vary


class ProxyExtractor(FeatureExtractor):
    """Deterministic random-init features: every metric from it is a proxy (keys "proxy_*")."""

    is_proxy = True

    def __init__(self, device="cpu"):
        self.name, self.device = "proxy-randconv-v1", torch.device(device)
        self.net = ProxyNet().to(self.device).eval()

    @torch.no_grad()
    def _run(self, images: torch.Tensor):
        _check_images(images)
        return self.net(images.to(self.device, torch.float32))

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self._run(images)[0].double().cpu().numpy()

    def probs(self, images: torch.Tensor) -> np.ndarray:
        return self._run(images)[2].softmax(-1).double().cpu().numpy()

    def spatial(self, images: torch.Tensor) -> np.ndarray:
        return self._run(images)[1].double().cpu().numpy()


def build_extractor(kind: str = "inception", mode: str = "legacy_tensorflow", weights: Optional[str] = None,
                    device="cpu") -> FeatureExtractor:
    """kind "inception" (clean-fid TorchScript, `mode` legacy_tensorflow or clean, `weights` a local file/folder or
    None to let clean-fid download) or "proxy" (deterministic random-init network, labelled proxy everywhere)."""
    if kind == "inception":
        return InceptionExtractor(mode, weights, device)
    if kind == "proxy":
        return ProxyExtractor(device)
    raise ValueError(f"feature kind {kind!r} is not one of: inception, proxy")


# ------------------------------------------------------------------------------------------------------ statistics


def stats_from_features(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and covariance (D, D), float64 (needs N >= 2)."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"statistics need at least 2 feature rows (N, D), got shape {feats.shape}")
    return feats.mean(0), np.cov(feats, rowvar=False)


def stats_from_images(batches: Iterable[torch.Tensor], extractor: FeatureExtractor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of `extractor` features over uint8 (B, 3, H, W) batches, accumulated in float64."""
    n, total, outer = 0, None, None
    for batch in batches:
        f = extractor(batch)
        if total is None:
            total, outer = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        n, total, outer = n + len(f), total + f.sum(0), outer + f.T @ f
    if n < 2:
        raise ValueError(f"statistics need at least 2 images, got {n}")
    mu = total / n
    return mu, (outer - n * np.outer(mu, mu)) / (n - 1)


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, **meta) -> None:
    """npz with mu, sigma and string metadata (`extractor` name and `is_proxy` expected among **meta)."""
    for key in ("extractor", "is_proxy"):
        if key not in meta:
            raise ValueError(f"save_stats needs {key}= metadata (the extractor's name / is_proxy)")
    strings = {k: np.array(str(v)) for k, v in meta.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(str(path), "wb") as f:  # a failed write leaves the previous file and no temporary
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **strings)


def read_stats_file(path: str) -> dict:
    """Every array of a statistics .npz (allow_pickle=False); a file lacking mu/sigma is a ValueError."""
    out = read_npz(path)
    missing = [k for k in ("mu", "sigma") if k not in out]
    if missing:
        raise ValueError(f"reference {path!r} lacks {' and '.join(missing)} (keys present: "
                         f"{', '.join(sorted(out)) or 'none'}); expected an ADM reference batch or a save_stats file")
    d = out["mu"].shape[0]
    if out["mu"].ndim != 1 or out["sigma"].shape != (d, d):
        raise ValueError(f"reference {path!r}: mu {out['mu'].shape} and sigma {out['sigma'].shape} do not match")
    return out


def npz_array(data, key: str, path: str) -> np.ndarray:
    """Array `key` of an open .npz (np.load(..., allow_pickle=False)); an object array is a ValueError naming the
    file, never unpickled."""
    try:
        return data[key]
    except ValueError as err:  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
        raise ValueError(f"{path!r}: {key} holds pickled Python objects, which are never loaded ({err})") from None


def open_npz(path: str):
    """np.load of an .npz without pickle; a file that is not one (truncated, another format) is a ValueError naming
    it."""
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path!r} is not a readable .npz (truncated or another format: {err})") from None


def read_npz(path: str) -> dict:
    """Every array of an .npz, read without pickle (see npz_array)."""
    with open_npz(path) as data:
        try:
            return {k: npz_array(data, k, path) for k in data.files}
        except (zipfile.BadZipFile, EOFError, zlib.error) as err:  # a member cut off
            raise ValueError(f"{path!r} is not a readable .npz (a member is cut off: {err})") from None


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    s = read_stats_file(path)
    return s["mu"].astype(np.float64), s["sigma"].astype(np.float64)


def fid_from_stats(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, s1) and N(mu2, s2) (clean-fid's implementation)."""
    # heavy (cleanfid imports torchvision and scipy): only where a distance is computed
    from cleanfid.fid import frechet_distance

    if np.shape(mu1) != np.shape(mu2) or np.shape(s1) != np.shape(s2):
        raise ValueError(f"statistics of different feature sizes: {np.shape(mu1)} vs {np.shape(mu2)}")
    # scipy's sqrtm warns "Matrix is singular" for a rank-deficient covariance (compute_metrics says why in words)
    # and that clean-fid's disp= argument is deprecated: neither is the user's to act on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(frechet_distance(mu1, s1, mu2, s2))


# ------------------------------------------------------------------------------------ Inception Score, prec/recall


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """ADM's IS: exp(mean KL(p(y|x) || p(y))) per split of `split_size` samples, averaged over splits."""
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i:i + split_size]
        kl = part * (np.log(part + 1e-12) - np.log(part.mean(0, keepdims=True) + 1e-12))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def _kth_radius(feats: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row (the row itself is the 0th)."""
    out = []
    for i in range(0, len(feats), chunk):
        d = torch.cdist(feats[i:i + chunk], feats)
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Fraction of `points` inside at least one ball (centre, radius)."""
    inside = []
    for i in range(0, len(points), chunk):
        inside.append((torch.cdist(points[i:i + chunk], centres) <= radii[None]).any(1))
    return float(torch.cat(inside).float().mean())


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019, as ADM's evaluator, k = 3) of sample vs reference
    features (N, D): precision = share of samples inside the reference manifold, recall the converse."""
    if min(len(ref), len(samples)) <= k:
        raise ValueError(f"precision/recall need more than k={k} reference and sample features")
    r, s = torch.from_numpy(np.asarray(ref, np.float64)), torch.from_numpy(np.asarray(samples, np.float64))
    precision = _coverage(s, r, _kth_radius(r, k, chunk), chunk)
    recall = _coverage(r, s, _kth_radius(s, k, chunk), chunk)
    return precision, recall


# ------------------------------------------------------------------------------------------------------ image I/O


def iter_images(source: str, batch_size: int = 100, limit: Optional[int] = None) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, H, W) batches from a folder of images (or its images/ subfolder), an .npz's arr_0 (NHWC), or
    a prepared dataset directory (its image.png members)."""
    if os.path.isfile(source) and source.endswith(".npz"):
        with open_npz(source) as data:
            if "arr_0" not in data.files:
                raise ValueError(f"{source!r} has no arr_0 images (keys: {', '.join(data.files)})")
            arr = npz_array(data, "arr_0", source)[:limit]
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"{source!r}: arr_0 must be uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}")
        for i in range(0, len(arr), batch_size):
            yield torch.from_numpy(arr[i:i + batch_size]).permute(0, 3, 1, 2).contiguous()
        return
    if os.path.isfile(os.path.join(source, "manifest.json")):
        yield from _dataset_images(source, batch_size, limit)
        return
    files = list_images(source)[:limit]
    for i in range(0, len(files), batch_size):
        imgs = [np.asarray(Image.open(f).convert("RGB")) for f in files[i:i + batch_size]]
        yield torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


def _dataset_images(root: str, batch_size: int, limit: Optional[int]) -> Iterator[torch.Tensor]:
    """The image.png members of a prepared dataset (data_prep/FORMATS.md), flipped copies left out."""

    reader = ShardReader(root)
    has_image = reader.has("image.png")
    keep = [i for i, key in enumerate(reader.keys()) if not key.endswith("_flip") and has_image[i]]
    if not keep:
        raise ValueError(f"dataset {root!r} stores no image.png members to use as reference images")
    keep = keep[:limit]
    for b in range(0, len(keep), batch_size):
        imgs = [decode_value("image.png", reader[i]["image.png"]) for i in keep[b:b + batch_size]]
        yield torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


def list_images(folder: str) -> list[str]:
    sub = os.path.join(folder, "images")
    folder = sub if os.path.isdir(sub) else folder
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is neither an image folder nor an .npz file")
    files = sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in {folder!r}")
    return files


def collect(batches: Iterable[torch.Tensor], extractor: FeatureExtractor, want_probs: bool,
            want_spatial: bool) -> dict:
    """Pool features (and probs, spatial features when asked and available) of every batch, stacked."""
    out = {"pool": [], "probs": [], "spatial": []}
    for batch in batches:
        out["pool"].append(extractor(batch))
        if want_probs:
            out["probs"].append(extractor.probs(batch))
        if want_spatial and (s := extractor.spatial(batch)) is not None:
            out["spatial"].append(s)
    return {k: np.concatenate(v) for k, v in out.items() if v}


# ------------------------------------------------------------------------------------------------------- metrics


def load_reference(ref: str, extractor: FeatureExtractor, batch_size: int, need_feats: bool) -> dict:
    """{"mu", "sigma", optional "feats" (pool), "mu_s", "sigma_s"} of a reference .npz or image folder."""
    if os.path.isfile(ref):
        stats = read_stats_file(ref)
        recorded = str(stats["extractor"]) if "extractor" in stats else None
        if recorded is None and extractor.is_proxy:
            raise ValueError(f"reference {ref!r} has no extractor metadata (an ADM batch: Inception features); "
                             f"it cannot be compared with {extractor.name} features. Use a proxy reference folder "
                             "or .npz written by save_stats with the proxy extractor")
        if recorded is None and extractor.name != "inception-legacy_tensorflow":
            # an ADM batch's statistics come from TensorFlow's Inception, which resizes inside the network: only
            # legacy_tensorflow mode computes the samples' features the same way
            raise ValueError(f"reference {ref!r} has no extractor metadata (an ADM reference batch: TensorFlow "
                             f"Inception statistics); compare it in --mode legacy_tensorflow, not with "
                             f"{extractor.name} features, or use a reference written by save_stats in that mode")
        if recorded is not None and recorded != extractor.name:
            raise ValueError(f"reference {ref!r} holds {recorded} statistics; these samples use {extractor.name}")
        out = {"mu": stats["mu"].astype(np.float64), "sigma": stats["sigma"].astype(np.float64),
               "num": next((int(stats[k]) for k in ("num", "num_images") if k in stats), None)}
        if "mu_s" in stats and "sigma_s" in stats:
            out["mu_s"], out["sigma_s"] = stats["mu_s"], stats["sigma_s"]
        if need_feats and "arr_0" in stats:
            out["feats"] = collect(iter_images(ref, batch_size), extractor, False, False)["pool"]
        return out
    feats = collect(iter_images(ref, batch_size), extractor, False, True)
    mu, sigma = stats_from_features(feats["pool"])
    out = {"mu": mu, "sigma": sigma, "feats": feats["pool"], "num": len(feats["pool"])}
    if "spatial" in feats:
        out["mu_s"], out["sigma_s"] = stats_from_features(feats["spatial"])
    return out


def compute_metrics(samples: str, ref: str, extractor: FeatureExtractor, batch_size: int = 100,
                    inception_score_: bool = True, prec_recall: bool = True, limit: Optional[int] = None) -> dict:
    """Every metric of samples vs reference; keys get a "proxy_" prefix when the extractor is a proxy."""
    ref_stats = load_reference(ref, extractor, batch_size, prec_recall)
    feats = collect(iter_images(samples, batch_size, limit), extractor, inception_score_, "mu_s" in ref_stats)
    mu, sigma = stats_from_features(feats["pool"])
    m: dict = {"fid": fid_from_stats(mu, sigma, ref_stats["mu"], ref_stats["sigma"])}
    n, d = len(feats["pool"]), mu.shape[0]
    if n <= d:
        m["small_sample_note"] = (f"{n} samples of {d}-dimensional features: their covariance is singular (it needs "
                                  f"more than {d} samples), so this FID, and precision/recall from so few samples, "
                                  "only compare runs of the same size; published FIDs use 50000 (ImageNet) or "
                                  "30000 (COCO)")
    if "spatial" in feats:
        m["sfid"] = fid_from_stats(*stats_from_features(feats["spatial"]), ref_stats["mu_s"], ref_stats["sigma_s"])
    else:
        m["sfid"] = None
        m["sfid_note"] = ("reference has no spatial statistics (mu_s/sigma_s)" if "mu_s" not in ref_stats else
                          f"{extractor.name} exposes no spatial (mixed_6/conv) features")
    if inception_score_:
        m["inception_score"] = inception_score(feats["probs"])
    if prec_recall and "feats" in ref_stats:
        m["precision"], m["recall"] = precision_recall(ref_stats["feats"], feats["pool"])
    elif prec_recall:
        m["precision"] = m["recall"] = None
        m["precision_recall_note"] = "reference has statistics only; precision/recall need its images (arr_0)"
    prefix = "proxy_" if extractor.is_proxy else ""
    out = {prefix + k if not k.endswith("_note") else k: v for k, v in m.items()}
    out.update(num_samples=len(feats["pool"]), num_reference=ref_stats["num"], features=extractor.name,
               is_proxy=extractor.is_proxy, reference=os.path.abspath(ref), samples=os.path.abspath(samples))
    if extractor.is_proxy:
        out["note"] = PROXY_LABEL
    return out


def generation_record(samples: str) -> Optional[dict]:
    """The samples directory's own generation.json (sampler settings, checkpoint step), if any."""
    path = os.path.join(samples if os.path.isdir(samples) else os.path.dirname(samples), "generation.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def format_metrics(m: dict) -> str:
    if m["is_proxy"]:
        lines = [f"{PROXY_LABEL}: {m['proxy_fid']:.4f}"]
        keys = [k for k in m if k.startswith("proxy_") and k != "proxy_fid"]
    else:
        lines = [f"FID: {m['fid']:.4f}  ({m['features']}, {m['num_samples']} samples)"]
        keys = [k for k in ("sfid", "inception_score", "precision", "recall") if k in m]
    lines += [f"{k}: {m[k]:.4f}" if m[k] is not None else f"{k}: n/a" for k in keys]
    if m.get("small_sample_note"):
        lines.append(f"note: {m['small_sample_note']}")
    return "\n".join(lines)


def write_metrics(path: str, metrics: dict) -> None:
    """metrics.json, atomically: a failed write leaves the previous file intact and raises a WriteError."""
    write_json_atomic(path, metrics)


def add_metric_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ref", required=True,
                   help="reference .npz (mu, sigma; ADM batch or save_stats), image folder, or prepared dataset dir")
    p.add_argument("--mode", choices=MODES, default="legacy_tensorflow", help="clean-fid mode (paper: legacy_tensorflow)")
    p.add_argument("--features", choices=("inception", "proxy"), default="inception",
                   help="proxy: random-init network, for offline tests; every number is labelled proxy")
    p.add_argument("--inception-weights", default=None, help=f"local {INCEPTION_FILE} (or its folder), offline")
    p.add_argument("--fid-batch-size", type=int, default=100)
    p.add_argument("--no-is", action="store_true", help="skip the Inception Score")
    p.add_argument("--no-prec-recall", action="store_true", help="skip precision/recall")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def evaluate_samples(args: argparse.Namespace, samples: str, out: Optional[str] = None) -> dict:
    """Metrics of `samples` per the parsed metric args; prints them and writes metrics.json. Returns the dict."""
    extractor = build_extractor(args.features, args.mode, args.inception_weights, args.device)
    metrics = compute_metrics(samples, args.ref, extractor, args.fid_batch_size, not args.no_is,
                              not args.no_prec_recall)
    metrics["mode"] = None if extractor.is_proxy else args.mode
    record = generation_record(samples)
    if record is not None:
        metrics["generation"] = record
        metrics["checkpoint_step"] = record.get("step")
        if record.get("num_samples") not in (None, metrics["num_samples"]):
            print(f"warning: generation.json says {record['num_samples']} samples, found {metrics['num_samples']}",
                  file=sys.stderr)
    out = out or os.path.join(samples if os.path.isdir(samples) else os.path.dirname(samples), "metrics.json")
    write_metrics(out, metrics)
    print(format_metrics(metrics))
    print(f"wrote {out}")
    return metrics


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="FID (+ sFID, IS, precision/recall) of a samples folder or .npz")
    p.add_argument("samples", help="eval.generate output dir, a folder of images, or an .npz with arr_0")
    p.add_argument("--out", default=None, help="metrics JSON (default: SAMPLES/metrics.json)")
    add_metric_args(p)
    args = p.parse_args(argv)
    try:
        evaluate_samples(args, args.samples, args.out)
    except (ValueError, FileNotFoundError, WriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
