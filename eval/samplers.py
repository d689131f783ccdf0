"""Samplers, pure functions of a model callable: ODE/SDE for the flow model (SiT, linear or cosine path),
ancestral DDPM and DDIM for the discrete Gaussian diffusion (DiT). They import nothing of this project: what they
need of a path or a diffusion comes in as arguments.

Conventions (the REPA reference's generate.py and samplers.py): t = 1 is noise, t = 0 is data, x_t = alpha_t x0 +
sigma_t eps, `velocity(x, t) -> v` with x (B, ...) and t (B,); the loop runs in float64. Noise comes only from the
explicit generator(s) passed in, so a sampler can be tested against a closed-form velocity with no network at all.
The ODE needs no path (it integrates v); the SDE does: its score comes from v through the path's coefficients
`coefficients(t) -> (alpha_t, sigma_t, d alpha/dt, d sigma/dt)` (core.transport.Transport.alpha_sigma; the linear
path alpha = 1 - t, sigma = t by default).

Guidance is decided once per step, at the step's start t_cur, as the reference's euler/heun samplers: a velocity
with `takes_guide_t = True` (eval.guidance.GuidedVelocity) is called as velocity(x, t, guide_t=t_cur) by Heun's
corrector, so a step that starts outside the guidance interval is not guided at t_next either. Plain v(x, t)
callables are called with (x, t) only.

NFE: ode_sample N steps = N (Euler) or 2N - 1 (Heun, correction skipped on the last step); sde_sample N = N;
ddpm_sample and ddim_sample on an N-step respaced diffusion = N. The diffusion samplers call
`denoiser(x, t) -> [eps | v]` with t = s / T of the original step s (core.diffusion's time convention), so the
guidance wrapper and its interval work unchanged.
"""
from typing import Any, Callable, Sequence, Union

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = Union[torch.Generator, Sequence[torch.Generator]]
Coefficients = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
# A discrete diffusion as ddpm_sample/ddim_sample use it (core.diffusion.GaussianDiffusion): num_timesteps, t_of,
# p_mean_variance, predict_x0, alphas_cumprod, alphas_cumprod_prev.
Diffusion = Any


def linear_coefficients(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha, sigma, d alpha, d sigma) of the linear path x_t = (1 - t) x0 + t eps (the paper's, Sec. 2)."""
    return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)


def randn(shape: Sequence[int], generator: Generators, device, dtype=torch.float64) -> torch.Tensor:
    """Standard normal noise of `shape`; a list of generators draws sample b (dim 0) from generator[b], so a
    sample's noise does not depend on which batch it lands in."""
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: give one per sample")
    return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in generator])


def _v(velocity: Velocity, x: torch.Tensor, t: torch.Tensor, guide_t: torch.Tensor | None = None) -> torch.Tensor:
    """velocity at scalar time t for the batch x; guide_t (scalar): the time deciding guidance, if it takes one."""
    b = x.shape[0]
    if guide_t is not None and getattr(velocity, "takes_guide_t", False):
        return velocity(x, t.expand(b), guide_t=guide_t.expand(b)).to(torch.float64)
    return velocity(x, t.expand(b)).to(torch.float64)


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """LightningDiT's sampling time shift (transport/integrators.py), s * u / (1 + (s - 1) * u) on its time u = 0
    noise, u = 1 data; in ours (t = 1 - u) that is t / (s + (1 - s) * t). s < 1 puts more of the steps near the
    noise (its VA-VAE config: s = 0.3); s = 1 is the identity. Ends stay at 1 and 0."""
    if not shift > 0:
        raise ValueError(f"time shift must be > 0 (1 = none), got {shift}")
    if shift == 1.0:
        return t
    u = 1 - t
    shifted = 1 - shift * u / (1 + (shift - 1) * u)
    return torch.where((t == 0) | (t == 1), t, shifted)  # the ends exact: the last step lands on t = 0


def ode_sample(velocity: Velocity, x1: torch.Tensor, num_steps: int, heun: bool = False,
               time_shift: float = 1.0) -> torch.Tensor:
    """Integrate dx/dt = v from t=1 to t=0 on linspace(1, 0, num_steps + 1) with Euler or Heun; with time_shift
    s != 1 on that grid mapped by shift_times (LightningDiT's shifted Euler).

    x1: (B, ...) noise. Heun's correction is skipped on the last step (t_next = 0), as the reference, and takes the
    guidance decision of t_cur (module docstring). Returns x0 (B, ...) in x1's dtype.
    """
    _check_steps(num_steps)
    ts = shift_times(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64, device=x1.device), time_shift)
    x = x1.to(torch.float64)
    for i in range(num_steps):
        t_cur, t_next = ts[i], ts[i + 1]
        d_cur = _v(velocity, x, t_cur)
        x_next = x + (t_next - t_cur) * d_cur
        if heun and i < num_steps - 1:
            d_next = _v(velocity, x_next, t_next, guide_t=t_cur)
            x_next = x + (t_next - t_cur) * 0.5 * (d_cur + d_next)
        x = x_next
    return x.to(x1.dtype)


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                        coefficients: Coefficients = linear_coefficients) -> torch.Tensor:
    """Score of x_t = alpha_t x0 + sigma_t eps from its velocity (the reference's get_score_from_velocity):
    s = (r v - x) / (sigma^2 - r sigma d_sigma), r = alpha / d_alpha; for the linear path s = -((1 - t) v + x) / t.

    v, x: (B, ...); t: () or (B,) with t > 0 (broadcast over x); coefficients: the path's (module docstring).
    """
    t = t.view(-1, *([1] * (x.dim() - 1))) if t.dim() else t
    alpha, sigma, d_alpha, d_sigma = coefficients(t.to(torch.float64))
    ratio = alpha / d_alpha
    return (ratio * v - x) / (sigma**2 - ratio * d_sigma * sigma)


def sde_sample(velocity: Velocity, x1: torch.Tensor, num_steps: int, generator: Generators,
               t_last: float = 0.04, coefficients: Coefficients = linear_coefficients) -> torch.Tensor:
    """Euler–Maruyama on linspace(1, t_last, num_steps), then one noiseless step to t = 0 (the drift's mean).

    Diffusion coefficient g² = 2t for every path, as the reference (compute_diffusion): any g leaves the
    marginals of x_t unchanged, only the score depends on the path. Drift d = v - ½·2t·score (score from v through
    the `coefficients` of the path the model was trained on), noise std sqrt(2t·|dt|).
    x1: (B, ...) noise; generator: one torch.Generator, or one per sample. Returns x0 in x1's dtype. NFE = num_steps.
    """
    _check_steps(num_steps, minimum=2)
    if not 0.0 < t_last < 1.0:
        raise ValueError(f"t_last must be in (0, 1), got {t_last}")
    ts = torch.linspace(1.0, t_last, num_steps, dtype=torch.float64, device=x1.device)
    ts = torch.cat([ts, ts.new_zeros(1)])
    x = x1.to(torch.float64)
    for i in range(num_steps):
        t_cur, t_next = ts[i], ts[i + 1]
        dt = t_next - t_cur
        v = _v(velocity, x, t_cur)
        diffusion = 2.0 * t_cur
        drift = v - 0.5 * diffusion * score_from_velocity(v, x, t_cur, coefficients)
        x = x + drift * dt
        if i < num_steps - 1:  # the last step, to t = 0, takes the mean only
            x = x + torch.sqrt(diffusion * dt.abs()) * randn(x.shape, generator, x.device)
    return x.to(x1.dtype)


def _check_steps(num_steps: int, minimum: int = 1) -> None:
    if not isinstance(num_steps, int) or num_steps < minimum:
        raise ValueError(f"num_steps must be an integer >= {minimum}, got {num_steps!r}")


def _denoise(denoiser: Velocity, diffusion: Diffusion, x: torch.Tensor,
             i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(denoiser output in float64, the (B,) step index i) at step i of `diffusion`."""
    index = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
    return denoiser(x, diffusion.t_of(index)).to(torch.float64), index


def ddpm_sample(denoiser: Velocity, x_T: torch.Tensor, diffusion: Diffusion,
                generator: Generators) -> torch.Tensor:
    """Ancestral sampling x_{s-1} ~ p(x_{s-1} | x_s) over every step of `diffusion` (respace it for fewer steps).

    denoiser(x, t) -> (B, 2C, ...) [eps | v] (learned variance); x_T: (B, C, ...) noise; generator: one, or one per
    sample. The last step returns the mean (no noise), as DiT/ADM. Returns x_0 in x_T's dtype; NFE = steps.
    """
    x = x_T.to(torch.float64)
    for i in reversed(range(diffusion.num_timesteps)):
        out, index = _denoise(denoiser, diffusion, x, i)
        mean, log_var, _ = diffusion.p_mean_variance(out, x, index)
        x = mean + torch.exp(0.5 * log_var) * randn(x.shape, generator, x.device) if i > 0 else mean
    return x.to(x_T.dtype)


def ddim_sample(denoiser: Velocity, x_T: torch.Tensor, diffusion: Diffusion, eta: float = 0.0,
                generator: Generators | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021) over every step of `diffusion`:
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev).

    denoiser(x, t) -> (B, C or 2C, ...), eps in the first C channels; eta = 0 (DiT's default) is deterministic,
    eta > 0 needs `generator`. Returns x_0 in x_T's dtype; NFE = steps.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and generator is None:
        raise ValueError("ddim_sample with eta > 0 draws noise: pass a generator")
    x = x_T.to(torch.float64)
    c = x.shape[1]
    for i in reversed(range(diffusion.num_timesteps)):
        out, index = _denoise(denoiser, diffusion, x, i)
        eps = out[:, :c]
        x0_hat = diffusion.predict_x0(x, index, eps)
        abar, abar_prev = diffusion.alphas_cumprod[i].item(), diffusion.alphas_cumprod_prev[i].item()
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5
        x = abar_prev ** 0.5 * x0_hat + (1 - abar_prev - sigma**2) ** 0.5 * eps
        if sigma > 0 and i > 0:
            x = x + sigma * randn(x.shape, generator, x.device)
    return x.to(x_T.dtype)
