"""The dataset's sample index (core.shards.INDEX_FILE): written with the manifest, read memory-mapped instead of
every rank scanning every tar header, the same samples as a scan, and a scan again when the shards changed."""
import json
import logging
import os
import pickle
import shutil

import numpy as np
import pytest

from class_cond.data import make_synthetic_class_cond
from core import shards
from core.shards import INDEX_FILE, ShardReader, read_manifest, shard_name, write_manifest, write_shard


def _raw(reader) -> list[dict]:
    return [reader[i] for i in range(len(reader))]


def _drop_index(root) -> None:
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    del manifest["index"]
    json.dump(manifest, open(os.path.join(root, "manifest.json"), "w"))


def test_the_index_gives_the_samples_a_scan_gives_without_reading_a_tar_header(tmp_path, monkeypatch):
    root = tmp_path / "d"
    make_synthetic_class_cond(str(root), 10, 2, 16, shard_size=4)
    m = read_manifest(str(root))
    assert m["index"]["file"] == INDEX_FILE and m["index"]["members"] == ["cls", "image.png", "latent.npy"]
    assert m["index"]["shard_bytes"] == [os.path.getsize(root / shard_name(s)) for s in range(3)]
    scanned = tmp_path / "scanned"
    os.makedirs(scanned)
    for name in os.listdir(root):
        if name.endswith(".tar"):
            os.link(root / name, scanned / name)
    shutil.copy(root / "manifest.json", scanned / "manifest.json")  # a copy: the next line edits it
    _drop_index(scanned)

    def no_scan(path):
        raise AssertionError(f"a tar header was read: {path}")

    with monkeypatch.context() as patch:
        patch.setattr(shards, "index_shard", no_scan)
        mapped = ShardReader(str(root))
        assert mapped.mapped and len(mapped) == 10
        raw = _raw(mapped)
        again = pickle.loads(pickle.dumps(mapped))  # a spawned data-loader worker reopens the map
        assert again.mapped and _raw(again) == raw
    plain = ShardReader(str(scanned))
    assert not plain.mapped and _raw(plain) == raw
    assert mapped.keys() == plain.keys() == [f"{i:08d}" for i in range(10)]
    assert mapped.members(5) == plain.members(5) and mapped.key(9) == "00000009"
    assert mapped.has("image.png").all() and not mapped.has("feat_dinov2-b.npy").any()
    assert isinstance(mapped._index, np.memmap)  # shared through the page cache, not a per-process copy


def test_a_shard_rewritten_after_the_index_is_read_from_its_headers_with_a_warning(tmp_path, caplog):
    root = tmp_path / "d"
    make_synthetic_class_cond(str(root), 8, 2, 16, shard_size=4)
    before = ShardReader(str(root))[5]
    samples = [{"__key__": f"x{i}", "cls": 1, "latent.npy": np.ones((12, 8, 8), np.float16), "extra.txt": "longer"}
               for i in range(4)]
    write_shard(str(root / shard_name(1)), samples)  # same count, other bytes: the index no longer fits
    with caplog.at_level(logging.WARNING, logger="core.shards"):
        reader = ShardReader(str(root))
    assert not reader.mapped and "shard-000001.tar is not the size the index recorded" in caplog.text
    assert reader.key(5) == "x1" and reader[5]["extra.txt"] == b"longer" and reader[5] != before
    # rewriting the manifest (as data_prep does) rebuilds the index
    write_manifest(str(root), read_manifest(str(root)))
    assert ShardReader(str(root)).mapped and ShardReader(str(root)).key(5) == "x1"


def test_an_index_that_is_not_one_is_refused_naming_the_fix(tmp_path):
    root = tmp_path / "d"
    make_synthetic_class_cond(str(root), 4, 2, 16)
    np.save(root / INDEX_FILE, np.zeros(4))
    with pytest.raises(shards.ShardFormatError, match="is not a sample index"):
        ShardReader(str(root))
    manifest = json.load(open(root / "manifest.json"))
    manifest["index"]["file"] = "../index.npy"
    json.dump(manifest, open(root / "manifest.json", "w"))
    with pytest.raises(shards.ShardFormatError, match="index.file '../index.npy' is not a file name"):
        read_manifest(str(root))
