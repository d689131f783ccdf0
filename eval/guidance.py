"""Classifier-free guidance as a velocity callable for eval.samplers.

v = v_uncond + w (v_cond - v_uncond), applied per sample only where low <= t <= high (the guidance interval,
Kynkäänniemi et al. 2024; REPA's 1.42 uses w = 1.8 on [0, 0.7]), the plain conditional velocity elsewhere.
Conditional and unconditional halves go through the model in one batched forward, as the reference does.

The same wrapper serves DiT's eps-prediction (eval.samplers.ddpm_sample/ddim_sample): guidance applies to eps, hence
to the mean, which is linear in eps; with `keep_sigma` the variance channels come from the conditional half (as
DiT's forward_with_cfg, which guides the first 3 of 4 eps channels for reproducibility; we guide all C), and
`model_time` maps the sampler's t to the model's timestep input (core.diffusion: t = s / T -> step s).

Conditions are dicts of keyword tensors for `model(x, t, **cond)`: {"y": (B,) labels} with null = num_classes
for the class-conditional SiT, {"context": (B, 77, D)} with null = the empty caption's embedding for text.

REG's class token rides in the sampler's state after the latents (eval.generate.JointTokenModel packs both into
one flat vector per sample): `tail` > 0 guides the last `tail` entries with their own scale `tail_scale`, where
the image is guided (REG's sampler: the token's guidance is on only inside the image's interval; a tail_scale of
0 takes the token's conditional velocity there, as REG's cls_cfg_scale 0).
"""
from typing import Callable, Mapping, Optional

import torch
from torch import nn


class GuidedVelocity:
    """velocity(x: (B, C, H, W), t: (B,)) -> (B, C, H, W) float64 from `model(x, t, **cond) -> out or (out, ...)`.

    cond / null_cond: tensors with batch B (a null tensor of batch 1 is broadcast); scale w; interval (low, high)
    in t. Outputs with more channels than x (learned sigma, 2C) are cut to the first C before guiding, unless
    keep_sigma: then (B, 2C) with the extra C channels of the conditional forward. model_time(t) -> the model's
    timestep input (default: t itself). `forwards` counts model calls and `rows` the samples pushed through them
    (for NFE/throughput checks); `on_call()`, if given, runs after every call (a progress bar). tail,
    tail_scale: the last `tail` entries of each (flat) sample are guided with tail_scale (0: conditional), see the
    module docstring.

    Called as velocity(x, t, guide_t=...) (takes_guide_t), the interval is tested at guide_t instead of t: Heun's
    corrector passes its step's start, so the whole step is guided or not, as the reference (eval.samplers).
    """

    takes_guide_t = True

    def __init__(self, model: nn.Module, cond: Mapping[str, torch.Tensor], null_cond: Mapping[str, torch.Tensor],
                 scale: float = 1.0, interval: tuple[float, float] = (0.0, 1.0),
                 model_time: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, keep_sigma: bool = False,
                 on_call: Optional[Callable[[], None]] = None, tail: int = 0, tail_scale: float = 1.0):
        if set(cond) != set(null_cond):
            raise ValueError(f"cond keys {sorted(cond)} and null-cond keys {sorted(null_cond)} differ")
        low, high = interval
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"guidance interval must satisfy 0 <= low <= high <= 1, got ({low}, {high})")
        if scale < 0 or tail_scale < 0:
            raise ValueError(f"guidance scales must be >= 0, got {scale} (image) and {tail_scale} (token)")
        if tail < 0 or (tail and keep_sigma):
            raise ValueError(f"tail must be >= 0 and cannot be combined with keep_sigma, got {tail}")
        self.tail, self.tail_scale = int(tail), float(tail_scale)
        self.model, self.scale, self.interval = model, float(scale), (float(low), float(high))
        self.cond = dict(cond)
        self.null = {k: _broadcast(k, null_cond[k], cond[k]) for k in cond}
        self.dtype = next(model.parameters()).dtype
        self.model_time, self.keep_sigma, self.on_call = model_time, keep_sigma, on_call
        self.forwards = self.rows = 0

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        t_in = self.model_time(t) if self.model_time is not None else t
        out = self.model(x.to(self.dtype), t_in.to(self.dtype), **cond)
        out = out[0] if isinstance(out, (tuple, list)) else out
        self.forwards += 1
        self.rows += x.shape[0]
        if self.on_call is not None:
            self.on_call()
        if self.keep_sigma:
            if out.shape[1] != 2 * x.shape[1]:
                raise ValueError(f"keep_sigma needs a learned-sigma model ({2 * x.shape[1]} output channels), "
                                 f"got {out.shape[1]}")
            return out.to(torch.float64)
        return out[:, : x.shape[1]].to(torch.float64)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, guide_t: Optional[torch.Tensor] = None) -> torch.Tensor:
        low, high = self.interval
        decide = t if guide_t is None else guide_t  # (B,) times whose interval test decides guidance
        inside = (decide >= low) & (decide <= high)
        if self.scale == 1.0 or not bool(inside.any()):  # nothing to guide: one conditional forward
            return self._forward(x, t, self.cond)
        both = {k: torch.cat([self.cond[k], self.null[k]]) for k in self.cond}
        v_cond, v_uncond = self._forward(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        c = x.shape[1]  # guide the prediction; learned-variance channels (keep_sigma) stay conditional
        guided = torch.cat([v_uncond[:, :c] + self.scale * (v_cond[:, :c] - v_uncond[:, :c]), v_cond[:, c:]], 1)
        if self.tail:  # the token after the latents: its own scale, or its conditional velocity at scale 0
            tail_w = self.tail_scale or 1.0
            tail = v_uncond[:, -self.tail:] + tail_w * (v_cond[:, -self.tail:] - v_uncond[:, -self.tail:])
            guided = torch.cat([guided[:, :-self.tail], tail], 1)
        return torch.where(inside.view(-1, *([1] * (x.dim() - 1))), guided, v_cond)


def _broadcast(key: str, null: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    if null.shape[1:] != cond.shape[1:]:
        raise ValueError(f"null condition {key!r} has shape {tuple(null.shape)}, cond {tuple(cond.shape)}")
    if null.shape[0] == cond.shape[0]:
        return null
    if null.shape[0] == 1:
        return null.expand_as(cond)
    raise ValueError(f"null condition {key!r} has batch {null.shape[0]}; expected 1 or {cond.shape[0]}")

