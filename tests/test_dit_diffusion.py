"""DiT's Gaussian diffusion against hand-computed values: schedule, q(x_t|x_0), posterior, VLB terms, hybrid loss."""
import math

import pytest
import torch

from core.config import ConfigError, ObjectiveConfig, load_config
from core.diffusion import (GaussianDiffusion, beta_schedule, discretized_gaussian_log_likelihood, normal_kl,
                            space_timesteps, step_to_t, t_to_step)
from core.transport import Transport, build_objective

# A 3-step toy process: abar = [0.9, 0.72, 0.36], abar_prev = [1, 0.9, 0.72]
TOY = GaussianDiffusion(torch.tensor([0.1, 0.2, 0.5], dtype=torch.float64))
LN2 = math.log(2.0)


def idx(*s):
    return torch.tensor(s, dtype=torch.long)


def test_linear_schedule_is_dits():
    b = beta_schedule("linear", 1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    assert (b[1] - b[0]).item() == pytest.approx((0.02 - 1e-4) / 999)
    half = beta_schedule("linear", 500)  # scaled by 1000 / T so the process stays similar
    assert half[0].item() == pytest.approx(2e-4) and half[-1].item() == pytest.approx(0.04)
    d = GaussianDiffusion(b)
    assert d.alphas_cumprod[2].item() == pytest.approx((1 - 1e-4) * (1 - b[1].item()) * (1 - b[2].item()))
    assert 3e-5 < d.alphas_cumprod[-1].item() < 5e-5  # x_999 is almost pure noise
    cos = beta_schedule("cosine", 1000)
    abar = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert GaussianDiffusion(cos).alphas_cumprod[499].item() == pytest.approx(abar(0.5) / abar(0), rel=1e-9)
    assert cos.max().item() == pytest.approx(0.999)
    with pytest.raises(ValueError, match="need T > 20 steps"):
        beta_schedule("linear", 20)
    with pytest.raises(ValueError, match="not one of: linear, cosine"):
        beta_schedule("quad", 1000)


def test_q_sample_and_marginal_closed_form():
    x0 = torch.tensor([[2.0], [2.0]], dtype=torch.float64)
    mean, var, log_var = TOY.q_mean_variance(x0, idx(2, 0))
    assert mean.flatten().tolist() == pytest.approx([0.6 * 2.0, math.sqrt(0.9) * 2.0])
    assert var.flatten().tolist() == pytest.approx([0.64, 0.1]) and log_var.flatten().tolist() == pytest.approx(
        [math.log(0.64), math.log(0.1)])
    noise = torch.tensor([[0.5], [-1.0]], dtype=torch.float64)
    x_t = TOY.q_sample(x0, idx(2, 0), noise)
    assert x_t.flatten().tolist() == pytest.approx([1.2 + 0.8 * 0.5, math.sqrt(0.9) * 2 - math.sqrt(0.1)])


def test_posterior_mean_and_variance_hand_computed():
    assert TOY.posterior_variance.tolist() == pytest.approx([0.0, 0.2 * 0.1 / 0.28, 0.5 * 0.28 / 0.64])
    # beta~_0 = 0 is clipped to beta~_1 in the log (ADM)
    assert TOY.posterior_log_variance_clipped.tolist() == pytest.approx(
        [math.log(0.02 / 0.28), math.log(0.02 / 0.28), math.log(0.14 / 0.64)])
    x0, x_t = torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[3.0]], dtype=torch.float64)
    mean, var, _ = TOY.q_posterior(x0, x_t, idx(1))
    c1, c2 = 0.2 * math.sqrt(0.9) / 0.28, 0.1 * math.sqrt(0.8) / 0.28
    assert mean.item() == pytest.approx(c1 * 1.0 + c2 * 3.0) and var.item() == pytest.approx(0.02 / 0.28)
    # the same posterior by Gaussian conditioning of x_1 | (x_2, x_0): x_1 = sqrt(.9) x0 + sqrt(.1) e1,
    # x_2 = sqrt(.8) x_1 + sqrt(.2) e2 -> Var = 1 / (1/0.1 + 0.8/0.2),
    # mean = Var (sqrt(.9) x0 / 0.1 + sqrt(.8) x_2 / 0.2)
    v = 1 / (1 / 0.1 + 0.8 / 0.2)
    assert var.item() == pytest.approx(v)
    assert mean.item() == pytest.approx(v * (math.sqrt(0.9) / 0.1 + math.sqrt(0.8) * 3 / 0.2))


def test_learned_variance_interpolates_logs_between_posterior_and_beta():
    x_t = torch.zeros(3, 1, dtype=torch.float64)
    v = torch.tensor([[1.0], [-1.0], [0.0]], dtype=torch.float64)
    out = torch.cat([torch.zeros_like(x_t), v], 1)
    _, log_var, _ = TOY.p_mean_variance(out, x_t, idx(2, 2, 2))
    assert log_var.flatten().tolist() == pytest.approx([math.log(0.5), math.log(0.21875),
                                                        0.5 * (math.log(0.5) + math.log(0.21875))])
    # the mean from eps: x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar), then the posterior mean
    x_t, eps = torch.tensor([[2.0]], dtype=torch.float64), torch.tensor([[0.5]], dtype=torch.float64)
    mean, _, x0_hat = TOY.p_mean_variance(torch.cat([eps, torch.zeros_like(eps)], 1), x_t, idx(2))
    assert x0_hat.item() == pytest.approx((2.0 - 0.8 * 0.5) / 0.6)
    c1, c2 = 0.5 * math.sqrt(0.72) / 0.64, 0.28 * math.sqrt(0.5) / 0.64
    assert mean.item() == pytest.approx(c1 * x0_hat.item() + c2 * 2.0)
    with pytest.raises(ValueError, match="expected 2 output channels"):
        TOY.p_mean_variance(eps, x_t, idx(2))


def test_gaussian_kl_and_discretized_log_likelihood_hand_computed():
    z = torch.zeros(1, dtype=torch.float64)
    assert normal_kl(z, z, z + 1, z + math.log(4)).item() == pytest.approx(0.5 * (math.log(4) - 0.5))
    assert normal_kl(z + 0.3, z - 1, z + 0.3, z - 1).item() == 0.0
    phi = lambda u: 0.5 * (1 + math.erf(u / math.sqrt(2)))  # noqa: E731
    ll = discretized_gaussian_log_likelihood(torch.tensor([0.0, 1.0, -1.0, 0.5]), torch.tensor([0.0, 1.0, -1.0, 0.0]),
                                             torch.tensor([0.0, 0.0, 0.0, math.log(0.5)]))
    expected = [math.log(phi(1 / 255) - phi(-1 / 255)),  # a middle bin of width 2/255
                math.log(1 - phi(-1 / 255)),  # x = 1: the top bin reaches +inf
                math.log(phi(1 / 255)),  # x = -1: the bottom bin reaches -inf
                math.log(phi((0.5 + 1 / 255) / 0.5) - phi((0.5 - 1 / 255) / 0.5))]
    assert ll.tolist() == pytest.approx(expected, rel=2e-3)  # the tanh approximation of Phi (as ADM)


def test_vb_terms_in_bits_kl_for_s_above_0_decoder_nll_at_0():
    x0 = torch.tensor([[0.5, -0.25]], dtype=torch.float64)
    x_t = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    eps = torch.tensor([[0.2, -0.1]], dtype=torch.float64)
    out = torch.cat([eps, torch.ones_like(eps)], 1)  # v = 1: variance beta_s
    vb = TOY.vb_terms_bpd(out.repeat(2, 1), x0.repeat(2, 1), x_t.repeat(2, 1), idx(2, 0))
    # s = 2: KL(N(posterior mean, 0.21875) || N(model mean, 0.5)) per dim, mean over dims, in bits
    c1, c2 = 0.5 * math.sqrt(0.72) / 0.64, 0.28 * math.sqrt(0.5) / 0.64
    kls = []
    for d in range(2):
        x0_hat = (x_t[0, d].item() - 0.8 * eps[0, d].item()) / 0.6
        m_true, m_model = c1 * x0[0, d].item() + c2 * x_t[0, d].item(), c1 * x0_hat + c2 * x_t[0, d].item()
        kls.append(0.5 * (-1 + math.log(0.5 / 0.21875) + 0.21875 / 0.5 + (m_true - m_model) ** 2 / 0.5))
    assert vb[0].item() == pytest.approx(sum(kls) / 2 / LN2)
    # s = 0: -log p(x0) of the discretized decoder N(x0_hat, beta_0) (its mean at s = 0 is x0_hat), in bits
    phi = lambda u: 0.5 * (1 + math.erf(u / math.sqrt(2)))  # noqa: E731
    nll = []
    for d in range(2):
        x0_hat = (x_t[0, d].item() - math.sqrt(0.1) * eps[0, d].item()) / math.sqrt(0.9)
        c, sd = x0[0, d].item() - x0_hat, math.sqrt(0.1)
        nll.append(-math.log(phi((c + 1 / 255) / sd) - phi((c - 1 / 255) / sd)))
    assert vb[1].item() == pytest.approx(sum(nll) / 2 / LN2, rel=1e-3)


class ConstantModel(torch.nn.Module):
    """Returns a learnable constant [eps | v] output and records its inputs."""

    def __init__(self, shape):
        super().__init__()
        self.out = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.3)
        self.seen = {}

    def forward(self, x, t, y):
        self.seen.update(x=x, t=t, y=y)
        return self.out * 1.0, ["zs"]


def test_hybrid_loss_is_mse_plus_vb_with_stop_gradient_on_the_mean():
    d = GaussianDiffusion(beta_schedule("linear", 1000))
    x0 = torch.rand(4, 3, 2, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
    model = ConstantModel((4, 6, 2, 2))
    loss, zs = d.loss(model, x0, {"y": torch.arange(4)}, torch.Generator().manual_seed(7))
    assert loss.shape == (4,) and loss.dtype == torch.float32 and zs == ["zs"]
    g = torch.Generator().manual_seed(7)  # draws: step indices first, then the noise
    s = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert model.seen["t"].dtype == torch.long and torch.equal(model.seen["t"], s)  # DiT: the step index itself
    assert torch.allclose(model.seen["x"], d.q_sample(x0, s, noise))
    eps = model.out[:, :3].detach()
    mse = (noise - eps).pow(2).flatten(1).mean(1)
    vb = d.vb_terms_bpd(model.out.detach(), x0, model.seen["x"], s)
    assert torch.allclose(loss, mse + vb, atol=1e-6)  # weight 1 on the VLB term (T = 1000, loss type MSE)
    loss.sum().backward()
    # the eps channels get the MSE gradient only; the variance channels only the VLB's
    assert torch.allclose(model.out.grad[:, :3], 2 * (eps - noise) / 12, atol=1e-6)
    assert model.out.grad[:, 3:].abs().sum() > 0
    with pytest.raises(ValueError, match="needs a model with learned sigma"):
        d.loss(lambda x, t, y: (x, []), x0, {"y": torch.arange(4)}, torch.Generator())


def test_respacing_matches_dits_and_keeps_abar():
    assert space_timesteps(1000, 250)[:6] == [0, 4, 8, 12, 16, 20] and space_timesteps(1000, 250)[-1] == 999
    assert len(space_timesteps(1000, 250)) == 250
    assert space_timesteps(1000, 50)[:5] == [0, 20, 41, 61, 82]  # round(k * 999 / 49)
    assert space_timesteps(10, 10) == list(range(10))
    with pytest.raises(ValueError, match="cannot take 1001 sampling steps from a 1000-step diffusion"):
        space_timesteps(1000, 1001)
    base = GaussianDiffusion(beta_schedule("linear", 1000))
    sp = base.respace(250)
    kept = space_timesteps(1000, 250)
    assert sp.num_timesteps == 250 and sp.timestep_map == kept and sp.original_steps == 1000
    assert torch.allclose(sp.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    assert sp.betas[0].item() == pytest.approx(1e-4)
    # the time convention: t = s / T of the original step; the model gets s back
    t = sp.t_of(idx(0, 1, 249))
    assert t.tolist() == pytest.approx([0.0, 0.004, 0.999]) and sp.model_step(t).tolist() == [0.0, 4.0, 999.0]
    assert step_to_t(torch.tensor([700]), 1000).item() == pytest.approx(0.7)
    assert t_to_step(torch.tensor([0.7], dtype=torch.float32), 1000).item() == 700
    with pytest.raises(ValueError, match="not a respaced one"):
        sp.loss(None, torch.zeros(1, 1), {}, torch.Generator())


def test_objective_config_and_build():
    from class_cond.task import ClassCondConfig
    from conftest import TINY

    cfg = load_config(ClassCondConfig, TINY, ["objective.kind=ddpm"])
    objective = build_objective(cfg.objective)
    assert isinstance(objective, GaussianDiffusion) and objective.learn_sigma and objective.num_timesteps == 1000
    assert build_objective(ObjectiveConfig()).learn_sigma is False and isinstance(build_objective(ObjectiveConfig()),
                                                                                  Transport)
    with pytest.raises(ConfigError, match="objective.kind: 'dit' is not one of: transport, ddpm"):
        load_config(ClassCondConfig, TINY, ["objective.kind=dit"])
    with pytest.raises(ConfigError, match="objective.beta_schedule: 'quad' is not one of: linear, cosine"):
        load_config(ClassCondConfig, TINY, ["objective.kind=ddpm", "objective.beta_schedule=quad"])
    with pytest.raises(ConfigError, match="objective.diffusion_steps=10: .*need T > 20 steps"):
        load_config(ClassCondConfig, TINY, ["objective.kind=ddpm", "objective.diffusion_steps=10"])
    with pytest.raises(ValueError, match="objective.kind 'dit' is not one of: transport, ddpm"):
        build_objective(ObjectiveConfig(kind="dit"))
