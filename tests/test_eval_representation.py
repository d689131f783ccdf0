"""CKNNA and the linear probe on hand-checkable cases, and the CLI on a tiny run's own dataset."""
import json
import math

import pytest
import torch

import eval.representation as rep
from core.diffusion import GaussianDiffusion, beta_schedule
from core.transport import Transport
from eval.representation import cknna, linear_probe, main, pooled_hidden_states, stratified_split, subset_indices


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


def _clustered(classes, per_class, dim, seed=0):
    """Class-sorted features (as prepared ImageNet shards: class by class) with well-separated class centres."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return torch.randn(classes, dim, generator=g)[labels] * 3 + torch.randn(len(labels), dim, generator=g), labels


def test_linear_probe_default_batch_fits_a_few_thousand_rows():
    """800 rows of 50 separable classes: one full batch per epoch (16384) underfits in 90 epochs; mini-batches fit."""
    x, y = _clustered(50, 20, 32)
    p = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    x, y = x[p], y[p]
    fit = linear_probe(x[:800], y[:800], x[800:], y[800:])
    assert fit["val_acc"] > 0.85 and fit["train_acc"] > 0.95
    assert linear_probe(x[:800], y[:800], x[800:], y[800:], batch_size=16384)["val_acc"] < 0.5
    torch.manual_seed(123)  # the seed decides the probe's init and order, not the caller's global RNG
    assert linear_probe(x[:800], y[:800], x[800:], y[800:]) == fit


def test_cli_probe_on_class_sorted_features_splits_per_class(monkeypatch, capsys):
    """Features in class order: the first-80% / last-20% split put disjoint classes on both sides (val acc 0)."""
    x, y = _clustered(50, 20, 32)
    monkeypatch.setattr(rep, "dataset_features", lambda *a, **k: {"hidden": x, "encoder": x.clone(), "labels": y})
    main(["--run", "r", "--data", "d", "--num", "1000"])
    res = json.loads(capsys.readouterr().out)
    assert res["val_acc"] > 0.95 and res["train_acc"] > 0.95
    assert (res["num_train"], res["num_val"]) == (800, 200)


def test_stratified_split_and_random_subset():
    labels = torch.cat([torch.arange(10).repeat_interleave(10), torch.tensor([10])])  # class 10: one sample
    train, val = stratified_split(labels, 0.2, seed=0)
    assert torch.bincount(labels[val], minlength=11).tolist() == [2] * 10 + [0]
    assert torch.bincount(labels[train], minlength=11).tolist() == [8] * 10 + [1]
    assert sorted(torch.cat([train, val]).tolist()) == list(range(101))
    assert torch.equal(stratified_split(labels, 0.2, seed=0)[1], val)
    assert not torch.equal(stratified_split(labels, 0.2, seed=1)[1], val)
    with pytest.raises(ValueError, match="no validation samples"):
        stratified_split(torch.arange(5))
    a = subset_indices(1000, 100, seed=0)
    assert len(set(a)) == 100 and a == sorted(a) and a != list(range(100)) and max(a) > 900
    assert a == subset_indices(1000, 100, seed=0) and a != subset_indices(1000, 100, seed=1)
    assert subset_indices(5, 10) == [0, 1, 2, 3, 4]


def _kwargs(**kw):
    """A 2-block SiT for 12x16x16 pixel-s2d2 latents (32-px images), 4 classes."""
    return {"depth": 2, "hidden_size": 32, "num_heads": 2, "patch_size": 2, "input_size": 16, "in_channels": 12,
            "num_classes": 4, "repa_depth": 1, "encoder_dims": [32], "projector_dim": 16, **kw}


def _tiny_sit(**kw):
    from class_cond.models import build_sit

    torch.manual_seed(0)
    return build_sit(_kwargs(**kw)).eval()


@pytest.mark.parametrize("kind", ["linear", "cosine", "ddpm"])
def test_hidden_states_use_the_objectives_noisy_input_and_time(kind):
    """SiT: x_t = alpha_t x0 + sigma_t eps and t; DiT (ddpm): x_s = q_sample(x0, s) and the integer step s."""
    model = _tiny_sit(input_size=4, in_channels=3, learn_sigma=kind == "ddpm")
    seen = {}
    model.register_forward_pre_hook(lambda m, args: seen.update(x=args[0], t=args[1]))
    x0 = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    objective = GaussianDiffusion(beta_schedule("linear", 1000)) if kind == "ddpm" else Transport(kind)
    h = pooled_hidden_states(model, x0, torch.tensor([0, 1, 2]), 1, 0.3, torch.Generator().manual_seed(2), objective)
    assert h.shape == (3, 32)
    if kind == "ddpm":
        abar = objective.alphas_cumprod[300].item()
        expected, t = abar**0.5 * x0 + (1 - abar) ** 0.5 * eps, torch.full((3,), 300)
        assert seen["t"].dtype == torch.long
    else:
        a, s = (0.7, 0.3) if kind == "linear" else (math.cos(0.15 * math.pi), math.sin(0.15 * math.pi))
        expected, t = a * x0 + s * eps, torch.full((3,), 0.3)
    assert torch.allclose(seen["x"], expected, atol=1e-6) and torch.equal(seen["t"], t)
    pooled_hidden_states(model, x0, torch.tensor([0, 1, 2]), 1, 1.0, torch.Generator(), objective)
    assert seen["t"][0].item() == (999 if kind == "ddpm" else 1.0)  # t = 1: DiT's noisiest step is T - 1


def _export(path, task="class_cond", objective=None, **kw):
    """A random-init tiny SiT in the export layout (.safetensors + .json) with the given task and objective record."""
    from safetensors.torch import save_file

    save_file(_tiny_sit(**kw).state_dict(), str(path))
    latent = {"autoencoder": "pixel-s2d2", "scale_factor": 1.0, "shift": 0.0, "shape": [12, 16, 16]}
    path.with_suffix(".json").write_text(json.dumps({"step": 1, "model": {"task": task, "kwargs": _kwargs(**kw)},
                                                     "latent": latent, "config": {"objective": objective or {}}}))
    return path


def test_cli_on_a_tiny_dataset(tmp_path):
    from class_cond.data import make_synthetic_class_cond

    latent = make_synthetic_class_cond(str(tmp_path / "data"), 64, 4, 32, seed=0)["latent"]  # pixel latents + images
    assert latent["shape"] == [12, 16, 16]
    _export(tmp_path / "ema.safetensors")
    args = ["--run", str(tmp_path / "ema.safetensors"), "--data", str(tmp_path / "data"), "--encoder", "dinov2-tiny"]
    main([*args, "--layer", "2", "--num", "64", "--k", "5", "--probe-epochs", "5", "--out", str(tmp_path / "r.json")])
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["num"] == 64 and -1.0 <= res["cknna"] <= 1.0 and 0.0 <= res["val_acc"] <= 1.0
    assert (res["num_train"], res["num_val"]) == (52, 12)  # 3 of each class's 16 held out
    with pytest.raises(SystemExit, match="outside the model's blocks"):
        main([*args, "--layer", "9"])
    # a seeded random subset of the dataset, not its first samples
    feats = [rep.dataset_features(str(tmp_path / "ema.safetensors"), str(tmp_path / "data"), "dinov2-tiny", 1, 0.5,
                                  16, 16, seed=seed) for seed in (0, 0, 1)]
    index = feats[0]["index"].tolist()
    assert len(set(index)) == 16 and index != list(range(16)) and max(index) >= 16
    assert torch.equal(feats[1]["index"], feats[0]["index"]) and not torch.equal(feats[2]["index"], feats[0]["index"])
    # a DiT (ddpm objective) export runs with its own noising; a t2i model is refused, naming why
    _export(tmp_path / "dit.safetensors", objective={"kind": "ddpm"}, learn_sigma=True)
    main(["--run", str(tmp_path / "dit.safetensors"), *args[2:], "--layer", "1", "--num", "32", "--k", "5",
          "--probe-epochs", "2", "--out", str(tmp_path / "d.json")])
    assert json.loads((tmp_path / "d.json").read_text())["num"] == 32
    _export(tmp_path / "t2i.safetensors", task="t2i")
    with pytest.raises(SystemExit, match="need a class-conditional model.*'t2i' model"):
        main(["--run", str(tmp_path / "t2i.safetensors"), *args[2:]])
