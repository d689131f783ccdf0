"""Samplers against the closed-form velocity of Gaussian data: no network involved."""
import math

import pytest
import torch

from core.transport import Transport
from eval.samplers import ode_sample, randn, score_from_velocity, sde_sample

MU = torch.tensor([1.5, -0.5, 0.0, 2.0], dtype=torch.float64)
S = torch.tensor([0.5, 1.0, 2.0, 0.2], dtype=torch.float64)


def coefficients(t, path):
    """(alpha, sigma, d alpha, d sigma) of the path, written out here so the test does not reuse the code under test."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    h = math.pi / 2
    return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)


def path_velocity(path):
    """Exact E[d_alpha x0 + d_sigma eps | x_t] for x0 ~ N(MU, diag(S^2)) on x_t = alpha_t x0 + sigma_t eps."""
    def v(x, t):
        a, b, da, db = coefficients(t.view(-1, 1).to(torch.float64), path)
        return da * MU + (da * a * S**2 + db * b) / (a**2 * S**2 + b**2) * (x - a * MU)
    return v


def exact_score(x, t, path):
    """Score of the marginal of x_t: -(x - alpha MU) / (alpha^2 S^2 + sigma^2)."""
    a, b, _, _ = coefficients(t.view(-1, 1).to(torch.float64), path)
    return -(x - a * MU) / (a**2 * S**2 + b**2)


gaussian_velocity = path_velocity("linear")


def test_ode_is_exact_flow_map_in_the_limit_and_converges_at_order_1_and_2():
    x1 = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = MU + S * x1  # the flow of Gaussians maps z to mu + s z
    for heun, order in ((False, 1.0), (True, 2.0)):
        errs = [(ode_sample(gaussian_velocity, x1, n, heun=heun) - exact).abs().max().item() for n in (16, 32, 64)]
        rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
        assert all(abs(r - order) < 0.25 for r in rates), (heun, errs, rates)
    assert (ode_sample(gaussian_velocity, x1, 200, heun=True) - exact).abs().max() < 1e-4


def test_ode_counts_function_evaluations_and_keeps_dtype():
    calls = []

    def v(x, t):
        calls.append((x.dtype, t.shape))
        return torch.zeros_like(x)

    out = ode_sample(v, torch.zeros(3, 2, dtype=torch.float32), 5, heun=True)
    assert len(calls) == 2 * 5 - 1 and out.dtype == torch.float32
    assert all(dt == torch.float64 and shape == (3,) for dt, shape in calls)


def _final_step_marginal(t_last=0.04, path="linear"):
    """Mean and std after the SDE sampler's noiseless jump t_last -> 0 applied to the exact marginal at t_last.

    The jump is affine in x for Gaussian data; it shrinks dimensions whose std is comparable to t_last (it
    returns roughly the posterior mean), a property of the reference scheme, so the SDE target is this, not S.
    """
    t = torch.tensor([t_last], dtype=torch.float64)
    a, b, _, _ = coefficients(t, path)
    m, sd = a * MU, torch.sqrt(a**2 * S**2 + b**2)

    def jump(x):  # x + (0 - t)(v - 1/2 (2t) score), with the exact score
        return x - t * (path_velocity(path)(x, t) - t * exact_score(x, t, path))
    slope = jump(torch.ones(1, 4, dtype=torch.float64)) - jump(torch.zeros(1, 4, dtype=torch.float64))
    return jump(m.view(1, 4))[0], (slope.abs() * sd)[0]


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_score_from_velocity_is_the_exact_score_on_each_path(path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64) * 2
    t = torch.tensor([0.04, 0.3, 0.7, 1.0], dtype=torch.float64).repeat(4)
    score = score_from_velocity(path_velocity(path)(x, t), x, t, lambda t: coefficients(t, path))
    assert torch.allclose(score, exact_score(x, t, path), atol=1e-10)
    if path == "linear":  # the general formula reduces to the linear path's -((1 - t) v + x) / t
        v = torch.randn(16, 4, generator=g, dtype=torch.float64)
        assert torch.allclose(score_from_velocity(v, x, t), -((1 - t.view(-1, 1)) * v + x) / t.view(-1, 1))
    with pytest.raises(ValueError, match="path 'sine' is not one of"):  # what eval.generate builds the path with
        Transport("sine")


@pytest.mark.parametrize("sampler,path", [("ode", "linear"), ("ode", "cosine"), ("sde", "linear"), ("sde", "cosine")])
def test_samples_match_data_mean_and_covariance(sampler, path):
    n = 10000
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(n, 4, generator=g, dtype=torch.float64)
    velocity = path_velocity(path)
    if sampler == "ode":
        x0 = ode_sample(velocity, x1, 50, heun=True)
        target_mean, target_std = MU, S
    else:
        x0 = sde_sample(velocity, x1, 250, g, coefficients=lambda t: coefficients(t, path))
        target_mean, target_std = _final_step_marginal(path=path)
        assert (target_std / S - 1).abs().max() > 0.02  # the jump's shrinkage is visible on the s=0.2 dimension
    mean, std = x0.mean(0), x0.std(0)
    se_mean, se_std = S / math.sqrt(n), S / math.sqrt(2 * n)
    # Monte-Carlo error (5 standard errors) plus a small discretisation allowance
    assert ((mean - target_mean).abs() < 5 * se_mean + 0.005 * S).all(), (mean, target_mean)
    assert ((std - target_std).abs() < 5 * se_std + 0.005 * S).all(), (std, target_std)
    corr = torch.corrcoef(x0.T) - torch.eye(4, dtype=torch.float64)
    assert corr.abs().max() < 5 / math.sqrt(n)  # independent dimensions stay independent


def test_sde_uses_only_the_given_generator_and_final_step_is_noiseless():
    x1 = torch.randn(8, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = sde_sample(gaussian_velocity, x1, 20, torch.Generator().manual_seed(3))
    torch.manual_seed(123)  # the global RNG must not matter
    b = sde_sample(gaussian_velocity, x1, 20, torch.Generator().manual_seed(3))
    c = sde_sample(gaussian_velocity, x1, 20, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # t grid and calls: linspace(1, 0.04, N) then 0; the velocity is called exactly N times, at those times
    seen = []
    sde_sample(lambda x, t: (seen.append(t[0].item()), torch.zeros_like(x))[1], x1, 5, torch.Generator())
    assert seen == pytest.approx(torch.linspace(1, 0.04, 5, dtype=torch.float64).tolist())
    # noise draws: N - 1 (none on the final step to 0)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    sde_sample(gaussian_velocity, x1, 5, g)
    g2 = torch.Generator()
    g2.set_state(state)
    for _ in range(4):
        torch.randn(x1.shape, generator=g2, dtype=torch.float64)
    assert torch.equal(g.get_state(), g2.get_state())


def test_per_sample_generators_make_samples_independent_of_batching():
    x1 = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mu, s = MU[:3], S[:3]

    def v(x, t):
        t = t.view(-1, 1)
        var = (1 - t) ** 2 * s**2 + t**2
        return -mu + (t - (1 - t) * s**2) / var * (x - (1 - t) * mu)

    gens = lambda idx: [torch.Generator().manual_seed(100 + i) for i in idx]  # noqa: E731
    whole = sde_sample(v, x1, 10, gens(range(4)))
    parts = torch.cat([sde_sample(v, x1[:1], 10, gens([0])), sde_sample(v, x1[1:], 10, gens([1, 2, 3]))])
    assert torch.allclose(whole, parts, atol=1e-12)
    with pytest.raises(ValueError, match="2 generators for a batch of 4"):
        randn((4, 3), gens([0, 1]), "cpu")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_steps"):
        ode_sample(gaussian_velocity, torch.zeros(1, 4), 0)
    with pytest.raises(ValueError, match="t_last"):
        sde_sample(gaussian_velocity, torch.zeros(1, 4), 10, torch.Generator(), t_last=1.5)


def test_sde_two_steps_by_hand():
    """grid [1, 0.5, 0], constant v = c: x' = x + (c + x)(-0.5) + sqrt(2*1*0.5) eps; x0 = x' - 0.5 (1.5 c + x')."""
    x1 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    c = torch.tensor([[0.3, 0.7]], dtype=torch.float64)
    g = torch.Generator().manual_seed(9)
    out = sde_sample(lambda x, t: c.expand_as(x), x1, 2, g, t_last=0.5)
    eps = torch.randn(x1.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert torch.allclose(out, 0.25 * x1 - c + 0.5 * eps, atol=1e-12)
