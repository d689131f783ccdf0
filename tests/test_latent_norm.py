"""Any-VAE latents: AutoencoderKL configs of other channel counts and downsampling, the exact per-channel
statistics data_prep records (and data_prep.latent_stats adds to older sets), the channel normalisation and its
inverse at decode. Tiny random-init AutoencoderKLs and generated images, CPU, seconds."""
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import ConfigError
from core.latents import LatentNorm, LatentStats, build_autoencoder, latent_layout, run_latent_record, sample_latents
from core.shards import ShardReader, read_manifest
from core.task import DataInfo
from core.trainer import latent_record
from data_prep import imagenet, latent_stats


def tiny_vae(path, channels: int, levels: int, sharp: bool = False, **config) -> str:
    """A random-init AutoencoderKL saved at `path`: `channels` latent channels, downsampling 2**(levels - 1).
    sharp: a posterior std of about exp(-6) (a trained VAE's is small; a random one's is about 1, which leaves
    nothing in its latents to learn)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(channels)
    vae = AutoencoderKL(block_out_channels=(8,) * levels, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=channels, norm_num_groups=4,
                        layers_per_block=1, **config)
    if sharp:
        with torch.no_grad():
            vae.quant_conv.weight[channels:] = 0
            vae.quant_conv.bias[channels:] = -12.0  # log variance
    vae.save_pretrained(path)
    return str(path)


def image_tree(root, classes: int = 2, per_class: int = 6, size: int = 64, seed: int = 0) -> str:
    """ImageNet-style class folders of PNGs: a coloured square per class on a noisy background."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"n{c:08d}"), exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            y, x = rng.integers(0, size // 2, size=2)
            img[y:y + size // 2, x:x + size // 2] = [(200, 40, 40), (40, 40, 200)][c % 2]
            Image.fromarray(img).save(os.path.join(root, f"n{c:08d}", f"{i}.png"))
    return str(root)


def prepare(src, out, vae, *extra) -> dict:
    assert imagenet.main(["--src", src, "--out", str(out), "--resolution", "64", "--vae", vae, "--workers", "0",
                          "--batch-size", "4", "--shard-size", "4", *extra]) == 0
    return read_manifest(str(out))


def brute_force_stats(root) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and unbiased std of x = mu + sigma * eps in expectation over eps, from every stored sample."""
    reader = ShardReader(str(root))
    m = np.stack([reader.decoded(i)["latent.npy"].astype(np.float64) for i in range(len(reader))])
    mu, sigma = np.split(m, 2, axis=1)
    n = mu.shape[0] * mu.shape[2] * mu.shape[3]
    mean = mu.mean(axis=(0, 2, 3))
    second = (mu ** 2 + sigma ** 2).mean(axis=(0, 2, 3))
    return mean, np.sqrt((second - mean ** 2) * n / (n - 1))


def test_latent_stats_are_exact_and_combine_by_adding():
    rng = np.random.default_rng(0)
    moments = np.concatenate([rng.normal(0.5, 2.0, (10, 3, 4, 4)), rng.uniform(0.1, 1.0, (10, 3, 4, 4))], 1)
    whole = LatentStats(3)
    whole.add(moments)
    halves = LatentStats(3)
    for part in (moments[:4], moments[4:]):
        s = LatentStats(3)
        for m in part:  # one sample at a time, as a shard is built
            s.add(m)
        halves.merge(LatentStats.from_record(json.loads(json.dumps(s.to_record()))))  # through a sidecar
    e, h = whole.entry(), halves.entry()
    assert e["count"] == h["count"] == 160
    np.testing.assert_allclose(e["mean"], h["mean"], rtol=1e-13)
    np.testing.assert_allclose(e["std"], h["std"], rtol=1e-13)
    # no posterior noise: the plain mean and unbiased std of the means
    mu_only = np.concatenate([moments[:, :3], np.zeros_like(moments[:, 3:])], 1)
    s = LatentStats(3)
    s.add(mu_only)
    np.testing.assert_allclose(s.entry()["mean"], moments[:, :3].mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(s.entry()["std"], moments[:, :3].transpose(1, 0, 2, 3).reshape(3, -1).std(1, ddof=1),
                               rtol=1e-12)
    # with it: the statistics of the latents training draws, mu + sigma * eps (Monte Carlo over 2000 draws)
    x = moments[:, :3] + moments[:, 3:] * rng.standard_normal((2000, *moments[:, :3].shape))
    np.testing.assert_allclose(e["mean"], x.mean(axis=(0, 1, 3, 4)), atol=0.01)
    np.testing.assert_allclose(e["std"], x.std(axis=(0, 1, 3, 4)), rtol=0.01)
    with pytest.raises(ValueError, match="at least 2 values"):
        LatentStats(3).entry()


def test_channel_norm_is_lightningdit_s_and_decoding_inverts_it():
    mean, std = [0.5, -1.0, 2.0], [2.0, 0.25, 1.5]
    latent = {"autoencoder": "x", "scale_factor": 0.18215, "shift": 0.0, "shape": [3, 4, 4],
              "channel_stats": {"mean": mean, "std": std, "count": 100}}
    record = run_latent_record(latent, "channel", multiplier=0.75)
    norm = LatentNorm.from_record(record)
    x = torch.randn(5, 3, 4, 4) * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    z = norm.normalize(x)
    assert torch.equal(z, (x - m) / s * 0.75)  # LightningDiT's img_latent_dataset.py, in its order
    assert torch.equal(norm.denormalize(z), z * s / 0.75 + m)  # and its inference.py
    torch.testing.assert_close(norm.denormalize(z), x, rtol=0, atol=1e-5)
    # the scalar default is the autoencoder's scaling, unchanged
    assert run_latent_record(latent) == latent and LatentNorm.from_record(latent) == LatentNorm(scale=0.18215)
    moments = torch.cat([x, torch.zeros_like(x)], 1)
    assert torch.equal(sample_latents(moments, torch.Generator().manual_seed(0), norm), z)
    with pytest.raises(ValueError, match="python -m data_prep.latent_stats"):
        run_latent_record({k: v for k, v in latent.items() if k != "channel_stats"}, "channel")
    with pytest.raises(ValueError, match="not one of scalar, channel"):
        run_latent_record(latent, "batchnorm")
    with pytest.raises(ValueError, match="do not fit latents of 4 channels"):
        LatentNorm.from_record({**record, "shape": [4, 4, 4]})


def test_training_with_channel_norm_on_a_set_without_statistics_is_refused_naming_the_fix():
    cfg = SimpleNamespace(data=SimpleNamespace(latent_norm="channel", latent_multiplier=1.0))
    data = DataInfo("/data/old", {"latent": {"autoencoder": "a", "scale_factor": 1.0, "shape": [4, 8, 8]}})
    with pytest.raises(ConfigError, match="data.latent_norm=channel: dataset /data/old .*data_prep.latent_stats"):
        latent_record(cfg, data)


@pytest.mark.parametrize("channels,levels", [(16, 5), (32, 5)])
def test_data_prep_with_an_autoencoderkl_of_other_channels_records_exact_statistics(tmp_path, channels, levels):
    vae = tiny_vae(tmp_path / "vae", channels, levels, scaling_factor=0.5, shift_factor=0.1)
    factor = 2 ** (levels - 1)
    side = 64 // factor
    assert latent_layout(vae, 64)["shape"] == [channels, side, side]  # from its config.json, no weights loaded
    with pytest.raises(ValueError, match=f"not divisible by the .* downsampling factor {factor}"):
        latent_layout(vae, 64 + factor // 2)
    src = image_tree(tmp_path / "src")
    m = prepare(src, tmp_path / "out", vae, "--flip", "--store-images")
    lat = m["latent"]
    assert lat["shape"] == [channels, side, side] and lat["scale_factor"] == 0.5 and lat["shift"] == -0.05
    stats = lat["channel_stats"]
    assert stats["count"] == 24 * side * side and len(stats["mean"]) == channels  # 12 images and their flips
    mean, std = brute_force_stats(tmp_path / "out")
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats["std"], std, rtol=1e-9)

    # a set prepared before the statistics were recorded gets the same ones from data_prep.latent_stats
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "out", old)
    manifest = json.load(open(old / "manifest.json"))
    del manifest["latent"]["channel_stats"]
    json.dump(manifest, open(old / "manifest.json", "w"))
    assert latent_stats.main([str(old), "--workers", "2"]) == 0
    again = read_manifest(str(old))
    assert again["latent"]["channel_stats"] == stats
    assert {k: v for k, v in again.items() if k != "created"} == {k: v for k, v in m.items() if k != "created"}

    # scalar: the VAE's own scaling_factor and shift_factor, z = (x - 0.1) * 0.5, and its decode inverts it
    ae = build_autoencoder(vae)
    x = torch.randn(2, channels, side, side)
    torch.testing.assert_close((ae.decode(x * 0.5 - 0.05)).float(), ae.decode_raw(x).float(), rtol=0, atol=1.0)


def test_latent_stats_command_refuses_what_it_cannot_read(tmp_path, capsys):
    assert latent_stats.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
