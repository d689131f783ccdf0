"""Shard format, resumable sampling, corrupt-sample handling, latents and EMA."""
import errno
import os
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import torch

from class_cond.data import decode_class_cond, make_synthetic_class_cond
from conftest import REPO, cpu_env, run_train
from core.data import SkippingDataset, StepSampler
from core.ema import EMA
from core.latents import PixelAutoencoder, SDVAE, sample_latents
from core.logging import read_metrics
from core.shards import (ShardFormatError, ShardReader, read_manifest, shard_name, write_manifest, write_shard)


def test_shard_round_trip_and_random_access(tmp_path):
    samples = [{"__key__": f"{i:04d}", "latent.npy": np.full((2, 3), i, np.float16), "cls": i % 3,
                "image.png": np.full((4, 4, 3), 10 * i, np.uint8), "meta.json": {"i": i}} for i in range(5)]
    write_shard(str(tmp_path / shard_name(0)), samples[:3])
    write_shard(str(tmp_path / shard_name(1)), samples[3:])
    write_manifest(str(tmp_path), {"shards": [{"name": shard_name(0), "num_samples": 3},
                                              {"name": shard_name(1), "num_samples": 2}], "latent": {}})
    reader = ShardReader(str(tmp_path))
    assert len(reader) == 5 and read_manifest(str(tmp_path))["num_samples"] == 5
    for i in (4, 0, 3):  # any order
        s = reader.decoded(i)
        assert s["__key__"] == f"{i:04d}" and s["cls"] == i % 3 and s["meta.json"] == {"i": i}
        assert s["latent.npy"].dtype == np.float16 and (s["latent.npy"] == i).all()
        assert s["image.png"].shape == (4, 4, 3) and (s["image.png"] == 10 * i).all()
    # the shards are plain webdataset tars: key.ext members
    with tarfile.open(tmp_path / shard_name(1)) as tar:
        assert tar.getnames()[:2] == ["0003.latent.npy", "0003.cls"]


def test_shard_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / shard_name(0))
    write_shard(path, [{"__key__": "a", "cls": 1}])
    before = open(path, "rb").read()
    import core.shards as shards

    def failing(ext, value):  # a writer that dies half-way through the shard
        if value == 2:
            raise OSError("disk full")
        return str(value).encode()

    monkeypatch.setattr(shards, "encode_value", failing)
    with pytest.raises(OSError, match="disk full"):
        write_shard(path, [{"__key__": "a", "cls": 1}, {"__key__": "b", "cls": 2}])
    assert open(path, "rb").read() == before  # the previous shard is intact
    assert os.listdir(tmp_path) == [shard_name(0)]  # no temporary left behind


def test_no_pickle_decoding(tmp_path):
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    from core.shards import decode_value

    with pytest.raises(ValueError, match="allow_pickle=False"):
        decode_value("latent.npy", buf.getvalue())
    with pytest.raises(ShardFormatError, match="'pyd' is not part of the shard format"):
        decode_value("pyd", b"...")


def test_missing_and_empty_datasets_are_clear_errors(tmp_path):
    with pytest.raises(ShardFormatError, match="does not exist"):
        ShardReader(str(tmp_path / "nope"))
    with pytest.raises(ShardFormatError, match="has no manifest.json: it is not a prepared dataset"):
        ShardReader(str(tmp_path))
    write_manifest(str(tmp_path), {"shards": [], "latent": {}})
    with pytest.raises(ShardFormatError, match="is empty"):
        ShardReader(str(tmp_path))


def test_missing_shard_and_count_mismatch(tmp_path):
    make_synthetic_class_cond(str(tmp_path), 6, 2, 16, shard_size=4)
    os.remove(tmp_path / shard_name(1))
    with pytest.raises(ShardFormatError, match="lists shard-000001.tar, which is missing"):
        ShardReader(str(tmp_path))


def test_sampler_is_a_function_of_step_and_rank():
    n, gb, world = 10, 4, 2
    streams = [StepSampler(n, gb, world, r, seed=3) for r in range(world)]
    draws = [[next(it) for _ in range(2 * 10)] for it in map(iter, streams)]  # 10 steps x 2 per rank
    first = [[index for index, _ in d] for d in draws]
    positions = sorted(p for d in draws for _, p in d)
    assert positions == list(range(40))  # every stream position drawn once, by one rank
    # ranks are disjoint within a step and together cover each epoch exactly once
    epoch0 = first[0][:2] + first[1][:2] + first[0][2:4] + first[1][2:4] + first[0][4:5] + first[1][4:5]
    per_step = [first[0][2 * s:2 * s + 2] + first[1][2 * s:2 * s + 2] for s in range(10)]
    flat = [i for step in per_step for i in step]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new permutation each epoch
    # resuming at step 3 continues the same stream
    resumed = iter(StepSampler(n, gb, world, 1, seed=3, start_step=3))
    assert [next(resumed) for _ in range(4)] == draws[1][6:10]
    assert epoch0  # (kept for readability of the layout above)


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    make_synthetic_class_cond(str(tmp_path), 8, 2, 16, shard_size=8)
    reader = ShardReader(str(tmp_path))
    bad = {3, 4}
    original = reader.__class__.__getitem__

    class Flaky(ShardReader):
        def __getitem__(self, i):
            raw = original(self, i)
            if i in bad:
                raw["image.png"] = raw["image.png"][:20]  # truncated PNG
            return raw

    flaky = Flaky(str(tmp_path))
    ds = SkippingDataset(flaky, lambda raw, _: decode_class_cond(raw, True, ()))
    s = ds[3, 0]
    assert s["skipped"] == 2 and s["label"].item() == 5 % 2  # index 5 served instead
    assert ds[2, 0]["skipped"] == 0
    missing = SkippingDataset(reader, lambda raw, _: decode_class_cond(raw, False, ("feat_dinov2-b.npy",)))
    with pytest.raises(RuntimeError, match="consecutive samples"):
        missing[0, 0]


def test_training_counts_corrupt_samples(tmp_path, tiny_args):
    data = tmp_path / "data"
    make_synthetic_class_cond(str(data), 64, 4, 32, shard_size=32)
    # truncate one image member inside shard 0 without changing the tar layout: overwrite its bytes with zeros
    path = data / shard_name(0)
    with tarfile.open(path) as tar:
        info = next(m for m in tar.getmembers() if m.name == "00000005.image.png")
    with open(path, "r+b") as f:
        f.seek(info.offset_data + 8)
        f.write(b"\0" * (info.size - 8))
    run = tmp_path / "run"
    run_train(tiny_args("data.kind=shards", f"data.path={data}", "train.max_steps=6", "train.log_every=6",
                        run_dir=run))
    (record,) = read_metrics(run)
    assert record["corrupt_samples"] == 3  # 6 steps x 32 = 3 epochs of 64 samples, the bad one read once each


def test_pixel_autoencoder_is_exact():
    ae = PixelAutoencoder(4)
    img = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    moments = ae.encode_moments(img)
    assert moments.shape == (2, 96, 4, 4) and (moments[:, 48:] == 0).all()
    z = sample_latents(moments, torch.Generator().manual_seed(0), ae.scale_factor)
    assert torch.equal(ae.decode(z), img)


def test_sample_latents_draws_from_moments():
    mean, std = torch.full((4000, 1, 1, 1), 2.0), torch.full((4000, 1, 1, 1), 0.5)
    z = sample_latents(torch.cat([mean, std], 1), torch.Generator().manual_seed(0), 0.18215)
    assert abs(z.mean().item() - 2 * 0.18215) < 0.005 and abs(z.std().item() - 0.5 * 0.18215) < 0.005


def test_sd_vae_wrapper_with_tiny_autoencoderkl():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1)
    ae = SDVAE(vae=vae)
    img = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    moments = ae.encode_moments(img)
    assert moments.shape == (2, 8, 8, 8) and (moments[:, 4:] > 0).all()  # mean || std, downsampled by 2 here
    out = ae.decode(moments[:, :4] * ae.scale_factor)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.uint8


def test_ema_update_math():
    m = torch.nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.fill_(1.0)
        m.bias.fill_(0.0)
    ema = EMA(m, decay=0.9)
    with torch.no_grad():
        m.weight.fill_(2.0)
    ema.update(m)
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 1.1))
    sd = ema.state_dict(m)
    assert torch.allclose(sd["weight"], torch.full((1, 2), 1.1)) and sd["weight"].dtype == torch.float32
    with pytest.raises(ValueError, match="checkpoint shape"):
        ema.load_state_dict({"weight": torch.zeros(3), "bias": torch.zeros(1)})


# --------------------------------------------------------------------------------------- open files, I/O errors


def _many_shards(root, n: int) -> None:
    """`n` shards of one class-conditional sample each (no image)."""
    os.makedirs(root, exist_ok=True)
    for s in range(n):
        write_shard(os.path.join(root, shard_name(s)),
                    [{"__key__": f"{s:05d}", "latent.npy": np.full((8, 2, 2), s, np.float16), "cls": s % 3}])
    write_manifest(str(root), {"kind": "class_cond", "num_classes": 3, "resolution": 4,
                               "shards": [{"name": shard_name(s), "num_samples": 1} for s in range(n)],
                               "latent": {"autoencoder": "pixel-s2d2", "scale_factor": 1.0, "shape": [4, 2, 2]}})


def _run_limited(script: str, nofile: int) -> subprocess.CompletedProcess:
    """Run python `script` with the soft limit on open files lowered to `nofile`."""
    prelude = ("import resource, sys\n"
               "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
               f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, hard))\n"
               f"sys.path.insert(0, {REPO!r})\n")
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=120)


def test_reader_keeps_few_files_open_under_a_low_open_file_limit(tmp_path):
    """300 shards under a 160-file limit: every sample is read, none substituted, in the main process and in
    forked loader workers (which must not share the parent's file offsets); at most 64 shards open at a time."""
    _many_shards(tmp_path / "d", 300)
    proc = _run_limited(f"""
        import os, torch
        from core.data import SkippingDataset, StepSampler, make_loader
        from core.shards import ShardReader
        from class_cond.data import decode_class_cond
        reader = ShardReader({str(tmp_path / 'd')!r})
        ds = SkippingDataset(reader, lambda raw, _: decode_class_cond(raw, False, ()))
        perm = torch.randperm(300, generator=torch.Generator().manual_seed(0)).tolist()
        values = [int(ds[i, 0]["moments"][0, 0, 0]) for i in perm + perm]
        print("main", values == perm + perm, len(reader._files))
        sampler = StepSampler(300, 30, 1, 0, seed=0)
        it = iter(make_loader(ds, sampler, 30, num_workers=2))
        batches = [next(it) for _ in range(20)]  # two epochs
        got = sorted(int(v) for b in batches for v in b["moments"][:, 0, 0, 0])
        print("workers", got == sorted(2 * list(range(300))), sum(b["skipped"] for b in batches))
    """, nofile=160)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["main", "True", "64", "workers", "True", "0"], proc.stdout
    assert "skipping corrupt sample" not in proc.stderr


def test_too_many_open_files_is_an_error_not_a_corrupt_sample(tmp_path):
    """A process out of file descriptors (EMFILE) stops with that error; it is not 64 'corrupt' samples."""
    _many_shards(tmp_path / "d", 4)
    proc = _run_limited(f"""
        import errno, os
        from core.data import SkippingDataset
        from core.shards import ShardReader
        from class_cond.data import decode_class_cond
        ds = SkippingDataset(ShardReader({str(tmp_path / 'd')!r}), lambda raw, _: decode_class_cond(raw, False, ()))
        held = []
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))  # something else takes every descriptor
        except OSError:
            pass
        try:
            ds[0, 0]
        except OSError as err:
            print("raised", errno.errorcode[err.errno], err.strerror)
    """, nofile=64)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("raised EMFILE too many open files opening shard "), proc.stdout
    assert "(this process may open 64; the shard reader holds at most 64" in proc.stdout
    assert "skipping corrupt sample" not in proc.stderr


def test_reader_closes_least_recently_used_shards_and_pickles(tmp_path):
    _many_shards(tmp_path / "d", 10)
    reader = ShardReader(str(tmp_path / "d"), max_open=3)
    for i in (0, 1, 2, 0, 3, 4):
        assert reader.decoded(i)["cls"] == i % 3
    assert list(reader._files) == [0, 3, 4]  # 1 and 2 were the least recently used
    closed = reader._file(0)
    reader.close()
    assert closed.closed and not reader._files
    import pickle

    copy = pickle.loads(pickle.dumps(reader))  # as a spawned loader worker gets it
    assert copy.decoded(7)["latent.npy"][0, 0, 0] == 7 and list(copy._files) == [7] and not reader._files


def test_errors_of_the_environment_are_raised_and_a_cut_off_member_is_skipped(tmp_path):
    make_synthetic_class_cond(str(tmp_path), 8, 2, 16, shard_size=4)
    from core.data import is_sample_error

    reader, fresh = ShardReader(str(tmp_path)), ShardReader(str(tmp_path))
    decode = lambda raw, _: decode_class_cond(raw, True, ())  # noqa: E731
    assert is_sample_error(OSError("image file is truncated")) and is_sample_error(ValueError("bad .npy"))
    assert not is_sample_error(OSError(errno.EIO, "Input/output error"))
    # the last sample of shard 1 loses the end of its members: read short, skipped as corrupt
    offset, size = reader.members(7)["image.png"]
    with open(tmp_path / shard_name(1), "r+b") as f:
        f.truncate(offset + size // 2)
    with pytest.raises(ShardFormatError, match=r"member image.png is cut off \(\d+ of \d+ bytes; "
                                               "shard-000001.tar is truncated"):
        reader[7]
    assert SkippingDataset(reader, decode)[7, 0]["skipped"] == 1  # sample 0 served instead
    # a shard that disappeared since indexing is the environment's problem (ENOENT), not 64 corrupt samples
    os.remove(tmp_path / shard_name(0))
    with pytest.raises(FileNotFoundError, match="shard-000000.tar"):
        SkippingDataset(fresh, decode)[0, 0]
