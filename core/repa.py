"""REPA: the projector on an early block's hidden states and the alignment loss against encoder patch features."""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def build_projector(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """3-layer MLP with SiLU (paper Sec. 3.3): hidden_size -> projector_dim -> projector_dim -> z_dim.

    The Sequential indices (0, 2, 4) match the reference implementation's `projectors.K.{0,2,4}` keys.
    """
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


def repa_loss(
    projected: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    kind: str = "cosine",
    temperature: float = 0.1,
) -> torch.Tensor:
    """Alignment loss between projected model tokens and frozen encoder tokens, averaged over encoders.

    projected[k], targets[k]: (B, N, D_k) for encoder k (same N: one model token per encoder patch).
    kind="cosine": negative cosine similarity per token, mean over tokens and samples (paper eq. 8). Returns a
      scalar in [-1, 1]; -1 is perfect alignment.
    kind="ntxent": per sample, each projected token must pick its own target token among the sample's N target
      tokens (InfoNCE with `temperature`), the contrastive ablation of the paper's Table 2.
    """
    if len(projected) != len(targets):
        raise ValueError(f"REPA: {len(projected)} projector outputs but {len(targets)} encoder targets")
    if not projected:
        raise ValueError("REPA: no encoder targets given")
    losses = []
    for k, (z, z_tilde) in enumerate(zip(projected, targets)):
        if z.shape != z_tilde.shape:
            raise ValueError(
                f"REPA encoder {k}: projected tokens {tuple(z.shape)} do not match encoder tokens "
                f"{tuple(z_tilde.shape)}; the model's token count (latent_size/patch_size)^2 must equal the "
                f"encoder's patch count"
            )
        z = F.normalize(z.float(), dim=-1)
        z_tilde = F.normalize(z_tilde.float(), dim=-1)
        if kind == "cosine":
            losses.append(-(z * z_tilde).sum(dim=-1).mean())
        elif kind == "ntxent":
            logits = torch.einsum("bnd,bmd->bnm", z, z_tilde) / temperature
            labels = torch.arange(z.shape[1], device=z.device).expand(z.shape[0], -1)
            losses.append(F.cross_entropy(logits.flatten(0, 1), labels.flatten()))
        else:
            raise ValueError(f"REPA loss kind {kind!r} is not one of: cosine, ntxent")
    return torch.stack(losses).mean()
