"""core.shards.ShardReader reads a sample's members in one read of the span they occupy (the writer puts them one
after the other), and member by member when a foreign writer scattered them."""
import io
import tarfile

import numpy as np

from core.shards import ShardReader, encode_value, write_manifest, write_shard


class CountingReader(ShardReader):
    """A ShardReader whose shard files count their read() calls."""

    reads = 0

    def _file(self, shard):
        f = super()._file(shard)
        reader = self

        class Counted:
            def seek(self, offset):
                return f.seek(offset)

            def read(self, size):
                reader.reads += 1
                return f.read(size)

        return Counted()


def _samples(n=3):
    rng = np.random.default_rng(0)
    return [{"__key__": f"{i:06d}", "latent.npy": rng.standard_normal((8, 4, 4)).astype(np.float16),
             "cls": int(i), "txt": f"caption {i}"} for i in range(n)]


def test_one_read_per_sample_returns_every_member(tmp_path):
    samples = _samples()
    write_shard(str(tmp_path / "shard-000000.tar"), samples)
    write_manifest(str(tmp_path), {"shards": [{"name": "shard-000000.tar", "num_samples": 3}], "latent": {}})
    reader = CountingReader(str(tmp_path))
    for i, want in enumerate(samples):
        before = reader.reads
        got = reader.decoded(i)
        assert reader.reads - before == 1
        assert got["__key__"] == want["__key__"] and got["cls"] == want["cls"] and got["txt"] == want["txt"]
        assert np.array_equal(got["latent.npy"], want["latent.npy"])


def test_scattered_members_are_read_one_by_one(tmp_path):
    """Another tool's shard with sample a's members on either side of a large member of sample b."""
    members = [("a.cls", encode_value("cls", 1)), ("b.txt", b"x" * 20000), ("a.txt", encode_value("txt", "hi")),
               ("b.cls", encode_value("cls", 2))]
    with tarfile.open(tmp_path / "shard-000000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_manifest(str(tmp_path), {"shards": [{"name": "shard-000000.tar", "num_samples": 2}], "latent": {}})
    reader = CountingReader(str(tmp_path))
    a = reader.decoded(0)
    assert reader.reads == 2 and a["cls"] == 1 and a["txt"] == "hi"
    b = reader.decoded(1)
    assert reader.reads == 3 and b["cls"] == 2 and b["txt"] == "x" * 20000  # b's members are contiguous
