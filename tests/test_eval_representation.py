"""CKNNA and the linear probe on hand-checkable cases, and the CLI on a tiny run's own dataset."""
import json

import core  # noqa: F401
import pytest
import torch

from eval.representation import cknna, linear_probe, main


def test_cknna_identical_rotated_random_and_errors():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 16, generator=g)
    assert cknna(a, a) == pytest.approx(1.0, abs=1e-9)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert cknna(a, a @ q) == pytest.approx(1.0, abs=1e-9)  # inner-product kernels ignore rotations
    assert cknna(a, 3.0 * a) == pytest.approx(1.0, abs=1e-9)
    b = torch.randn(300, 16, generator=g)
    assert abs(cknna(a, b)) < 0.1  # independent features: hardly any shared neighbours
    mixed = cknna(a, a + 0.7 * b)
    assert 0.2 < mixed < 0.95  # partially shared structure in between
    with pytest.raises(ValueError, match="same n"):
        cknna(a, b[:10])
    with pytest.raises(ValueError, match="k must be"):
        cknna(a[:5], b[:5], k=10)


def test_linear_probe_separable_vs_random_labels():
    g = torch.Generator().manual_seed(1)
    y = torch.arange(400) % 4
    centres = torch.randn(4, 8, generator=g) * 4
    x = centres[y] + torch.randn(400, 8, generator=g)
    res = linear_probe(x[:300], y[:300], x[300:], y[300:], epochs=30, lr=1e-2, batch_size=64)
    assert res["val_acc"] > 0.95 and res["train_acc"] > 0.95
    noise = torch.randn(400, 8, generator=g)
    rand = linear_probe(noise[:300], y[:300], noise[300:], y[300:], epochs=30, lr=1e-2, batch_size=64)
    assert rand["val_acc"] < 0.45  # chance is 0.25


def test_cli_on_a_tiny_dataset(tmp_path):
    from safetensors.torch import save_file

    from class_cond.data import make_synthetic_class_cond
    from class_cond.models import build_sit

    latent = make_synthetic_class_cond(str(tmp_path / "data"), 64, 4, 32, seed=0)["latent"]  # pixel latents + images
    c, h, _ = latent["shape"]
    kwargs = {"depth": 2, "hidden_size": 32, "num_heads": 2, "patch_size": 2, "input_size": h, "in_channels": c,
              "num_classes": 4, "repa_depth": 1, "encoder_dims": [32], "projector_dim": 16}
    save_file(build_sit(kwargs).state_dict(), str(tmp_path / "ema.safetensors"))
    (tmp_path / "ema.json").write_text(json.dumps({"step": 1, "model": {"task": "class_cond", "kwargs": kwargs},
                                                  "latent": latent}))
    args = ["--run", str(tmp_path / "ema.safetensors"), "--data", str(tmp_path / "data"), "--encoder", "dinov2-tiny"]
    main([*args, "--layer", "2", "--num", "64", "--k", "5", "--probe-epochs", "5", "--out", str(tmp_path / "r.json")])
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["num"] == 64 and -1.0 <= res["cknna"] <= 1.0 and 0.0 <= res["val_acc"] <= 1.0
    with pytest.raises(SystemExit, match="outside the model's blocks"):
        main([*args, "--layer", "9"])
