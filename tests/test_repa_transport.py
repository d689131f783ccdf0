"""REPA loss against hand-computed values; the transport's interpolant, targets and time sampling."""
import math

import pytest
import torch

from core.repa import build_projector, repa_loss
from core.transport import Transport


def test_repa_cosine_hand_computed():
    # one sample, two tokens: cos = 1 for token 0 (parallel), 0 for token 1 (orthogonal) -> loss = -(1 + 0) / 2
    z = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    target = torch.tensor([[[3.0, 0.0], [5.0, 0.0]]])
    assert repa_loss([z], [target]).item() == pytest.approx(-0.5)
    # second sample: cos(45 deg) and -1 -> per-sample means -0.5 and -(0.7071 - 1)/2; averaged over samples
    z2 = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
    t2 = torch.tensor([[[1.0, 0.0], [0.0, -1.0]]])
    expected = (-0.5 + -(math.sqrt(0.5) - 1) / 2) / 2
    assert repa_loss([torch.cat([z, z2])], [torch.cat([target, t2])]).item() == pytest.approx(expected)
    # several encoders: the mean over encoders
    assert repa_loss([z, z2], [target, t2]).item() == pytest.approx(expected)


def test_repa_ntxent_hand_computed():
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    loss = repa_loss([z], [z.clone()], kind="ntxent", temperature=1.0)
    # logits per token: [1, 0] with label 0 -> -log(e / (e + 1)); the same for token 1
    assert loss.item() == pytest.approx(-math.log(math.e / (math.e + 1)))


def test_repa_errors():
    with pytest.raises(ValueError, match=r"projected tokens \(1, 4, 8\) do not match encoder tokens \(1, 9, 8\)"):
        repa_loss([torch.zeros(1, 4, 8)], [torch.zeros(1, 9, 8)])
    with pytest.raises(ValueError, match="1 projector outputs but 2 encoder targets"):
        repa_loss([torch.zeros(1, 4, 8)], [torch.zeros(1, 4, 8)] * 2)
    with pytest.raises(ValueError, match="is not one of: cosine, ntxent"):
        repa_loss([torch.ones(1, 4, 8)], [torch.ones(1, 4, 8)], kind="l2")


def test_projector_shape_and_layout():
    p = build_projector(16, 32, 8)
    assert [type(m).__name__ for m in p] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert p(torch.zeros(2, 5, 16)).shape == (2, 5, 8)


def test_linear_interpolant_and_velocity():
    tr = Transport("linear")
    x0, eps, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([0.0, 0.25, 1.0])
    xt, v = tr.interpolate(x0, eps, t)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[2], eps[2])
    assert torch.allclose(xt[1], 0.75 * x0[1] + 0.25 * eps[1])
    assert torch.allclose(v, eps - x0)


def test_cosine_velocity_is_time_derivative():
    tr = Transport("cosine")
    x0, eps = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    t, h = torch.tensor([0.3, 0.7], dtype=torch.float64), 1e-6
    _, v = tr.interpolate(x0, eps, t)
    numeric = (tr.interpolate(x0, eps, t + h)[0] - tr.interpolate(x0, eps, t - h)[0]) / (2 * h)
    assert torch.allclose(v, numeric, atol=1e-8)


def test_time_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    u = Transport("linear", "uniform").sample_t(20000, g, torch.device("cpu"))
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.01
    ln = Transport("linear", "lognormal").sample_t(20000, g, torch.device("cpu"))
    # t = s/(1+s), s = exp(N(0,1)): median 0.5, logit(t) ~ N(0, 1)
    logit = torch.log(ln / (1 - ln))
    assert abs(ln.median().item() - 0.5) < 0.02 and abs(logit.std().item() - 1) < 0.03


def test_loss_is_per_sample_velocity_mse():
    tr = Transport("linear")
    x0 = torch.randn(4, 2, 3, 3)
    calls = {}

    def model(x, t, y):
        calls["t"], calls["y"] = t, y
        return torch.zeros_like(x), ["z"]

    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    mse, zs = tr.loss(model, x0, {"y": torch.arange(4)}, g1)
    t = torch.rand(4, generator=g2)
    eps = torch.randn(x0.shape, generator=g2)
    assert torch.equal(calls["t"], t) and zs == ["z"]
    assert torch.allclose(mse, (eps - x0).pow(2).flatten(1).mean(1))
