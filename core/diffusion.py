"""Gaussian diffusion of DiT (improved DDPM, Nichol & Dhariwal 2021): the second objective of the shared trainer.

Discrete process of T steps (index s = 0 .. T-1; s = 0 is one step of noise from the data):

    q(x_s | x_0)         = N(sqrt(abar_s) x_0, (1 - abar_s) I),  abar_s = prod_{i<=s} (1 - beta_i)
    q(x_{s-1} | x_s, x_0) = N(c1_s x_0 + c2_s x_s, beta~_s I),  beta~_s = beta_s (1 - abar_{s-1}) / (1 - abar_s)
    p(x_{s-1} | x_s)     = N(mean(x_0 = x0_hat(eps)), exp(log_var)),  log_var = f log beta_s + (1 - f) log beta~_s,
                           f = (v + 1) / 2 from the model's second C output channels (learned range, unclamped)

The model predicts eps and v: its output has 2C channels (learn_sigma). Numbers follow DiT's
`create_diffusion(timestep_respacing="")` (diffusion/gaussian_diffusion.py there, from ADM/iDDPM):

- betas: "linear" = linspace(1e-4 * 1000/T, 0.02 * 1000/T, T) in float64 (Ho et al.'s schedule, rescaled so it
  stays similar for other T); "cosine" = iDDPM's squaredcos_cap_v2 (abar(u) = cos((u + 0.008)/1.008 * pi/2)^2,
  betas capped at 0.999).
- loss (LossType.MSE, learned range variance, RESCALED_MSE off): per sample
      mean over dims of (eps - eps_hat)^2  +  L_vb
  L_vb in bits/dim (mean over dims / ln 2) with the gradient stopped on eps_hat, so it trains only v: the KL
  D(q(x_{s-1}|x_s,x_0) || p(x_{s-1}|x_s)) for s > 0, and for s = 0 the negative log-likelihood of x_0 under the
  discretized Gaussian decoder (bins of width 2/255 on [-1, 1]). Weight of L_vb: 1. iDDPM's lambda = 0.001 on
  L_vlb = T * E_s[L_s] gives lambda * T = 1 at T = 1000; ADM multiplies by T/1000 only under RESCALED_MSE, which
  DiT leaves off, so at T = 1000 both readings give 1, and for other T we keep DiT's (no factor).
- s is drawn uniformly from {0..T-1}, then eps ~ N(0, I): both from the step's generator, in that order.

Time conventions, the one place they are defined:
- The model is fed the step index s of the original T-step process (as the official DiT, so its checkpoints
  reproduce their outputs); a respaced sampler maps its own index i to s = timestep_map[i].
- Samplers and the CFG interval speak t = s / T in [0, 1) (t -> 1 noise, t = 0 data), like the SiT samplers'
  t; `step_to_t` and `t_to_step` convert. An interval [low, high] thus selects the steps low*T <= s <= high*T
  (an index fraction: the same t is not the same noise level as on SiT's linear path).
"""
import math

import torch

from core.draws import RowDraws, as_draws


def step_to_t(step: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Sampler / guidance time t = s / T (float64) of original step indices s."""
    return step.to(torch.float64) / num_steps


def t_to_step(t: torch.Tensor, num_steps: int) -> torch.Tensor:
    """The original step index s = round(t * T) (float64, integral values) of times t = s / T: the model input."""
    return torch.round(t.to(torch.float64) * num_steps)


def beta_schedule(name: str, num_steps: int) -> torch.Tensor:
    """(T,) float64 betas: "linear" (DiT/DDPM, 1e-4..0.02 scaled by 1000/T) or "cosine" (iDDPM)."""
    if num_steps < 2:
        raise ValueError(f"a diffusion needs at least 2 steps, got {num_steps}")
    if name == "linear":
        scale = 1000 / num_steps
        if scale * 0.02 >= 1:
            raise ValueError(f"linear betas end at 20 / T = {scale * 0.02:g}: they need T > 20 steps")
        return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    if name == "cosine":
        abar = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), 0.999)
                             for i in range(num_steps)], dtype=torch.float64)
    raise ValueError(f"beta schedule {name!r} is not one of: linear, cosine")


def space_timesteps(num_steps: int, count: int) -> list[int]:
    """`count` original step indices evenly spread over 0..T-1, first and last included (DiT/ADM's respacing
    with one section: round(i * (T - 1) / (count - 1)), i = 0 .. count-1)."""
    if not 2 <= count <= num_steps:
        raise ValueError(f"cannot take {count} sampling steps from a {num_steps}-step diffusion (2..{num_steps})")
    stride, position, kept = (num_steps - 1) / (count - 1), 0.0, []
    for _ in range(count):  # accumulated like ADM's loop, so the rounding matches theirs exactly
        kept.append(round(position))
        position += stride
    return sorted(set(kept))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Elementwise KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of Phi(x) that ADM/DiT use (kept so the decoder term matches theirs)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """Elementwise log-probability (nats) of x in [-1, 1] under N(means, exp(log_scales)^2) discretized to 256 bins
    of width 2/255; the edge bins extend to -inf / +inf."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """DiT's diffusion with eps-prediction and learned-range variance; the `objective.kind=ddpm` objective.

    betas: (N,) float64. timestep_map: the original step index of each of the N steps (identity when not
    respaced); original_steps: T of the original process (time conventions in the module docstring).
    """

    learn_sigma = True  # the model outputs 2C channels: eps, then the variance interpolation v
    weights: dict = {}  # no losses besides its own hybrid loss

    def __init__(self, betas: torch.Tensor, timestep_map: list[int] | None = None,
                 original_steps: int | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        n = betas.shape[0]
        self.num_timesteps = n
        self.timestep_map = list(range(n)) if timestep_map is None else list(timestep_map)
        self.original_steps = original_steps or n
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        acp, prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.sqrt_alphas_cumprod = acp.sqrt()
        self.one_minus_alphas_cumprod = 1.0 - acp
        self.log_one_minus_alphas_cumprod = torch.log(1.0 - acp)
        self.sqrt_one_minus_alphas_cumprod = (1.0 - acp).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / acp).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / acp - 1).sqrt()
        self.posterior_variance = betas * (1.0 - prev) / (1.0 - acp)
        # beta~_0 = 0: the log is clipped to beta~_1 at s = 0 (as ADM), also the lower end of the learned range
        self.posterior_log_variance_clipped = torch.log(torch.cat([self.posterior_variance[1:2],
                                                                   self.posterior_variance[1:]]))
        self.log_betas = torch.log(betas)
        self.posterior_mean_coef1 = betas * prev.sqrt() / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - acp)
        self._tables: dict = {}

    @classmethod
    def from_config(cls, cfg) -> "GaussianDiffusion":
        """From an ObjectiveConfig (`diffusion_steps`, `beta_schedule`)."""
        return cls(beta_schedule(cfg.beta_schedule, cfg.diffusion_steps))

    def respace(self, count: int) -> "GaussianDiffusion":
        """The `count`-step process on evenly spaced original steps (space_timesteps), with betas
        1 - abar_{s_k} / abar_{s_{k-1}} so its abar at each kept step equals the original's (DiT/ADM)."""
        kept = space_timesteps(self.num_timesteps, count)
        abar = self.alphas_cumprod[kept]
        betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
        return GaussianDiffusion(betas, [self.timestep_map[k] for k in kept], self.original_steps)

    # ------------------------------------------------------------------------------------------------ index/time

    def t_of(self, index: torch.Tensor) -> torch.Tensor:
        """Sampler time t (float64) of this process's step indices (through the respacing map)."""
        smap = torch.tensor(self.timestep_map, device=index.device)
        return step_to_t(smap[index], self.original_steps)

    def model_step(self, t: torch.Tensor) -> torch.Tensor:
        """The model's timestep input (the original step index) for sampler times t."""
        return t_to_step(t, self.original_steps)

    # ---------------------------------------------------------------------------------------------------- math

    def _extract(self, name: str, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table `name` at `index` in like's dtype, shaped (B, 1, ..., 1) to broadcast over like (B, ...).

        The float64 tables are copied once per device (no host-to-device copy per training step).
        """
        key = (name, like.device)
        if key not in self._tables:
            self._tables[key] = getattr(self, name).to(like.device)
        return self._tables[key][index].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def q_mean_variance(self, x0: torch.Tensor, index: torch.Tensor):
        """Mean, variance and log-variance of q(x_s | x_0); x0: (B, ...), index: (B,) long."""
        e = lambda name: self._extract(name, index, x0)  # noqa: E731
        return e("sqrt_alphas_cumprod") * x0, e("one_minus_alphas_cumprod"), e("log_one_minus_alphas_cumprod")

    def q_sample(self, x0: torch.Tensor, index: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) noise."""
        return (self._extract("sqrt_alphas_cumprod", index, x0) * x0
                + self._extract("sqrt_one_minus_alphas_cumprod", index, x0) * noise)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, index: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{s-1} | x_s, x_0)."""
        e = lambda name: self._extract(name, index, x_t)  # noqa: E731
        mean = e("posterior_mean_coef1") * x0 + e("posterior_mean_coef2") * x_t
        return mean, e("posterior_variance"), e("posterior_log_variance_clipped")

    def predict_x0(self, x_t: torch.Tensor, index: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (self._extract("sqrt_recip_alphas_cumprod", index, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", index, x_t) * eps)

    def p_mean_variance(self, out: torch.Tensor, x_t: torch.Tensor, index: torch.Tensor):
        """(mean, log-variance, x0_hat) of p(x_{s-1} | x_s) from the model output out = [eps | v] (B, 2C, ...).

        No clipping of x0_hat (DiT samples latents with clip_denoised=False).
        """
        c = x_t.shape[1]
        if out.shape[1] != 2 * c:
            raise ValueError(f"the ddpm objective needs the model's learned variance: expected {2 * c} output "
                             f"channels (eps and v) for {c}-channel inputs, got {out.shape[1]}")
        eps, v = out[:, :c], out[:, c:]
        frac = (v + 1) / 2
        log_var = (frac * self._extract("log_betas", index, x_t)
                   + (1 - frac) * self._extract("posterior_log_variance_clipped", index, x_t))
        x0_hat = self.predict_x0(x_t, index, eps)
        mean, _, _ = self.q_posterior(x0_hat, x_t, index)
        return mean, log_var, x0_hat

    def vb_terms_bpd(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, index: torch.Tensor):
        """(B,) variational-bound term in bits/dim: KL(q(x_{s-1}|x_s,x_0) || p) for s > 0, the decoder NLL at s = 0."""
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, index)
        mean, log_var, _ = self.p_mean_variance(out, x_t, index)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(index == 0, nll, kl)

    # -------------------------------------------------------------------------------------------------- training

    def loss(self, model, x0: torch.Tensor, cond: dict, generator: RowDraws | torch.Generator, taps=None):
        """Per-sample hybrid loss (B,) float32 (module docstring) and the model's projected REPA tokens; with
        `taps` (core.repa.Taps) also what the model tapped, as a third element.

        model(x_s, s, **cond) -> ([eps | v] (B, 2C, H, W), zs), s: (B,) long original step indices; x0: (B, C, H, W)
        scaled latents; generator (or core.draws.RowDraws) draws s, then the noise.
        """
        if self.num_timesteps != self.original_steps:
            raise ValueError("the loss is defined on the full process, not a respaced one")
        draws = as_draws(generator)
        index = draws.randint(self.num_timesteps, (x0.shape[0],), x0.device)
        noise = draws.randn(x0.shape, x0.device, x0.dtype)
        x_t = self.q_sample(x0, index, noise)
        out, zs, *tapped = model(x_t, index, **cond) if taps is None else model(x_t, index, taps=taps, **cond)
        out, x0, x_t = out.float(), x0.float(), x_t.float()
        c = x0.shape[1]
        if out.shape[1] != 2 * c:
            raise ValueError(f"the ddpm objective needs a model with learned sigma ({2 * c} output channels for "
                             f"{c}-channel latents), got {out.shape[1]}")
        eps = out[:, :c]
        mse = mean_flat((noise.float() - eps) ** 2)
        frozen = torch.cat([eps.detach(), out[:, c:]], dim=1)  # the VLB term learns the variance only
        return (mse + self.vb_terms_bpd(frozen, x0, x_t, index), zs, *tapped)
