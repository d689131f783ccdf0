"""Exponential moving averages of the model weights, in float32, identical on every rank (also under ZeRO-3).

`EMA` is the classic one (decay 0.9999 per step). `PowerEMA` keeps the power-function profiles of post-hoc EMA
(Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", arXiv 2312.02696,
Sec. 3.1 and App. C): the average at step t weighs the weights of step tau in proportion to tau**gamma, so its
width relative to the length of training, sigma_rel, stays fixed as training goes on. Snapshots of two such
profiles, taken every few million images, let core.posthoc_ema reconstruct the EMA of any other sigma_rel later.
"""
import contextlib
import math

import numpy as np
import torch
from torch import nn

EDM2_SIGMA_RELS = (0.050, 0.100)  # the two profiles edm2 keeps (its PowerFunctionEMA default)
EDM2_SNAPSHOT_IMAGES = 8 << 20  # edm2 snapshots every 8 Mi training images (its --snapshot default)
MAX_SIGMA_REL = math.sqrt(1 / 12)  # gamma -> 0: the uniform average over all of training, sigma_rel = 0.2887


def gathered_params(params: list):
    """Context in which every parameter of `params` is whole: a ZeRO-3 gather, else nothing."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed  # only ZeRO-3 parameters (they carry ds_id) need it; its import probes the accelerator

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def gathered(module: nn.Module):
    """Context in which every parameter of `module` is whole: a ZeRO-3 gather, else nothing."""
    return gathered_params(list(module.parameters()))


def _current(module: nn.Module, names: list[str]) -> list[torch.Tensor]:
    """The float32 values of `module`'s parameters `names` (views when they are float32 already)."""
    params = dict(module.named_parameters())
    return [params[n].detach().float() for n in names]


class EMA:
    """shadow = decay * shadow + (1 - decay) * weights after every optimiser step (paper: decay 0.9999)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        with gathered(module):
            self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        with gathered(module):
            self.lerp(_current(module, list(self.shadow)))

    def lerp(self, current: list[torch.Tensor]) -> None:
        """One fused update towards `current`, the parameters in the order of `shadow`."""
        torch._foreach_lerp_(list(self.shadow.values()), current, 1.0 - self.decay)

    def state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Full model state dict with EMA weights (buffers such as pos_embed from `module`), float32, CPU."""
        with gathered(module):
            out = {n: t.detach().float().cpu().clone() for n, t in module.state_dict().items()}
        out.update({n: t.cpu().clone() for n, t in self.shadow.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        _copy_checked(self.shadow, state, "EMA")


def _copy_checked(shadow: dict[str, torch.Tensor], state: dict[str, torch.Tensor], what: str) -> None:
    missing = [n for n in shadow if n not in state]
    if missing:
        raise KeyError(f"{what} checkpoint lacks parameter {missing[0]!r}")
    for n, t in shadow.items():
        if state[n].shape != t.shape:
            raise ValueError(f"{what} parameter {n!r}: checkpoint shape {tuple(state[n].shape)} != {tuple(t.shape)}")
        t.copy_(state[n])


# ------------------------------------------------------------------------------------------ power-function EMA


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power-function profile of relative width `sigma_rel` (arXiv 2312.02696, Eq. 126
    and Algorithm 2): the largest real root of gamma**3 + 7 gamma**2 + (16 - s**-2) gamma + (12 - s**-2), which
    inverts gamma_to_sigma_rel. `sigma_rel` in (0, MAX_SIGMA_REL)."""
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}), got {sigma_rel}")
    inv = float(sigma_rel) ** -2
    return float(np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv]).real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the profile tau**gamma on [0, 1] (arXiv 2312.02696, Eq. 123):
    sqrt((gamma + 1) / ((gamma + 2)**2 (gamma + 3)))."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_beta(gamma: float, t: int) -> float:
    """The decay of the update at optimiser step t (1, 2, ...): (1 - 1/t)**(gamma + 1) (arXiv 2312.02696, Eq. 127,
    in steps: edm2's t_delta / t_next is one batch over the images seen). Step t's weights then carry the weight
    (t**(gamma+1) - (t-1)**(gamma+1)) / T**(gamma+1) in the average at step T: the profile's integral over the step."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def snapshot_every(phema_every: int, global_batch: int) -> int:
    """Optimiser steps between post-hoc EMA snapshots: `phema_every`, or for 0 edm2's 8 Mi images in steps of
    `global_batch` samples (4096 steps at edm2's batch 2048, 32768 at REPA's 256)."""
    return phema_every or max(1, round(EDM2_SNAPSHOT_IMAGES / global_batch))


class PowerEMA:
    """Power-function EMAs of the parameters `ema` averages, one per sigma_rel in `sigma_rels` (float32, same
    names as `ema.shadow`); `lerp(current, t)` after optimiser step t."""

    def __init__(self, ema: EMA, sigma_rels: list[float]):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.names = list(ema.shadow)
        self.shadows = [{n: t.clone() for n, t in ema.shadow.items()} for _ in self.sigma_rels]

    def lerp(self, current: list[torch.Tensor], t: int) -> None:
        """After optimiser step `t` (1-indexed): one fused update per profile towards `current` (order of names)."""
        for gamma, shadow in zip(self.gammas, self.shadows):
            torch._foreach_lerp_(list(shadow.values()), current, 1.0 - power_beta(gamma, t))

    def extras(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """What a snapshot takes from `module`: its state beside the averaged parameters (buffers, frozen
        parameters), float32, CPU. Under ZeRO-3 with frozen parameters it gathers them: every rank calls it."""
        names = set(self.names)
        with gathered_params([p for n, p in module.named_parameters() if n not in names]):
            return {n: t.detach().float().cpu().clone() for n, t in module.state_dict().items() if n not in names}

    def snapshot(self, extras: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        """Full model state dict with profile i's weights (the rest: `extras`), float32, CPU."""
        return {**extras, **{n: t.cpu().clone() for n, t in self.shadows[i].items()}}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The profiles as one flat dict of CPU tensors, "{i}/{name}" (i: the index in sigma_rels)."""
        return {f"{i}/{n}": t.cpu().clone() for i, shadow in enumerate(self.shadows) for n, t in shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, shadow in enumerate(self.shadows):
            prefix = f"{i}/"
            _copy_checked(shadow, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                          f"post-hoc EMA (sigma_rel {self.sigma_rels[i]})")


@torch.no_grad()
def update_averages(module: nn.Module, ema: EMA, power: PowerEMA | None, t: int) -> None:
    """After optimiser step `t` (1-indexed): the classic EMA's update and each power profile's, on one gather."""
    with gathered(module):
        current = _current(module, list(ema.shadow))
        ema.lerp(current)
        if power is not None:
            power.lerp(current, t)
