"""ODE and SDE samplers of the linear-path flow model: pure functions of a velocity callable.

Conventions (NOTES.md, the REPA reference's generate.py): t = 1 is noise, t = 0 is data, x_t = (1 - t) x0 + t eps,
`velocity(x, t) -> v` with x (B, ...) and t (B,); the loop runs in float64. Noise comes only from the explicit
generator(s) passed in, so a sampler can be tested against a closed-form velocity with no network at all.

NFE: ode_sample N steps = N (Euler) or 2N - 1 (Heun, correction skipped on the last step); sde_sample N = N.
"""
from typing import Callable, Sequence, Union

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = Union[torch.Generator, Sequence[torch.Generator]]


def randn(shape: Sequence[int], generator: Generators, device, dtype=torch.float64) -> torch.Tensor:
    """Standard normal noise of `shape`; a list of generators draws sample b (dim 0) from generator[b], so a
    sample's noise does not depend on which batch it lands in."""
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: give one per sample")
    return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in generator])


def _v(velocity: Velocity, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return velocity(x, t.expand(x.shape[0])).to(torch.float64)


def ode_sample(velocity: Velocity, x1: torch.Tensor, num_steps: int, heun: bool = False) -> torch.Tensor:
    """Integrate dx/dt = v from t=1 to t=0 on linspace(1, 0, num_steps + 1) with Euler or Heun.

    x1: (B, ...) noise. Heun's correction is skipped on the last step (t_next = 0), as the reference. Returns x0
    (B, ...) in x1's dtype.
    """
    _check_steps(num_steps)
    ts = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64, device=x1.device)
    x = x1.to(torch.float64)
    for i in range(num_steps):
        t_cur, t_next = ts[i], ts[i + 1]
        d_cur = _v(velocity, x, t_cur)
        x_next = x + (t_next - t_cur) * d_cur
        if heun and i < num_steps - 1:
            d_next = _v(velocity, x_next, t_next)
            x_next = x + (t_next - t_cur) * 0.5 * (d_cur + d_next)
        x = x_next
    return x.to(x1.dtype)


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Score of the linear path from its velocity: s = -((1 - t) v + x) / t (t > 0, broadcast over x)."""
    t = t.view(-1, *([1] * (x.dim() - 1))) if t.dim() else t
    return -((1 - t) * v + x) / t


def sde_sample(velocity: Velocity, x1: torch.Tensor, num_steps: int, generator: Generators,
               t_last: float = 0.04) -> torch.Tensor:
    """Euler–Maruyama on linspace(1, t_last, num_steps), then one noiseless step to t = 0 (the drift's mean).

    Diffusion coefficient g² = 2t (the reference): drift d = v - ½·2t·score, noise std sqrt(2t·|dt|).
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
        drift = v - 0.5 * diffusion * score_from_velocity(v, x, t_cur)
        x = x + drift * dt
        if i < num_steps - 1:  # the last step, to t = 0, takes the mean only
            x = x + torch.sqrt(diffusion * dt.abs()) * randn(x.shape, generator, x.device)
    return x.to(x1.dtype)


def _check_steps(num_steps: int, minimum: int = 1) -> None:
    if not isinstance(num_steps, int) or num_steps < minimum:
        raise ValueError(f"num_steps must be an integer >= {minimum}, got {num_steps!r}")
