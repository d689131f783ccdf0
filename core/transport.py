"""Stochastic-interpolant transport (SiT): x_t = alpha_t x0 + sigma_t eps, v-prediction, time sampling.

Conventions of the REPA paper and its reference implementation: t = 0 is data, t = 1 is noise; the linear path is
x_t = (1 - t) x0 + t eps with target velocity v = eps - x0; t is fed raw (0..1) to the model.
"""
import math

import torch

from core.diffusion import GaussianDiffusion
from core.draws import RowDraws, as_draws


class Transport:
    """The SiT training objective: one swappable piece of the trainer (DiT's DDPM objective is another).

    An objective turns clean latents x0 (B, C, H, W) and the model's condition into a per-sample denoising loss
    and the model's projected REPA tokens.
    """

    learn_sigma = False  # SiT predicts velocity only: the model's output has the latent's channel count

    def __init__(self, path: str = "linear", time_sampling: str = "uniform", direction_loss: float = 0.0):
        if path not in ("linear", "cosine"):
            raise ValueError(f"transport path {path!r} is not one of: linear, cosine")
        if time_sampling not in ("uniform", "lognormal"):
            raise ValueError(f"time sampling {time_sampling!r} is not one of: uniform, lognormal")
        self.path = path
        self.time_sampling = time_sampling
        self.direction_weight = float(direction_loss)
        # the losses besides the MSE it returns per sample (in the third element) and their weights
        self.weights = {"direction_loss": self.direction_weight} if direction_loss else {}

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Coefficients (alpha_t, sigma_t, d alpha/dt, d sigma/dt) for t of any shape."""
        if self.path == "linear":
            return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
        half_pi = math.pi / 2
        return (torch.cos(half_pi * t), torch.sin(half_pi * t),
                -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t))

    def sample_t(self, n: int, generator: RowDraws | torch.Generator, device: torch.device) -> torch.Tensor:
        """(n,) float32 times in [0, 1]: uniform, or lognormal (sigma/alpha = exp(N(0, 1)))."""
        draws = as_draws(generator)
        if self.time_sampling == "uniform":
            return draws.rand((n,), device)
        ratio = draws.randn((n,), device).exp()  # sigma_t / alpha_t
        if self.path == "linear":
            return ratio / (1 + ratio)
        return torch.atan(ratio) / (math.pi / 2)

    def interpolate(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t and the target velocity d x_t / dt for x0, eps (B, ...) and t (B,)."""
        shape = (-1,) + (1,) * (x0.dim() - 1)
        alpha, sigma, d_alpha, d_sigma = (c.view(shape) for c in self.alpha_sigma(t))
        return alpha * x0 + sigma * eps, d_alpha * x0 + d_sigma * eps

    def loss(self, model, x0: torch.Tensor, cond: dict, generator: RowDraws | torch.Generator, taps=None,
             cls: torch.Tensor | None = None):
        """Per-sample velocity MSE (B,) float32 and the model's projected tokens; with `taps` (core.repa.Taps:
        what a REPA-family term needs of the forward) also what the model tapped, as a third element.

        model(x_t, t, **cond) -> (velocity, zs); x0: (B, C, H, W) scaled latents; generator (or core.draws.RowDraws) draws t and eps.
        cls: REG's clean encoder class token (B, D): noised on the same path at the same t with its own noise
        (drawn after eps), fed to the model as `cls`; the third element then holds "cls_loss", the token's
        per-sample velocity MSE (B,).
        With direction_loss > 0 the third element holds "direction_loss" (B,) too: LightningDiT's
        mean over positions of 1 - cos(v_pred, v) across channels; the caller adds it with `weights`.
        """
        draws = as_draws(generator)
        t = self.sample_t(x0.shape[0], draws, x0.device)
        eps = draws.randn(x0.shape, x0.device, x0.dtype)
        x_t, target = self.interpolate(x0, eps, t)
        kwargs = dict(cond, **({} if taps is None else {"taps": taps}))
        if cls is not None:
            eps_cls = draws.randn(cls.shape, cls.device, cls.dtype)
            kwargs["cls"], cls_target = self.interpolate(cls, eps_cls, t)
        pred, zs, *tapped = model(x_t, t, **kwargs)
        mse = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        if cls is not None:
            cls_mse = (tapped[0]["cls"].float() - cls_target.float()).pow(2).mean(dim=1)
            tapped = [{**tapped[0], "cls_loss": cls_mse}]
        if self.direction_weight:
            cos = torch.nn.functional.cosine_similarity(pred.float(), target.float(), dim=1)  # (B, H, W)
            tapped = [{**(tapped[0] if tapped else {}), "direction_loss": (1 - cos).flatten(1).mean(dim=1)}]
        return (mse, zs, *tapped)


OBJECTIVE_KINDS = ("transport", "ddpm")


def build_objective(cfg):
    """The objective named by an ObjectiveConfig (`objective.kind`): Transport (SiT) or, for "ddpm", DiT's
    core.diffusion.GaussianDiffusion. Both have `learn_sigma` and `loss(model, x0, cond, generator)`."""
    if cfg.kind == "transport":
        return Transport(cfg.path, cfg.time_sampling, getattr(cfg, "direction_loss", 0.0))
    if cfg.kind == "ddpm":
        return GaussianDiffusion.from_config(cfg)
    raise ValueError(f"objective.kind {cfg.kind!r} is not one of: {', '.join(OBJECTIVE_KINDS)}")
