"""DDPM and DDIM samplers with the exact eps (and reverse variance) of Gaussian data; DiT guidance semantics."""
import math

import pytest
import torch
from torch import nn

from core.diffusion import GaussianDiffusion, beta_schedule, t_to_step
from class_cond.task import null_labels
from eval.guidance import GuidedVelocity
from eval.samplers import ddim_sample, ddpm_sample

MU = torch.tensor([1.5, -0.5, 0.0, 2.0], dtype=torch.float64)
S = torch.tensor([0.5, 1.0, 2.0, 0.2], dtype=torch.float64)
BASE = GaussianDiffusion(beta_schedule("linear", 1000))


def exact_denoiser(d: GaussianDiffusion, calls=None):
    """[eps | v] for x0 ~ N(MU, diag(S^2)): eps = E[eps | x_s]; v puts the model variance on the exact reverse
    variance of d's (respaced) chain, beta~ + c1^2 Var[x0 | x_s], so every ancestral step is the true kernel."""
    smap = torch.tensor(d.timestep_map)

    def f(x, t):
        if calls is not None:
            calls.append(t[0].item())
        s = t_to_step(t, d.original_steps).long()
        i = torch.searchsorted(smap, s).view(-1, 1)
        ab = BASE.alphas_cumprod[s].view(-1, 1)
        var_xs = ab * S**2 + 1 - ab
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * MU) / var_xs
        var = d.posterior_variance[i] + d.posterior_mean_coef1[i] ** 2 * S**2 * (1 - ab) / var_xs
        low, high = d.posterior_log_variance_clipped[i], d.log_betas[i]
        return torch.cat([eps, 2 * (var.log() - low) / (high - low) - 1], 1)
    return f


def _check_moments(x0, n):
    mean, std = x0.mean(0), x0.std(0)
    se_mean, se_std = S / math.sqrt(n), S / math.sqrt(2 * n)
    assert ((mean - MU).abs() < 5 * se_mean + 0.005 * S).all(), (mean, MU)
    assert ((std - S).abs() < 5 * se_std + 0.005 * S).all(), (std, S)
    corr = torch.corrcoef(x0.T) - torch.eye(4, dtype=torch.float64)
    assert corr.abs().max() < 5 / math.sqrt(n)


def test_ddpm_250_respaced_steps_reproduce_the_data_moments():
    n, d = 10000, BASE.respace(250)
    g = torch.Generator().manual_seed(0)
    calls = []
    x0 = ddpm_sample(exact_denoiser(d, calls), torch.randn(n, 4, generator=g, dtype=torch.float64), d, g)
    _check_moments(x0, n)
    # NFE = steps, at t = s / 1000 of the kept original steps, noisiest first
    assert len(calls) == 250 and calls[0] == pytest.approx(0.999) and calls[-1] == 0.0
    assert calls[-2] == pytest.approx(0.004)


def test_ddim_reproduces_the_data_moments():
    n = 10000
    x_T = torch.randn(n, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x0 = ddim_sample(exact_denoiser(BASE), x_T, BASE)  # eta = 0: deterministic, first order in the step
    _check_moments(x0, n)
    assert torch.equal(x0, ddim_sample(exact_denoiser(BASE), x_T, BASE))
    # few steps: the first-order error shows on the narrow dimension (s = 0.2), shrinking with more steps
    few = [ddim_sample(exact_denoiser(d), x_T[:2000], d).std(0)[3] / S[3]
           for d in (BASE.respace(25), BASE.respace(100))]
    assert few[0] < few[1] < 1.0 and 1 - few[0] > 3 * (1 - few[1])


def test_per_sample_generators_and_eta():
    d = BASE.respace(20)
    x_T = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gens = lambda idx: [torch.Generator().manual_seed(10 + i) for i in idx]  # noqa: E731
    whole = ddpm_sample(exact_denoiser(d), x_T, d, gens(range(4)))
    parts = torch.cat([ddpm_sample(exact_denoiser(d), x_T[:1], d, gens([0])),
                       ddpm_sample(exact_denoiser(d), x_T[1:], d, gens([1, 2, 3]))])
    assert torch.allclose(whole, parts, atol=1e-12)
    a = ddim_sample(exact_denoiser(d), x_T, d, eta=1.0, generator=torch.Generator().manual_seed(3))
    b = ddim_sample(exact_denoiser(d), x_T, d, eta=1.0, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(a, b) and torch.equal(a, ddim_sample(exact_denoiser(d), x_T, d, eta=1.0,
                                                                   generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="pass a generator"):
        ddim_sample(exact_denoiser(d), x_T, d, eta=0.5)
    with pytest.raises(ValueError, match="expected 8 output channels"):
        ddpm_sample(lambda x, t: x, x_T, d, torch.Generator())


class FakeDiT(nn.Module):
    """[eps | v] output depending on x, the step input and the class; records the timestep inputs."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 8)
        self.steps = []

    def forward(self, x, t, y):
        self.steps.append(t.clone())
        e = self.emb(y).view(-1, 8, 1, 1)
        out = torch.cat([x, x], 1) * 0.5 + e + t.view(-1, 1, 1, 1) / 1000
        return out, []


def test_dit_guidance_guides_eps_keeps_conditional_variance_and_feeds_the_step():
    model = FakeDiT()
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    t = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)  # steps 900, 500, 100
    g = GuidedVelocity(model, {"y": y}, null_labels(y, 5), scale=3.0, interval=(0.0, 0.7),
                       model_time=BASE.model_step, keep_sigma=True)
    out = g(x, t)
    assert model.steps[-1].tolist() == [900.0, 500.0, 100.0] * 2  # cond and uncond halves in one forward
    with torch.no_grad():
        c = model(x.float(), torch.tensor([900.0, 500.0, 100.0]), y)[0].double()
        u = model(x.float(), torch.tensor([900.0, 500.0, 100.0]), torch.full_like(y, 5))[0].double()
    assert out.shape == (3, 8, 2, 2)
    assert torch.allclose(out[0], c[0], atol=1e-6)  # t = 0.9 is outside [0, 0.7]: conditional only
    assert torch.allclose(out[1:, :4], u[1:, :4] + 3.0 * (c[1:, :4] - u[1:, :4]), atol=1e-5)
    assert torch.allclose(out[1:, 4:], c[1:, 4:], atol=1e-6)  # the variance channels stay conditional
    with pytest.raises(ValueError, match="keep_sigma needs a learned-sigma model"):
        GuidedVelocity(lambda_model(), {"y": y}, null_labels(y, 5), keep_sigma=True)(x, t)


def lambda_model():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x, t, y):
            return x * self.w
    return Plain()
