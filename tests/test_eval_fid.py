"""FID plumbing: statistics, Fréchet distance, IS, precision/recall, proxy labelling, reference files, CLI."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from eval.fid import (INCEPTION_FILE, PROXY_LABEL, build_extractor, fid_from_stats, inception_score, load_stats,
                      main, precision_recall, save_stats, stats_from_features, stats_from_images)


def _images(n, seed, shift=0, size=32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 200, (n, 3, size, size), generator=g)
    return (base + shift).clamp(0, 255).to(torch.uint8)


def _write_pngs(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:06d}.png"))


def test_fid_of_gaussians_matches_closed_form():
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 9.0])
    # |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2 for diagonal covariances
    assert fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(5.0 + 1.0 + 1.0 + 0.0, abs=1e-6)
    assert fid_from_stats(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="different feature sizes"):
        fid_from_stats(mu1, s1, np.zeros(2), np.eye(2))


def test_proxy_extractor_is_deterministic_and_streaming_stats_match_numpy():
    ex = build_extractor("proxy")
    assert ex.is_proxy and ex.name == "proxy-randconv-v1"
    imgs = _images(40, 0)
    feats = ex(imgs)
    assert feats.shape == (40, 64) and feats.dtype == np.float64
    assert np.array_equal(feats, build_extractor("proxy")(imgs))  # a fresh build gives the same features
    mu, sigma = stats_from_images([imgs[:15], imgs[15:]], ex)
    # the extractor ran on batches of 15 and 25 there, on one of 40 for feats: float32 round-off only
    chunked = np.concatenate([ex(imgs[:15]), ex(imgs[15:])])
    np.testing.assert_allclose(chunked, feats, rtol=1e-5, atol=1e-6)
    mu2, sigma2 = stats_from_features(chunked)  # the same features: only the float64 summation order differs
    assert np.allclose(mu, mu2) and np.allclose(sigma, sigma2, atol=1e-10)
    with pytest.raises(ValueError, match="uint8 images"):
        ex(imgs.float())
    with pytest.raises(ValueError, match="inception, proxy"):
        build_extractor("vgg")


def test_save_and_load_stats_roundtrip_and_bad_files(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    save_stats(tmp_path / "s.npz", mu, sigma, extractor="proxy-randconv-v1", is_proxy=True, source="x")
    m2, s2 = load_stats(tmp_path / "s.npz")
    assert np.array_equal(m2, mu) and np.array_equal(s2, sigma)
    data = np.load(tmp_path / "s.npz", allow_pickle=False)
    assert str(data["extractor"]) == "proxy-randconv-v1" and str(data["is_proxy"]) == "True"
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="lacks mu and sigma.*keys present: arr_0"):
        load_stats(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="is_proxy"):
        save_stats(tmp_path / "t.npz", mu, sigma, extractor="x")


def test_inception_score_and_precision_recall_by_hand():
    assert inception_score(np.full((10, 4), 0.25)) == pytest.approx(1.0)  # uninformative: IS 1
    assert inception_score(np.eye(4)[np.arange(8) % 4]) == pytest.approx(4.0)  # confident and balanced: IS = K
    ref = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])
    # k=3 radii (4th smallest distance, self included) of ref: 3,2,2,2,3 -> balls cover [-3, 7]: only sample 5 is
    # inside (precision 1/5). Sample radii: 17 (for 5), 2, 2, 2, 3: the ball [-12, 22] covers every ref (recall 1).
    samples = np.array([[5.0], [20.0], [21.0], [22.0], [23.0]])
    p, r = precision_recall(ref, samples)
    assert p == pytest.approx(1 / 5) and r == pytest.approx(1.0)
    p2, r2 = precision_recall(ref, samples[1:] - 10)  # samples 10..13: sample radii 3 (or 2) reach 7 at most, ref 4 outside
    assert p2 == 0.0 and r2 == pytest.approx(0.0)
    p_same, r_same = precision_recall(ref, ref)
    assert p_same == 1.0 and r_same == 1.0


def test_cli_with_proxy_features_labels_everything_proxy(tmp_path, capsys):
    _write_pngs(tmp_path / "ref", _images(30, 1))
    _write_pngs(tmp_path / "near" / "images", _images(30, 2))
    _write_pngs(tmp_path / "far" / "images", _images(30, 3, shift=80))
    (tmp_path / "near" / "generation.json").write_text(json.dumps({"step": 40, "sampler": "sde", "num_samples": 30}))
    main([str(tmp_path / "near"), "--ref", str(tmp_path / "ref"), "--features", "proxy"])
    printed = capsys.readouterr().out
    assert PROXY_LABEL in printed and "\nFID" not in printed
    near = json.loads((tmp_path / "near" / "metrics.json").read_text())
    main([str(tmp_path / "far"), "--ref", str(tmp_path / "ref"), "--features", "proxy"])
    far = json.loads((tmp_path / "far" / "metrics.json").read_text())
    assert not any(k in near for k in ("fid", "sfid", "inception_score", "precision"))
    assert near["is_proxy"] and near["note"] == PROXY_LABEL and near["num_samples"] == 30
    assert near["checkpoint_step"] == 40 and near["generation"]["sampler"] == "sde"
    assert 0 <= near["proxy_fid"] < far["proxy_fid"]  # brighter images are farther from the reference
    assert near["proxy_sfid"] < far["proxy_sfid"] and near["proxy_inception_score"] >= 1.0
    assert near["proxy_precision"] > far["proxy_precision"]


def test_proxy_features_refuse_an_inception_reference(tmp_path, capsys):
    _write_pngs(tmp_path / "s", _images(4, 0))
    np.savez(tmp_path / "adm.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "s"), "--ref", str(tmp_path / "adm.npz"), "--features", "proxy"])
    assert "no extractor metadata" in capsys.readouterr().err


class FakeTorchScriptInception(nn.Module):
    """The call signature of clean-fid's TorchScript Inception (NOT its weights): wiring test only."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2048))
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor, return_features: bool = False, no_output_bias: bool = False):
        feats = self.layers(nn.functional.interpolate(x, size=(299, 299)) / 128 - 1)
        if return_features:
            return feats
        logits = feats @ self.fc.weight.T
        if not no_output_bias:
            logits = logits + self.fc.bias
        return logits.softmax(-1)


def test_local_inception_weights_path_and_reference_mode_checks(tmp_path):
    path = tmp_path / INCEPTION_FILE
    torch.jit.script(FakeTorchScriptInception()).save(str(path))
    ex = build_extractor("inception", weights=str(path))
    assert not ex.is_proxy and ex.name == "inception-legacy_tensorflow"
    imgs = _images(3, 0, size=16)
    assert ex(imgs).shape == (3, 2048) and ex.probs(imgs).shape == (3, 1008)
    assert np.allclose(ex.probs(imgs).sum(1), 1.0)
    clean = build_extractor("inception", mode="clean", weights=str(tmp_path))
    assert clean(imgs).shape == (3, 2048) and clean.name == "inception-clean"
    with pytest.raises(FileNotFoundError, match=INCEPTION_FILE):
        build_extractor("inception", weights=str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="legacy_tensorflow, clean"):
        build_extractor("inception", mode="tf", weights=str(path))


def test_an_adm_reference_batch_is_compared_in_legacy_tensorflow_mode_only(tmp_path):
    """ADM batches carry TensorFlow-Inception statistics (resizing inside the network): clean mode's PIL-resized
    features would give a systematically different FID, so it is refused rather than reported."""
    from types import SimpleNamespace

    from eval.fid import load_reference

    np.savez(tmp_path / "adm.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    legacy = SimpleNamespace(name="inception-legacy_tensorflow", is_proxy=False)
    assert load_reference(str(tmp_path / "adm.npz"), legacy, 10, need_feats=False)["mu"].shape == (2048,)
    with pytest.raises(ValueError, match="an ADM reference batch.*--mode legacy_tensorflow, not with inception-clean"):
        load_reference(str(tmp_path / "adm.npz"), SimpleNamespace(name="inception-clean", is_proxy=False), 10, False)
