"""Stored REPA features: used only when their encoder spec and token count are the run's; otherwise the encoder
runs on the stored images, or a clear ConfigError before training when the dataset has neither."""
import json
import logging
import os

import numpy as np
import pytest

from class_cond.data import make_synthetic_class_cond
from class_cond.task import ClassCondConfig
from conftest import REPO, run_train
from core.config import ConfigError, load_config
from core.shards import feature_record, read_manifest, shard_name, write_manifest, write_shard
from core.task import DataInfo
from core.trainer import data_needs

S, B = "dinov2-s", "dinov2-s@random"  # one encoder name, two sources of weights (384 wide)


def make_set(root, features: list, images: bool, tokens: int = 16, job_specs: list | None = None) -> DataInfo:
    """A 2-sample class-conditional set with 8x8 latents (a /2 model: 4x4 tokens), feat_dinov2-s.npy of
    `tokens` tokens when `features` is non-empty, image.png with `images`; `job_specs`: a data_prep job record."""
    os.makedirs(root, exist_ok=True)
    samples = []
    for i in range(2):
        s = {"__key__": f"k{i}", "latent.npy": np.zeros((24, 8, 8), np.float16), "cls": i}
        if features:
            s["feat_dinov2-s.npy"] = np.zeros((tokens, 384), np.float16)
        if images:
            s["image.png"] = np.zeros((16, 16, 3), np.uint8)
        samples.append(s)
    write_shard(os.path.join(root, shard_name(0)), samples)
    if job_specs is not None:
        os.makedirs(os.path.join(root, "prep"))
        with open(os.path.join(root, "prep", "job.json"), "w") as f:
            json.dump({"features": job_specs}, f)
    write_manifest(str(root), {"kind": "class_cond", "num_classes": 2, "resolution": 16, "images": images,
                               "shards": [{"name": shard_name(0), "num_samples": 2}], "features": features,
                               "latent": {"autoencoder": "pixel-s2d2", "scale_factor": 1.0, "shape": [12, 8, 8]}})
    return DataInfo(str(root), read_manifest(str(root)))


def cfg_for(spec: str, *extra: str):
    return load_config(ClassCondConfig, None, ["data.kind=synthetic", "model.preset=tiny", "repa.depth=1",
                                               f"repa.encoders=[{spec}]",
                                               f"train.ds_config={REPO}/ds_configs/zero2_fp32.json", *extra])


def test_stored_features_need_the_same_spec_and_token_count(tmp_path):
    info = make_set(tmp_path / "a", [feature_record(B, 16, 384)], images=False)
    assert data_needs(cfg_for(B), info, grid=4) == (False, ["dinov2-s"])
    with pytest.raises(ConfigError, match=r"has no images and feat_dinov2-s.npy of 'dinov2-s@random' with 16 tokens, "
                                          r"this run needs 'dinov2-s' with 16 \(4x4"):
        data_needs(cfg_for(S), info, grid=4)  # same name, other weights
    with pytest.raises(ConfigError, match=r"'dinov2-s@random' with 16 tokens, this run needs 'dinov2-s@random' with "
                                          r"64 \(8x8, the model's token grid\).*--features dinov2-s@random "
                                          r"--feature-grid 8"):
        data_needs(cfg_for(B), info, grid=8)  # same weights, another token grid (e.g. a /1 model)
    with_images = make_set(tmp_path / "b", [feature_record(B, 16, 384)], images=True)
    assert data_needs(cfg_for(S), with_images, grid=4) == (True, [])  # the encoder runs on the images instead
    assert data_needs(cfg_for(B), with_images, grid=8) == (True, [])
    assert data_needs(cfg_for(S, "repa.coeff=0"), info, grid=4) == (False, [])


def test_repa_without_images_or_features_fails_before_training(tmp_path):
    info = make_set(tmp_path / "a", [], images=False)
    with pytest.raises(ConfigError, match="needs the images or matching stored features, and dataset .* has no "
                                          "images and no feat_dinov2-s.npy. Prepare it with --store-images"):
        data_needs(cfg_for(S), info, grid=4)
    # a manifest without "images" (a generated set): the first sample says whether images are stored
    make_synthetic_class_cond(str(tmp_path / "gen"), 4, 2, 16)
    gen = DataInfo(str(tmp_path / "gen"), read_manifest(str(tmp_path / "gen")))
    assert "images" not in gen.manifest and data_needs(cfg_for(S), gen, grid=4) == (True, [])
    # the training entry point: exit code 2 and the message, before any step or checkpoint
    proc = run_train(["--config", os.path.join(REPO, "configs/debug/class_cond_tiny.yaml"),
                      f"run.dir={tmp_path / 'run'}", "data.kind=shards", f"data.path={tmp_path / 'a'}",
                      "repa.encoders=[dinov2-tiny]", "train.num_workers=0", "train.tensorboard=false"], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "config error: REPA (repa.coeff=0.5) needs the images or matching stored features" in proc.stderr
    assert "no feat_dinov2-tiny.npy" in proc.stderr and "--feature-grid 4" in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_a_bare_name_list_from_older_manifests(tmp_path, caplog):
    """Older manifests list names only: the spec comes from prep/job.json when there is one, else default weights
    are assumed (with a warning); the token count is read from the first sample."""
    recorded = make_set(tmp_path / "a", ["dinov2-s"], images=False, job_specs=[B])
    assert data_needs(cfg_for(B), recorded, grid=4) == (False, ["dinov2-s"])
    with pytest.raises(ConfigError, match="of 'dinov2-s@random' with 16 tokens, this run needs 'dinov2-s' with 16"):
        data_needs(cfg_for(S), recorded, grid=4)  # the reviewer's case: random-weight features, default spec
    bare = make_set(tmp_path / "b", ["dinov2-s"], images=False)
    with caplog.at_level(logging.WARNING):
        assert data_needs(cfg_for(S), bare, grid=4) == (False, ["dinov2-s"])
    assert "lists stored dinov2-s features without their source; assuming 'dinov2-s'" in caplog.text
    with pytest.raises(ConfigError, match="of 'dinov2-s' with 16 tokens, this run needs 'dinov2-s' with 64"):
        data_needs(cfg_for(S), bare, grid=8)
    with pytest.raises(ConfigError, match="of 'dinov2-s' with 16 tokens, this run needs 'dinov2-s@random'"):
        data_needs(cfg_for(B), bare, grid=4)


def test_data_prep_records_the_spec_and_sizes_features_to_the_token_grid(tmp_path, capsys):
    from data_prep import imagenet
    from data_prep.cli import main_guard
    from test_data_prep import PIX, make_imagenet_tree

    src = str(tmp_path / "src")
    make_imagenet_tree(src, classes=2, per_class=2)
    base = ["--src", src, *PIX, "--limit", "3", "--shard-size", "4"]
    # 32 px through pixel-s2d4: 8x8 latents, so the default grid is 4 (a /2 model); --feature-grid 8 a /1 model
    assert imagenet.main([*base, "--out", str(tmp_path / "g4"), "--features", "dinov2-tiny"]) == 0
    assert imagenet.main([*base, "--out", str(tmp_path / "g8"), "--features", "dinov2-tiny", "--feature-grid", "8",
                          "--store-images"]) == 0
    g4, g8 = (DataInfo(str(tmp_path / d), read_manifest(str(tmp_path / d))) for d in ("g4", "g8"))
    assert g4.manifest["features"] == [{"name": "dinov2-tiny", "spec": "dinov2-tiny", "tokens": 16, "dim": 32}]
    assert g8.manifest["features"] == [{"name": "dinov2-tiny", "spec": "dinov2-tiny", "tokens": 64, "dim": 32}]
    from core.shards import ShardReader

    assert ShardReader(str(tmp_path / "g8")).decoded(0)["feat_dinov2-tiny.npy"].shape == (64, 32)
    tiny = cfg_for("dinov2-tiny")
    assert data_needs(tiny, g4, grid=4) == (False, ["dinov2-tiny"])
    assert data_needs(tiny, g8, grid=4) == (True, [])  # 64 tokens for a 16-token model: its images instead
    assert data_needs(tiny, g8, grid=8) == (False, ["dinov2-tiny"])

    assert main_guard(imagenet.main, [*base, "--out", str(tmp_path / "g4"), "--features", "dinov2-tiny",
                                      "--feature-grid", "8"]) == 2  # another grid into the same directory
    assert "feature_grid: 4 then, 8 now" in capsys.readouterr().err
    assert main_guard(imagenet.main, [*base, "--out", str(tmp_path / "x"), "--features", "dinov2-s",
                                      "dinov2-s@random"]) == 2
    assert "--features names 'dinov2-s' twice: a sample stores one feat_dinov2-s.npy" in capsys.readouterr().err
