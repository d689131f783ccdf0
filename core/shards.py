"""The shard format (data_prep/FORMATS.md): webdataset tar shards plus a JSON manifest, read by random access.

Writers make each shard atomically (a shard is complete or absent), then the sample index (every member's data
offset, INDEX_FILE) and the manifest last. The reader maps the index (or, for a dataset without one, reads the
tar headers once) and then reads any sample by seeking, so the training data order is a pure function of (seed,
step): exact resume and a global shuffle without a shuffle buffer.

Decoding is limited to the extensions of our format (.npy without pickle, .png/.jpg, .cls, .txt, .json).
"""
import errno
import io
import json
import logging
import os
import resource
import tarfile
import time
from collections import OrderedDict

import numpy as np
from PIL import Image

from core.encoders import parse_encoder_spec
from core.fileio import atomic_write, write_json_atomic  # noqa: F401 (re-exported)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_OPEN_SHARDS = 64  # open shard files a reader keeps per process: far below the usual 1024 soft limit on files
INDEX_FILE = "index.npy"  # every sample's shard, key and member offsets: readers need not scan the tar headers
log = logging.getLogger(__name__)


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
        buf = io.BytesIO()
        Image.fromarray(np.asarray(value, dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()
    if ext == "cls":
        return str(int(value)).encode()
    if ext.endswith("txt"):  # a file name that is not valid UTF-8 is kept readable, its odd bytes escaped
        return str(value).encode("utf-8", "backslashreplace")
    if ext.endswith("json"):
        return json.dumps(value).encode("utf-8")
    raise ShardFormatError(f"no encoder for member extension {ext!r}")


def decode_value(ext: str, data: bytes):
    """Inverse of encode_value; .npy never unpickles, images decode to uint8 (H, W, 3) RGB."""
    if ext.endswith(".npy") or ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if ext.endswith((".png", ".jpg", ".jpeg")) or ext in ("png", "jpg", "jpeg"):
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
    interrupted write leaves no shard at `path` (and a previous shard there intact). POSIX pax format: member names
    of any length (plain ustar stops at 100 bytes)."""
    with atomic_write(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
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


def feature_record(spec: str, tokens: int, dim: int) -> dict:
    """The manifest's entry for stored features of encoder `spec` ("NAME[@SOURCE]", as given): member
    feat_<NAME>.npy holds (tokens, dim) patch tokens."""
    return {"name": parse_encoder_spec(spec)[0], "spec": spec.strip(), "tokens": int(tokens), "dim": int(dim)}


def stored_features(root: str, manifest: dict) -> dict[str, dict]:
    """{encoder name: {"name", "spec", "tokens", "dim"}} of the features stored in every sample (FORMATS.md).

    A manifest written before specs were recorded lists bare names: the spec is then taken from the data_prep job
    record (prep/job.json) if there is one, else None (unknown source), and the token count and width from the
    first sample (None if it has no such member or there is no shard to read)."""
    entries = manifest.get("features", [])
    if all(isinstance(e, dict) for e in entries):
        return {e["name"]: e for e in entries}

    job_specs = {}
    try:
        with open(os.path.join(root, "prep", "job.json")) as f:
            job_specs = {parse_encoder_spec(s)[0]: s for s in json.load(f).get("features", [])}
    except (OSError, ValueError):  # no job record (a copied or generated dataset), or an unreadable one
        pass
    first = first_sample(root, manifest)
    out = {}
    for name in entries:
        shape = decode_value("npy", first[feature_key(name)]).shape if feature_key(name) in first else (None, None)
        out[name] = {"name": name, "spec": job_specs.get(name), "tokens": shape[0], "dim": shape[-1]}
    return out


def first_sample(root: str, manifest: dict) -> dict:
    """{ext: bytes} of the first sample of the first shard ({} if the manifest lists no shard)."""
    shards = manifest.get("shards") or []
    members = index_shard(os.path.join(root, shards[0]["name"])) if shards else []
    if not members:
        return {}
    out = {}
    with open(os.path.join(root, shards[0]["name"]), "rb") as f:
        for ext, (offset, size) in members[0][1].items():
            f.seek(offset)
            out[ext] = f.read(size)
    return out


def has_images(root: str, manifest: dict) -> bool:
    """Whether the samples carry image.png: the manifest's "images" (data_prep), else the first sample's members;
    True for a dataset without shards (core.bench's random batches make their own images)."""
    if "images" in manifest:
        return bool(manifest["images"])
    return not manifest.get("shards") or "image.png" in first_sample(root, manifest)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def build_index(root: str, names: list[str], members: list | None = None) -> tuple[np.ndarray, dict]:
    """The sample index of shards `names` of `root`: a structured array with one row per sample, in shard order
    (shard, key, and per member of `exts` its data offset and size, -1 where a sample lacks it), and its header
    for the manifest ({"file", "members", "shard_bytes"}). `members`: each shard's index_shard() when already
    read (data_prep's check reads them), else the tar headers are read here."""
    members = members if members is not None else [index_shard(os.path.join(root, n)) for n in names]
    exts = sorted({ext for shard in members for _, e in shard for ext in e})
    keylen = max([len(key.encode()) for shard in members for key, _ in shard] or [1])
    dtype = np.dtype([("shard", "<i4"), ("key", f"S{keylen}"), ("offset", "<i8", (len(exts),)),
                      ("size", "<i8", (len(exts),))])
    index = np.zeros(sum(len(m) for m in members), dtype)
    index["offset"], index["size"] = -1, -1
    col, row = {ext: j for j, ext in enumerate(exts)}, 0
    offsets, sizes = index["offset"], index["size"]  # views of the fields
    for s, shard in enumerate(members):
        index["shard"][row:row + len(shard)] = s
        for key, e in shard:
            index["key"][row] = key.encode()
            for ext, (offset, size) in e.items():
                offsets[row, col[ext]], sizes[row, col[ext]] = offset, size
            row += 1
    header = {"file": INDEX_FILE, "members": exts,
              "shard_bytes": [os.path.getsize(os.path.join(root, n)) for n in names]}
    return index, header


def write_manifest(root: str, manifest: dict, members: list | None = None) -> None:
    """Write the sample index (INDEX_FILE) and then manifest.json, last, once every shard it lists exists; adds
    format_version, created and the index's header. `members`: each shard's index_shard() when already read; an
    index the manifest already names and that still fits its shards is kept as it is."""
    for shard in manifest["shards"]:
        if not os.path.isfile(os.path.join(root, shard["name"])):
            raise ShardFormatError(f"manifest lists {shard['name']} but {root} has no such shard")
    manifest = {"format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **manifest}
    manifest["num_samples"] = sum(s["num_samples"] for s in manifest["shards"])
    if members is not None or _index_problem(root, manifest) is not None:
        index, manifest["index"] = build_index(root, [s["name"] for s in manifest["shards"]], members)
        with atomic_write(os.path.join(root, INDEX_FILE), "wb") as f:
            np.save(f, index, allow_pickle=False)
    write_json_atomic(os.path.join(root, MANIFEST), manifest)


def _index_problem(root: str, manifest: dict) -> str | None:
    """Why the manifest's sample index cannot be used (None when it can): none recorded, its file missing, or a
    shard whose size is not the recorded one (rewritten since)."""
    header = manifest.get("index")
    if not isinstance(header, dict):
        return "the manifest records no sample index"
    path = os.path.join(root, header.get("file", ""))
    if not os.path.isfile(path):
        return f"its index {path} is missing"
    sizes = header.get("shard_bytes", [])
    if len(sizes) != len(manifest["shards"]):
        return "its index lists another number of shards"
    for shard, size in zip(manifest["shards"], sizes):
        if os.path.getsize(os.path.join(root, shard["name"])) != size:
            return f"{shard['name']} is not the size the index recorded (rewritten since)"
    return None


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
    if isinstance(manifest.get("index"), dict):
        names.append(("index.file", manifest["index"].get("file")))
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

    Where the samples are comes from the dataset's index (INDEX_FILE, named by the manifest), memory-mapped, so
    the processes of a node share one copy in the page cache and no rank reads a tar header. A dataset without
    one (written before it existed), or whose shards changed size since, has its tar headers read instead (with
    a warning for the second). At most `max_open` shard files are open at a time per process (least recently used
    closed first): a dataset has thousands of shards, more than a process may open. Picklable, and safe to fork
    into data-loader workers: each process opens its own files (file offsets are never shared).
    """

    def __init__(self, root: str, max_open: int = MAX_OPEN_SHARDS):
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.root, self.max_open = root, max_open
        self.manifest = read_manifest(root)
        for shard in self.manifest["shards"]:
            if not os.path.isfile(os.path.join(root, shard["name"])):
                raise ShardFormatError(f"manifest of {root!r} lists {shard['name']}, which is missing")
        problem = _index_problem(root, self.manifest)
        if problem is None:
            self.mapped = True
            self.exts = list(self.manifest["index"]["members"])
            self._index = self._load_index()
        else:
            if "index" in self.manifest:  # one was written, so the shards changed after data_prep
                log.warning("%s: %s; reading the shards' tar headers instead", root, problem)
            self.mapped = False
            self._index, header = build_index(root, [s["name"] for s in self.manifest["shards"]])
            self.exts = header["members"]
        counts = np.bincount(self._index["shard"], minlength=len(self.manifest["shards"]))
        for shard, n in zip(self.manifest["shards"], counts):
            if n != shard["num_samples"]:
                raise ShardFormatError(f"{os.path.join(root, shard['name'])}: {n} samples but the manifest says "
                                       f"{shard['num_samples']}")
        self._col = {ext: j for j, ext in enumerate(self.exts)}
        self._files: OrderedDict[int, object] = OrderedDict()  # shard index -> open file, least recent first
        self._pid = os.getpid()

    def _load_index(self) -> np.ndarray:
        index = np.load(os.path.join(self.root, self.manifest["index"]["file"]), mmap_mode="r", allow_pickle=False)
        if index.dtype.names != ("shard", "key", "offset", "size") or index["offset"].shape[1:] != (len(self.exts),):
            raise ShardFormatError(f"{self.root}: {self.manifest['index']['file']} is not a sample index of its "
                                   f"{len(self.exts)} members; delete it and its manifest entry to read the shards")
        return index

    def __len__(self) -> int:
        return len(self._index)

    def key(self, index: int) -> str:
        return self._index["key"][index].decode()

    def keys(self) -> list[str]:
        return [k.decode() for k in self._index["key"]]

    def members(self, index: int) -> dict[str, tuple[int, int]]:
        """{ext: (data offset, size)} of sample `index`."""
        row = self._index[index]
        return {ext: (int(o), int(s)) for ext, o, s in zip(self.exts, row["offset"], row["size"]) if s >= 0}

    def has(self, ext: str) -> np.ndarray:
        """(len,) bool: which samples hold member `ext`."""
        col = self._col.get(ext)
        return np.zeros(len(self), bool) if col is None else self._index["size"][:, col] >= 0

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = OrderedDict(), None
        if self.mapped:  # the map is reopened, not copied, in the process that unpickles it
            state["_index"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._index is None:
            self._index = self._load_index()

    def close(self) -> None:
        """Close this process's open shard files (they reopen on the next read)."""
        while self._files:
            self._files.popitem(last=False)[1].close()

    def _file(self, shard: int):
        if self._pid != os.getpid():  # forked into a worker: close the parent's copies, open our own
            self.close()
            self._pid = os.getpid()
        f = self._files.get(shard)
        if f is not None:
            self._files.move_to_end(shard)
            return f
        while len(self._files) >= self.max_open:
            self._files.popitem(last=False)[1].close()
        path = os.path.join(self.root, self.manifest["shards"][shard]["name"])
        try:
            f = open(path, "rb")
        except OSError as err:
            if err.errno in (errno.EMFILE, errno.ENFILE):
                soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
                raise OSError(err.errno, f"too many open files opening shard {path} (this process may open {soft}; "
                              f"the shard reader holds at most {self.max_open}, so something else holds the "
                              "rest): raise the limit (ulimit -n) or open fewer files") from err
            raise
        self._files[shard] = f
        return f

    def __getitem__(self, index: int) -> dict:
        """Raw members of sample `index`, in one read of the span they occupy (a writer puts a sample's members
        one after the other; a scattered sample is read member by member). An OSError here is the file system's
        (a sample is never read short: a member cut off by a truncated shard raises ShardFormatError)."""
        shard, key, exts = int(self._index["shard"][index]), self.key(index), self.members(index)
        f = self._file(shard)
        start = min(offset for offset, _ in exts.values())
        end = max(offset + size for offset, size in exts.values())
        # between contiguous members lie only tar headers and padding: < 2 KiB each, a pax header included
        contiguous = end - start <= sum(size for _, size in exts.values()) + 2048 * len(exts)
        if contiguous:
            f.seek(start)
            span = f.read(end - start)
        out = {"__key__": key}
        for ext, (offset, size) in exts.items():
            if contiguous:
                out[ext] = span[offset - start:offset - start + size]
            else:
                f.seek(offset)
                out[ext] = f.read(size)
            if len(out[ext]) != size:
                raise ShardFormatError(f"sample {key!r}: member {ext} is cut off ({len(out[ext])} of {size} bytes; "
                                       f"{self.manifest['shards'][shard]['name']} is truncated)")
        return out

    def decoded(self, index: int) -> dict:
        """Decoded sample: {"__key__": key, ext: decoded value}."""
        raw = self[index]
        return {ext: (v if ext == "__key__" else decode_value(ext, v)) for ext, v in raw.items()}
