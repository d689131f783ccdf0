"""Exponential moving averages of the model weights, in float32.

Under ZeRO-3 each rank averages its own partition of every parameter (DeepSpeed's `ds_tensor`: elements
[rank * n, (rank + 1) * n) of the flattened parameter, zero-padded at the end), so a step gathers nothing and a
rank holds 1/world of the averages; the whole averages are gathered only to save, export or sample. Elsewhere
each rank holds the whole averages, identical on every rank.

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


def _local(p: nn.Parameter) -> torch.Tensor:
    """What this rank averages of `p`: its ZeRO-3 partition (flat), or the whole parameter."""
    return (p.ds_tensor if hasattr(p, "ds_tensor") else p).detach()


def _current(module: nn.Module, names: list[str]) -> list[torch.Tensor]:
    """The float32 values of this rank's part of `module`'s parameters `names` (views when float32 already)."""
    params = dict(module.named_parameters())
    return [_local(params[n]).float() for n in names]


def _whole(part: torch.Tensor, p: nn.Parameter | None) -> torch.Tensor:
    """The whole average of parameter `p` from every rank's partition `part` (a collective), on the CPU; `part`
    itself when `p` is not partitioned (None)."""
    if p is None:
        return part.cpu().clone()
    world = torch.distributed.get_world_size()
    if part.numel() * world != p.ds_numel_aligned:
        raise RuntimeError(f"a ZeRO-3 partition of {part.numel()} elements on {world} ranks does not make a "
                           f"parameter of {p.ds_numel} ({p.ds_numel_aligned} aligned)")
    parts = [torch.empty_like(part) for _ in range(world)]
    torch.distributed.all_gather(parts, part.contiguous())
    return torch.cat(parts)[:p.ds_numel].view(p.ds_shape).cpu()


def _partition_of(whole: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """This rank's partition of the flattened `whole`, shaped like `part` (zeros past the end)."""
    n, start = part.numel(), torch.distributed.get_rank() * part.numel()
    out = torch.zeros_like(part)
    flat = whole.reshape(-1)[start:start + n]
    out[:flat.numel()] = flat.to(out.device, out.dtype)
    return out


class EMA:
    """shadow = decay * shadow + (1 - decay) * weights after every optimiser step (paper: decay 0.9999)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.shadow = {n: _local(p).float().clone() for n, p in params.items()}
        self.partitioned = {n: p for n, p in params.items() if hasattr(p, "ds_tensor")}  # ZeRO-3 parameters

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.lerp(_current(module, list(self.shadow)))

    def lerp(self, current: list[torch.Tensor]) -> None:
        """One fused update towards `current`, the parameters in the order of `shadow`."""
        torch._foreach_lerp_(list(self.shadow.values()), current, 1.0 - self.decay)

    def whole(self, shadow: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`shadow` (this EMA's or a profile's, same names) as whole CPU tensors: a collective under ZeRO-3."""
        return {n: _whole(t, self.partitioned.get(n)) for n, t in shadow.items()}

    def state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Full model state dict with EMA weights (buffers such as pos_embed from `module`), float32, CPU, on every
        rank (every rank calls it: under ZeRO-3 it gathers)."""
        with gathered_params([p for p in module.parameters() if not p.requires_grad]):
            out = {n: t.detach().float().cpu().clone() for n, t in module.state_dict().items() if n not in self.shadow}
        return {**out, **self.whole(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.copy_checked(self.shadow, state, "EMA")

    def copy_checked(self, shadow: dict[str, torch.Tensor], state: dict[str, torch.Tensor], what: str) -> None:
        """Load the whole tensors `state` into `shadow` (this rank's partitions under ZeRO-3), names and shapes
        checked."""
        missing = [n for n in shadow if n not in state]
        if missing:
            raise KeyError(f"{what} checkpoint lacks parameter {missing[0]!r}")
        for n, t in shadow.items():
            p = self.partitioned.get(n)
            shape = tuple(p.ds_shape) if p is not None else tuple(t.shape)
            if tuple(state[n].shape) != shape:
                raise ValueError(f"{what} parameter {n!r}: checkpoint shape {tuple(state[n].shape)} != {shape}")
            t.copy_(_partition_of(state[n], t) if p is not None else state[n])


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
        self.ema = ema  # whose partitioning the profiles share
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
        """Full model state dict with profile i's weights (the rest: `extras`), float32, CPU (every rank calls
        it: under ZeRO-3 it gathers)."""
        return {**extras, **self.ema.whole(self.shadows[i])}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The profiles as one flat dict of whole CPU tensors, "{i}/{name}" (i: the index in sigma_rels); every
        rank calls it."""
        return {f"{i}/{n}": t for i, shadow in enumerate(self.shadows) for n, t in self.ema.whole(shadow).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, shadow in enumerate(self.shadows):
            prefix = f"{i}/"
            self.ema.copy_checked(shadow, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                  f"post-hoc EMA (sigma_rel {self.sigma_rels[i]})")


@torch.no_grad()
def update_averages(module: nn.Module, ema: EMA, power: PowerEMA | None, t: int) -> None:
    """After optimiser step `t` (1-indexed): the classic EMA's update and each power profile's, from the same
    reads of this rank's parameters (under ZeRO-3 its partitions: nothing is gathered)."""
    current = _current(module, list(ema.shadow))
    ema.lerp(current)
    if power is not None:
        power.lerp(current, t)
