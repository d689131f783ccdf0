"""The shard format (data_prep/FORMATS.md): webdataset tar shards plus a JSON manifest, read by random access.

Writers make each shard atomically (a shard is complete or absent) and the manifest last. The reader indexes the
tar members once (offsets of each member's data) and then reads any sample by seeking, so the training data order
is a pure function of (seed, step): exact resume and a global shuffle without a shuffle buffer.

Decoding is limited to the extensions of our format (.npy without pickle, .png/.jpg, .cls, .txt, .json).
"""
import io
import json
import os
import tarfile
import time

import numpy as np

from core.fileio import atomic_write, write_json_atomic  # noqa: F401 (re-exported)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ShardFormatError(ValueError):
    """A dataset directory, manifest, shard or sample that does not follow FORMATS.md."""


# ------------------------------------------------------------------------------------------------ encode / decode


def encode_value(ext: str, value) -> bytes:
    """Bytes for one member `key.ext`; the extension decides the encoding."""
    if ext.endswith(".npy") or ext == "npy":
        buf = io.BytesIO()
        np.save(buf, np.asarray(value), allow_pickle=False)
        return buf.getvalue()
    if ext.endswith(".png"):
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.asarray(value, dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()
    if ext == "cls":
        return str(int(value)).encode()
    if ext.endswith("txt"):
        return str(value).encode("utf-8")
    if ext.endswith("json"):
        return json.dumps(value).encode("utf-8")
    raise ShardFormatError(f"no encoder for member extension {ext!r}")


def decode_value(ext: str, data: bytes):
    """Inverse of encode_value; .npy never unpickles, images decode to uint8 (H, W, 3) RGB."""
    if ext.endswith(".npy") or ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if ext.endswith((".png", ".jpg", ".jpeg")) or ext in ("png", "jpg", "jpeg"):
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    if ext == "cls":
        return int(data.decode())
    if ext.endswith("txt"):
        return data.decode("utf-8")
    if ext.endswith("json"):
        return json.loads(data.decode("utf-8"))
    raise ShardFormatError(f"member extension {ext!r} is not part of the shard format (FORMATS.md)")


# ------------------------------------------------------------------------------------------------------- writing


def write_shard(path: str, samples: list[dict]) -> None:
    """Write `samples` (each {"__key__": str, ext: value}) as one tar shard, atomically (core/fileio.py): an
    interrupted write leaves no shard at `path` (and a previous shard there intact)."""
    with atomic_write(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = str(sample["__key__"])
            if "." in key or "/" in key:
                raise ShardFormatError(f"sample key {key!r} must not contain '.' or '/'")
            for ext, value in sample.items():
                if ext == "__key__":
                    continue
                data = encode_value(ext, value)
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: reproducible bytes
                tar.addfile(info, io.BytesIO(data))


def feature_key(encoder_name: str) -> str:
    """Shard member holding precomputed patch tokens of encoder `encoder_name` (its spec without @source)."""
    return f"feat_{encoder_name}.npy"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def write_manifest(root: str, manifest: dict) -> None:
    """Write manifest.json last, once every shard it lists exists; adds format_version and created."""
    for shard in manifest["shards"]:
        if not os.path.isfile(os.path.join(root, shard["name"])):
            raise ShardFormatError(f"manifest lists {shard['name']} but {root} has no such shard")
    manifest = {"format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **manifest}
    manifest["num_samples"] = sum(s["num_samples"] for s in manifest["shards"])
    write_json_atomic(os.path.join(root, MANIFEST), manifest)


# ------------------------------------------------------------------------------------------------------- reading


def read_manifest(root: str) -> dict:
    """The validated manifest of dataset directory `root`; clear errors for a missing or empty dataset."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        raise ShardFormatError(f"dataset directory {root!r} does not exist")
    if not os.path.isfile(path):
        raise ShardFormatError(
            f"dataset directory {root!r} has no {MANIFEST}: it is not a prepared dataset, or its preparation "
            "did not finish (the manifest is written last; rerun data_prep to complete it)"
        )
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardFormatError(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    for key in ("shards", "num_samples", "latent"):
        if key not in manifest:
            raise ShardFormatError(f"{path}: missing key {key!r}")
    if manifest["num_samples"] <= 0 or not manifest["shards"]:
        raise ShardFormatError(f"dataset {root!r} is empty (manifest lists {manifest['num_samples']} samples)")
    # a shared dataset's manifest names files inside its own directory only (no ../ or absolute paths)
    names = [("shards[].name", s.get("name") if isinstance(s, dict) else s) for s in manifest["shards"]]
    names += [(k, manifest[k]) for k in ("null_text_embedding", "fid_captions") if k in manifest]
    if isinstance(manifest.get("fid_stats"), dict):
        names.append(("fid_stats.file", manifest["fid_stats"].get("file")))
    for key, name in names:
        if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
            raise ShardFormatError(f"{path}: {key} {name!r} is not a file name in the dataset directory")
    return manifest


def index_shard(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {ext: (offset, size)})] in file order, from the tar headers only."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, ext = info.name.partition(".")
                samples.setdefault(key, {})[ext] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError) as err:
        raise ShardFormatError(f"shard {path} cannot be read: {err}") from None
    return list(samples.items())


class ShardReader:
    """Random access to the samples of a prepared dataset: `reader[i] -> {ext: bytes}` plus "__key__" (raw, for a
    task's own decode function); `reader.decoded(i)` decodes every member.

    Picklable before first use (file handles open lazily in each data-loader worker).
    """

    def __init__(self, root: str):
        self.root = root
        self.manifest = read_manifest(root)
        self.entries: list[tuple[int, str, dict]] = []  # (shard index, key, {ext: (offset, size)})
        for i, shard in enumerate(self.manifest["shards"]):
            path = os.path.join(root, shard["name"])
            if not os.path.isfile(path):
                raise ShardFormatError(f"manifest of {root!r} lists {shard['name']}, which is missing")
            members = index_shard(path)
            if len(members) != shard["num_samples"]:
                raise ShardFormatError(
                    f"{path}: {len(members)} samples but the manifest says {shard['num_samples']}"
                )
            self.entries.extend((i, key, exts) for key, exts in members)
        self._files: dict[int, object] = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = {}, None
        return state

    def _file(self, shard: int):
        if self._pid != os.getpid():  # forked into a worker: never share file offsets across processes
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = open(os.path.join(self.root, self.manifest["shards"][shard]["name"]), "rb")
        return self._files[shard]

    def __getitem__(self, index: int) -> dict:
        shard, key, exts = self.entries[index]
        f = self._file(shard)
        out = {"__key__": key}
        for ext, (offset, size) in exts.items():
            f.seek(offset)
            out[ext] = f.read(size)
        return out

    def decoded(self, index: int) -> dict:
        """Decoded sample: {"__key__": key, ext: decoded value}."""
        raw = self[index]
        return {ext: (v if ext == "__key__" else decode_value(ext, v)) for ext, v in raw.items()}
