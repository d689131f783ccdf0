"""The sharded preparation job shared by data_prep.imagenet and data_prep.coco (FORMATS.md).

A job is a sorted list of input items cut into shards of `items_per_shard` consecutive items (`shard_size`
samples; half as many items with flip copies). Shard s belongs to process s % world, so processes need no
communication until the end. For each shard a process loads its images (DataLoader workers: decode, RGB, ADM crop),
encodes them in batches (VAE moments, optional encoder features and caption embeddings), writes a sidecar
`prep/shard-NNNNNN.json` (its skipped/converted inputs and member shapes), then the shard, atomically. A shard
file that exists is finished, so a rerun of the same command skips it and finishes the rest; the main process
writes the manifest last, from the sidecars, once every shard exists.

`prep/job.json` records what the output was made from and with which options; a rerun that differs is refused,
so an output directory never mixes two preparations. A rerun re-reads the inputs a finished shard skipped: when
one has become readable (a file fixed or replaced), that shard is prepared again.

Sample keys are positions in the sorted input list, so they are short and unique by construction whatever the
file names; each sample keeps its input's name (relative to the source folder) as `path.txt`. Before the
manifest is written, the shards are read back and checked against their sidecars.
"""
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from core.fileio import write_json_atomic
from core.latents import LatentStats, latent_entry
from core.shards import ShardFormatError, feature_key, index_shard, read_manifest, shard_name, write_manifest, write_shard
from data_prep.images import Loaded, load_image

log = logging.getLogger("data_prep")
PREP_DIR = "prep"  # sidecars and the job record, inside the dataset directory


class PrepError(RuntimeError):
    """A preparation that cannot start or finish (bad arguments, a mismatching earlier run, missing shards)."""


@dataclass
class Item:
    """One input: sample `key`, image `path`, its `name` relative to the source (stored as path.txt), and what the
    sample carries besides its image."""

    key: str
    path: str
    name: Optional[str] = None
    label: Optional[int] = None  # class_cond
    captions: Optional[list] = None  # t2i
    skip: Optional[str] = None  # known bad before loading (e.g. "no_caption")


@dataclass
class Job:
    """Everything a process needs to prepare its shards."""

    out: str
    items: list
    resolution: int
    shard_size: int = 1000
    flip: bool = False
    store_images: bool = False
    batch_size: int = 64
    workers: int = 0
    record: dict = field(default_factory=dict)  # options and source that define the output (prep/job.json)
    crop: str = "adm"  # data_prep.images.CROPS: ADM's for ImageNet, U-ViT's for COCO
    exif: str = "apply"  # data_prep.images.EXIF_CHOICES: turn photos upright by their EXIF Orientation, or not

    @property
    def items_per_shard(self) -> int:
        return self.shard_size // 2 if self.flip else self.shard_size

    @property
    def num_shards(self) -> int:
        return -(-len(self.items) // self.items_per_shard)

    def shard_items(self, s: int) -> range:
        return range(s * self.items_per_shard, min((s + 1) * self.items_per_shard, len(self.items)))


@dataclass
class Models:
    """The frozen models a job encodes with: autoencoder, named vision encoders, optional text encoder."""

    autoencoder: object
    encoders: list = field(default_factory=list)  # [(name, TargetEncoder)]
    text: object = None  # core.text_encoders.TextEncoder
    text_batch: int = 256


# ------------------------------------------------------------------------------------------------------ job record


def items_digest(items: list) -> str:
    """sha256 over the items' keys, paths, labels and captions: the input a job was made from."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.key, it.path, it.name, it.label, it.captions, it.skip]).encode())
    return h.hexdigest()


def check_job_record(job: Job, write: bool) -> None:
    """Refuse an output directory prepared from other inputs or options; with `write`, record this job there."""
    path = os.path.join(job.out, PREP_DIR, "job.json")
    record = {**job.record, "resolution": job.resolution, "shard_size": job.shard_size, "flip": job.flip,
              "store_images": job.store_images, "exif": job.exif, "num_items": len(job.items),
              "items_sha256": items_digest(job.items)}
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
        if diff:
            raise PrepError(
                f"{job.out} holds a preparation made with other inputs or options ({', '.join(diff)} differ: "
                + "; ".join(f"{k}: {old.get(k)!r} then, {record.get(k)!r} now" for k in diff[:4])
                + "). Use another --out, or delete that directory to start over."
            )
    elif write:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json_atomic(path, record)


# ------------------------------------------------------------------------------------------------------- loading


class _ShardInputs(Dataset):
    """(shard, item index, Loaded) for the items of the given shards, in order; runs in DataLoader workers."""

    def __init__(self, job: Job, shards: list):
        self.job = job
        self.order = [(s, i) for s in shards for i in job.shard_items(s)]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, n: int):
        s, i = self.order[n]
        item = self.job.items[i]
        loaded = (Loaded(None, item.skip) if item.skip
                  else load_image(item.path, self.job.resolution, self.job.crop, self.job.exif))
        return s, i, loaded


def _identity(x):
    return x


def iterate_loaded(job: Job, shards: list):
    """Yield (shard, item index, Loaded) in shard order, decoding in `job.workers` processes."""
    ds = _ShardInputs(job, shards)
    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=job.workers, collate_fn=_identity,
                        prefetch_factor=8 if job.workers else None, persistent_workers=False)
    yield from loader


# ------------------------------------------------------------------------------------------------------ encoding


@torch.no_grad()
def encode_batch(models: Models, images: list, captions: Optional[list], device) -> list[dict]:
    """images: list of uint8 (H, W, 3); captions: per image a list of strings or None -> per image the encoded
    members {"latent.npy": float16 (2C, h, w), "feat_<name>.npy": float16 (N, D), "txt_emb.npy": float16 (K, L, D)}."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().to(device)
    out = [{} for _ in images]
    moments = models.autoencoder.encode_moments(x).cpu().numpy().astype(np.float16)
    for o, m in zip(out, moments):
        o["latent.npy"] = m
    for name, enc in models.encoders:
        feats = enc(x).cpu().numpy().astype(np.float16)
        for o, f in zip(out, feats):
            o[feature_key(name)] = f
    if captions is not None:
        flat = [c for caps in captions for c in caps]
        embs = torch.cat([models.text.encode(flat[i:i + models.text_batch]).cpu()
                          for i in range(0, len(flat), models.text_batch)]).numpy().astype(np.float16)
        start = 0
        for o, caps in zip(out, captions):
            o["txt_emb.npy"] = embs[start:start + len(caps)]
            start += len(caps)
    for o in out:
        for k, v in o.items():
            if not np.isfinite(v).all():  # fp16 overflow or a broken model: fail loudly, never store it
                raise PrepError(f"non-finite values in {k} (float16 overflow?); nothing was written for this shard")
    return out


class _ShardBuilder:
    """Accumulates one shard's samples in input order, encoding in batches."""

    def __init__(self, job: Job, models: Models, device, s: int):
        self.job, self.models, self.device, self.s = job, models, device, s
        self.samples: list[dict] = []
        self.stats = None  # core.latents.LatentStats of the shard's stored moments
        self.pending: list[tuple[dict, np.ndarray, Optional[list]]] = []  # (sample, image, captions)
        self.record = {"shard": shard_name(s), "num_inputs": len(job.shard_items(s)), "skipped": {}, "converted": {},
                       "rotated": [], "keys": []}

    def add(self, item: Item, loaded: Loaded) -> None:
        if loaded.warning:  # PIL's own warning does not say which file it is about
            log.warning("%s: %s", item.path, loaded.warning)
        if loaded.image is None:
            reason, _, detail = loaded.skip.partition(": ")
            self.record["skipped"].setdefault(reason, []).append([item.path, detail])
            log.warning("skipped %s: %s", item.path, loaded.skip)
            return
        if loaded.converted:
            self.record["converted"].setdefault(loaded.converted, []).append(item.path)
        if loaded.rotated:
            self.record["rotated"].append(item.path)
        copies = [(item.key, loaded.image)]
        if self.job.flip:
            copies.append((f"{item.key}_flip", np.ascontiguousarray(loaded.image[:, ::-1])))
        for key, img in copies:
            sample = {"__key__": key}
            self.record["keys"].append(key)
            if item.name is not None:
                sample["path.txt"] = item.name
            if item.label is not None:
                sample["cls"] = item.label
            if item.captions is not None:
                sample["captions.json"] = list(item.captions)
            if self.job.store_images:
                sample["image.png"] = img
            self.pending.append((sample, img, item.captions))
        if len(self.pending) >= self.job.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        samples, images, captions = zip(*self.pending)
        text = list(captions) if self.models.text is not None else None
        for sample, members in zip(samples, encode_batch(self.models, list(images), text, self.device)):
            sample.update(members)
            self.samples.append(sample)
            if self.stats is None:
                self.stats = LatentStats(members["latent.npy"].shape[0] // 2)
            self.stats.add(members["latent.npy"])  # the float16 values training reads
        self.pending = []

    def write(self) -> None:
        """Sidecar first, then the shard (atomic): a shard that exists always has its sidecar."""
        self.flush()
        shapes = {}
        for sample in self.samples[:1]:
            shapes = {k: list(v.shape) for k, v in sample.items() if k.endswith(".npy")}
            if "txt_emb.npy" in shapes:
                shapes["txt_emb.npy"] = shapes["txt_emb.npy"][1:]  # (L, D); K varies per image
        self.record.update(num_samples=len(self.samples), shapes=shapes,
                           latent_stats=self.stats.to_record() if self.stats is not None else None)
        write_json_atomic(sidecar_path(self.job.out, self.s), self.record)
        write_shard(os.path.join(self.job.out, shard_name(self.s)), self.samples)


def sidecar_path(out: str, s: int) -> str:
    return os.path.join(out, PREP_DIR, shard_name(s).replace(".tar", ".json"))


RECHECKED = ("missing_file", "unreadable")  # skip reasons a rerun looks at again: the file may have been fixed


def reopen_fixed_shards(job: Job) -> list[str]:
    """Delete the finished shards that skipped an input which now loads (fixed or replaced since), so this run
    prepares them again, and the manifest with them (the dataset is incomplete until the run ends). Main process,
    before the others start. Returns the inputs found readable."""
    fixed = []
    for s in range(job.num_shards):
        shard, sidecar = os.path.join(job.out, shard_name(s)), sidecar_path(job.out, s)
        if not (os.path.isfile(shard) and os.path.isfile(sidecar)):
            continue
        with open(sidecar) as f:
            skipped = json.load(f)["skipped"]
        again = [p for reason in RECHECKED for p, _ in skipped.get(reason, [])
                 if load_image(p, job.resolution, job.crop, job.exif).image is not None]
        if again:
            log.warning("%s skipped %d input(s) that are readable now (%s): preparing it again", shard_name(s),
                        len(again), ", ".join(again[:3]) + (", ..." if len(again) > 3 else ""))
            os.remove(shard)
            fixed += again
    if fixed and os.path.isfile(os.path.join(job.out, "manifest.json")):
        os.remove(os.path.join(job.out, "manifest.json"))
    return fixed


def rank_shards(job: Job, rank: int, world: int) -> list[int]:
    """Shards of process `rank` (s % world == rank) not yet written."""
    return [s for s in range(job.num_shards)
            if s % world == rank and not os.path.isfile(os.path.join(job.out, shard_name(s)))]


def prepare_rank(job: Job, models: Models, rank: int = 0, world: int = 1, device="cpu",
                 progress: bool = True) -> dict:
    """Write the unfinished shards of process `rank` of `world`. Returns {"images", "samples", "seconds"}."""
    shards = rank_shards(job, rank, world)
    todo = sum(len(job.shard_items(s)) for s in shards)
    done = len([s for s in range(job.num_shards) if s % world == rank]) - len(shards)
    if done:
        log.info("rank %d: %d shard(s) already written, %d to do", rank, done, len(shards))
    t0, samples = time.time(), 0
    bar = tqdm(total=todo, unit="img", desc=f"rank {rank}", disable=not progress, dynamic_ncols=True)
    builder = None
    for s, i, loaded in iterate_loaded(job, shards):
        if builder is None or builder.s != s:
            if builder is not None:
                builder.write()
                samples += len(builder.samples)
            builder = _ShardBuilder(job, models, device, s)
        builder.add(job.items[i], loaded)
        bar.update(1)
    if builder is not None:
        builder.write()
        samples += len(builder.samples)
    bar.close()
    seconds = time.time() - t0
    if todo:
        log.info("rank %d: %d images -> %d samples in %.1f s (%.1f images/s)", rank, todo, samples, seconds,
                 todo / max(seconds, 1e-9))
    return {"images": todo, "samples": samples, "seconds": seconds}


# ------------------------------------------------------------------------------------------------------ manifest


def collect_sidecars(job: Job) -> list[dict]:
    """The sidecar of every shard; PrepError naming the shards still missing."""
    missing = [shard_name(s) for s in range(job.num_shards)
               if not os.path.isfile(os.path.join(job.out, shard_name(s)))]
    if missing:
        raise PrepError(f"{len(missing)} shard(s) are not written yet ({', '.join(missing[:5])}...): a process "
                        "stopped early; rerun the same command to finish them")
    records = []
    for s in range(job.num_shards):
        path = sidecar_path(job.out, s)
        if not os.path.isfile(path):
            raise PrepError(f"{shard_name(s)} has no sidecar {path}; delete the shard and rerun to rebuild it")
        with open(path) as f:
            records.append(json.load(f))
    return records


def summarize(records: list[dict]) -> dict:
    """Totals over shard sidecars: skipped/converted/rotated counts by reason with their file lists, member
    shapes."""
    skipped, converted, skipped_files, converted_files, rotated_files, shapes = {}, {}, {}, {}, [], {}
    for r in records:
        for reason, entries in r["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + len(entries)
            skipped_files.update({path: f"{reason}: {detail}" if detail else reason for path, detail in entries})
        for mode, paths in r["converted"].items():
            converted[mode] = converted.get(mode, 0) + len(paths)
            converted_files.setdefault(mode, []).extend(paths)
        rotated_files += r.get("rotated", [])
        for k, shape in r.get("shapes", {}).items():
            if shapes.setdefault(k, shape) != shape:
                raise PrepError(f"{r['shard']}: member {k} has shape {shape}, other shards {shapes[k]}; the shards "
                                "come from different preparations")
    return {"skipped": skipped, "converted": converted, "skipped_files": skipped_files,
            "converted_files": converted_files, "rotated_files": rotated_files, "shapes": shapes}


def verify_shards(job: Job, records: list[dict]) -> list:
    """Read every shard back: the samples its sidecar lists, each key once in the whole dataset; PrepError naming
    the shard otherwise (what a reader would refuse is refused here, before any manifest says "done"). Returns
    each shard's members (index_shard), for the dataset's index."""
    where: dict[str, str] = {}
    members = []
    for r in records:
        path = os.path.join(job.out, r["shard"])
        try:
            members.append(index_shard(path))
        except ShardFormatError as err:
            raise PrepError(f"{err}; delete it and rerun to prepare it again") from None
        keys = [key for key, _ in members[-1]]
        if len(keys) != r["num_samples"] or keys != r.get("keys", keys):
            raise PrepError(f"{path} holds {len(keys)} samples but its sidecar lists {r['num_samples']}: the shard "
                            "and its sidecar come from different runs; delete both and rerun")
        for key in keys:
            if key in where:
                raise PrepError(f"sample key {key!r} is in both {where[key]} and {r['shard']}")
            where[key] = r["shard"]
    return members


def combined_latent_stats(records: list[dict]):
    """The per-channel latent statistics of the whole set from its shards' sidecars (exact: float64 sums added),
    or None when a shard was prepared before sidecars recorded them (`python -m data_prep.latent_stats` adds them
    from the shards themselves)."""
    if any("latent_stats" not in r for r in records):
        return None
    return LatentStats.combined([r["latent_stats"] for r in records])


def finish_manifest(job: Job, kind: str, autoencoder, features: list, extra: dict,
                    before_manifest: Optional[Callable[[dict], dict]] = None) -> dict:
    """Write the manifest from the sidecars (main process, after every process finished) and print the final
    counts against the input's. `features`: core.shards.feature_record of each stored encoder, checked against
    the shards' member shapes. `before_manifest(totals)` may write dataset files and return manifest keys."""
    records = collect_sidecars(job)
    totals = summarize(records)
    shapes = totals["shapes"]
    if "latent.npy" not in shapes:
        named = "; ".join(f"{p} ({why})" for p, why in list(totals["skipped_files"].items())[:10])
        raise PrepError(f"no sample could be prepared from {len(job.items)} inputs: all were skipped "
                        f"({totals['skipped']}): {named}{' ...' if len(totals['skipped_files']) > 10 else ''}. Fix or replace "
                        "them and rerun (skipped files are read again), or delete the output to start over")
    members = verify_shards(job, records)
    for f in features:
        stored = shapes.get(feature_key(f["name"]))
        if stored != [f["tokens"], f["dim"]]:
            raise PrepError(f"the shards hold {feature_key(f['name'])} of shape {stored}, but {f['spec']!r} gives "
                            f"{[f['tokens'], f['dim']]}: the shards come from another preparation")
    if before_manifest is not None:
        extra = {**extra, **before_manifest(totals)}
    c2, h, w = shapes["latent.npy"]
    stats = combined_latent_stats(records)
    manifest = {
        "kind": kind, "source": job.record.get("source"), "resolution": job.resolution, **extra,
        "shard_size": job.shard_size, "flip": job.flip, "images": job.store_images, "crop": job.crop,
        "exif": job.exif,
        "shards": [{"name": r["shard"], "num_samples": r["num_samples"]} for r in records],
        "latent": latent_entry(autoencoder, [c2 // 2, h, w], stats),
        "features": list(features),
        "inputs": len(job.items), "prepared": len(job.items) - sum(totals["skipped"].values()),
        "skipped": totals["skipped"], "converted": totals["converted"], "rotated": len(totals["rotated_files"]),
        "skipped_files": totals["skipped_files"], "converted_files": totals["converted_files"],
        "rotated_files": totals["rotated_files"],
    }
    write_manifest(job.out, manifest, members)
    manifest = read_manifest(job.out)
    print_counts(manifest)
    return manifest


def _some(names: list, n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def print_counts(m: dict) -> None:
    """The final counts against the input's, with the files skipped, converted and rotated (stdout)."""
    skipped = sum(m["skipped"].values())
    print(f"{m['inputs']} inputs -> {m['prepared']} prepared images -> "
          f"{m['num_samples']} samples in {len(m['shards'])} shards"
          + (" (with flip copies)" if m["flip"] else ""))
    print(f"  skipped {skipped}" + (f": {m['skipped']}" if skipped else ""))
    for mode, paths in m.get("converted_files", {}).items():
        print(f"  converted to RGB from {mode}: {len(paths)} ({_some(paths)})")
    if m.get("exif") == "ignore":
        print("  EXIF orientation ignored (--exif ignore): photos are stored in their stored pixel order")
    elif m.get("rotated"):
        print(f"  turned upright by their EXIF orientation: {m['rotated']} ({_some(m['rotated_files'])})")
    if skipped:
        print(f"  WARNING: {skipped} of {m['inputs']} inputs were skipped: {_some(list(m['skipped_files']))}. "
              "All are listed with the reason under 'skipped_files' in manifest.json; fix or replace them and "
              "rerun the same command to add them (skipped files are read again)")
