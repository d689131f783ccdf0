"""Exponential moving average of the model weights, in float32, identical on every rank (also under ZeRO-3)."""
import contextlib

import torch
from torch import nn


def gathered(module: nn.Module):
    """Context in which every parameter of `module` is whole: a ZeRO-3 gather, else nothing."""
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed  # only ZeRO-3 parameters (they carry ds_id) need it; its import probes the accelerator

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class EMA:
    """shadow = decay * shadow + (1 - decay) * weights after every optimiser step (paper: decay 0.9999)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        with gathered(module):
            self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        with gathered(module):
            names = list(self.shadow)
            params = dict(module.named_parameters())
            current = [params[n].detach().float() for n in names]
            torch._foreach_lerp_([self.shadow[n] for n in names], current, 1.0 - self.decay)

    def state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Full model state dict with EMA weights (buffers such as pos_embed from `module`), float32, CPU."""
        with gathered(module):
            out = {n: t.detach().float().cpu().clone() for n, t in module.state_dict().items()}
        out.update({n: t.cpu().clone() for n, t in self.shadow.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.shadow if n not in state]
        if missing:
            raise KeyError(f"EMA checkpoint lacks parameter {missing[0]!r}")
        for n, t in self.shadow.items():
            if state[n].shape != t.shape:
                raise ValueError(f"EMA parameter {n!r}: checkpoint shape {tuple(state[n].shape)} != {tuple(t.shape)}")
            t.copy_(state[n])
