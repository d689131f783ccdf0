"""REPA and its family: the projectors, the target normalisation and the representation losses of a training step.

Each term below is written from its paper and checked against the definition in tests/test_variants.py; the
official repository and commit each was read against, and what we do differently, are in docs/VARIANTS.md.

- REPA (Yu et al., ICLR 2025): a 3-layer SiLU MLP projects the tokens of an early block; the loss is the negative
  cosine similarity with the frozen encoder's patch tokens of the clean image (`repa_loss`).
- iREPA (arXiv 2512.10794): a convolutional projector over the token grid (`ConvProjector`) and a spatial z-score
  of the target tokens (`spatial_zscore`).
- HASTE (arXiv 2505.16792): the student's attention logits of a few blocks distilled from the encoder's
  (`attention_distillation_loss`), and a step after which every term that uses the encoder stops.
- Dispersive loss (arXiv 2506.09027): an InfoNCE-style repulsion of the batch's block outputs (`dispersive_loss`),
  no encoder needed.
- REG (arXiv 2507.01467): the encoder's class token, noised with the latents, is a token of the model, which
  predicts its velocity too (the model and core.transport carry it; here its loss and REPA's target over it).

`RepresentationTerms` turns the config's repa, disp and reg sections into what a step asks of the model (`Taps`)
and of the encoders, and into the named losses it adds to the denoising loss.
"""
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

PROJECTORS = ("mlp", "conv")
TARGET_NORMS = ("none", "spatial_zscore")
LOSS_KINDS = ("cosine", "ntxent")


def build_projector(hidden_size: int, projector_dim: int, z_dim: int, kind: str = "mlp",
                    kernel_size: int = 3) -> nn.Module:
    """The REPA projector from hidden_size to the encoder's width z_dim; (B, N, hidden_size) -> (B, N, z_dim).

    kind="mlp": the paper's 3-layer MLP with SiLU (Sec. 3.3), hidden_size -> projector_dim -> projector_dim ->
      z_dim; its Sequential indices (0, 2, 4) match the reference implementation's `projectors.K.{0,2,4}` keys.
    kind="conv": iREPA's single Conv2d of `kernel_size` over the square token grid (projector_dim unused).
    """
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(hidden_size, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, z_dim),
        )
    if kind == "conv":
        return ConvProjector(hidden_size, z_dim, kernel_size)
    raise ValueError(f"REPA projector {kind!r} is not one of: {', '.join(PROJECTORS)}")


def projector_kwargs(repa_cfg) -> dict:
    """The model constructor arguments of the configured projector: none for REPA's MLP (the constructors'
    default, so the recorded arguments of runs from before the option are unchanged), else projector and
    projector_kernel."""
    if repa_cfg.projector == "mlp":
        return {}
    return {"projector": repa_cfg.projector, "projector_kernel": repa_cfg.projector_kernel}


class ConvProjector(nn.Module):
    """iREPA's projector: tokens (B, N, D) laid out row-major on their square grid, one Conv2d(D, z_dim, k,
    padding k // 2) keeping the grid, back to tokens (B, N, z_dim). No activation. The convolution keeps PyTorch's
    default initialisation, as iREPA's SiT (whose init only touches Linear layers)."""

    def __init__(self, hidden_size: int, z_dim: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"conv projector: kernel size must be odd and >= 1 (padding k // 2 keeps the grid), "
                             f"got {kernel_size}")
        self.conv = nn.Conv2d(hidden_size, z_dim, kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        side = math.isqrt(N)
        if side * side != N:
            raise ValueError(f"conv projector needs a square token grid, got {N} tokens")
        grid = x.reshape(B, side, side, D).permute(0, 3, 1, 2).contiguous()
        return self.conv(grid).permute(0, 2, 3, 1).reshape(B, N, -1)


def spatial_zscore(tokens: torch.Tensor, alpha: float, eps: float = 1e-6) -> torch.Tensor:
    """iREPA's spatial normalisation of target patch tokens (B, N, D): per sample and channel, over the N tokens,
    (x - alpha * mean) / (std + eps), std with Bessel's correction and eps added to it (not under the root)."""
    mean = tokens.mean(dim=1, keepdim=True)
    std = tokens.std(dim=1, keepdim=True)
    return (tokens - alpha * mean) / (std + eps)


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
            raise ValueError(f"REPA loss kind {kind!r} is not one of: {', '.join(LOSS_KINDS)}")
    return torch.stack(losses).mean()


def attention_distillation_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """HASTE's attention alignment: for each layer pair, the cross-entropy over keys between the teacher's attention
    distribution and the student's, H(softmax(teacher), softmax(student)), mean over samples, heads and queries,
    then averaged over the layer pairs. Temperature 1 on both.

    student[l]: (B, H_s, N, N) logits q k^T / sqrt(d) of a model block; its first H_t heads are used.
    teacher[l]: (B, H_t, N, N) logits of the paired encoder block, prefix tokens (CLS) already dropped.
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"attention distillation: {len(student)} model blocks but {len(teacher)} encoder blocks")
    losses = []
    for s, t in zip(student, teacher):
        heads = t.shape[1]
        if s.shape[0] != t.shape[0] or s.shape[1] < heads or s.shape[2:] != t.shape[2:]:
            raise ValueError(f"attention distillation: model logits {tuple(s.shape)} cannot be matched to encoder "
                             f"logits {tuple(t.shape)} (same batch and tokens, at least as many heads)")
        log_p_student = F.log_softmax(_at_least_fp32(s[:, :heads]), dim=-1)
        p_teacher = F.softmax(_at_least_fp32(t), dim=-1)
        losses.append(-(p_teacher * log_p_student).sum(dim=-1).mean())
    return torch.stack(losses).mean()


def dispersive_loss(hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """The dispersive loss (InfoNCE-L2 variant) of a batch of block outputs hidden: (B, ...), each flattened to a
    vector z_i of d values: log of the mean over all B x B pairs (i = j included, as the paper's JAX code) of
    exp(-||z_i - z_j||^2 / (d * temperature)). Lower is more dispersed; its minimum is -log B."""
    z = _at_least_fp32(hidden).flatten(1)
    d = z.shape[1]
    sq = F.pdist(z).pow(2) / d  # the B (B - 1) / 2 pairs i < j
    sq = torch.cat([sq, sq, sq.new_zeros(z.shape[0])])  # the full B x B matrix: both orders and the diagonal
    return torch.exp(-sq / temperature).mean().log()


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 if it is (bf16/fp16 activations are promoted for the softmax and distances)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass(frozen=True)
class Taps:
    """What a training forward returns besides the velocity and the projected tokens:
    `model(x, t, cond, taps=Taps(...)) -> (out, zs, {"hidden": (B, N, D) or None, "attn": [(B, heads, N, N)]})`.

    hidden_depth: the 1-indexed block whose output tokens are returned (dispersive loss); 0 = none.
    attn_blocks: 1-indexed blocks whose attention logits q k^T / sqrt(d) over the image tokens are returned (HASTE).
    attn_heads: how many heads of each (the first ones: the encoder's head count).
    """

    hidden_depth: int = 0
    attn_blocks: tuple = ()
    attn_heads: int = 0

    def __bool__(self) -> bool:
        return bool(self.hidden_depth or self.attn_blocks)


class BlockOutputs:
    """What a model's forward collects block by block besides the velocity: the projected tokens after block
    `repa_depth` and what `taps` asks for. `prefix` tokens (before the image tokens) are projected with them but
    left out of the tapped block output and attention maps.

        outputs = BlockOutputs(self.projectors, self.repa_depth, taps)
        for i, block in enumerate(self.blocks, 1):   # 1-indexed
            ... block(..., outputs.heads(i)) ...     # attention logits of that many heads (0: none)
            outputs.after(i, h, logits)
        return outputs.result(velocity)              # (velocity, zs), or (velocity, zs, tapped) with taps
    """

    def __init__(self, projectors: nn.ModuleList, repa_depth: int, taps: Optional[Taps], prefix: int = 0):
        self.projectors, self.repa_depth, self.taps, self.prefix = projectors, repa_depth, taps, prefix
        self.zs: list = []
        self.tapped: dict = {"hidden": None, "attn": []}

    def heads(self, block: int) -> int:
        return self.taps.attn_heads if self.taps is not None and block in self.taps.attn_blocks else 0

    def after(self, block: int, h: torch.Tensor, logits: Optional[torch.Tensor] = None) -> None:
        p = self.prefix
        if logits is not None:
            self.tapped["attn"].append(logits[:, :, p:, p:])
        if block == self.repa_depth:
            self.zs = [projector(h) for projector in self.projectors]
        if self.taps is not None and block == self.taps.hidden_depth:
            self.tapped["hidden"] = h[:, p:]

    def result(self, out: torch.Tensor) -> tuple:
        return (out, self.zs) if self.taps is None else (out, self.zs, self.tapped)


@dataclass
class EncoderTargets:
    """What the frozen encoders give one micro-batch: the patch tokens of each encoder (B, N, D_k); for HASTE,
    the first encoder's attention logits of its distilled blocks (B, heads, N, N), CLS dropped; for REG, the first
    encoder's class token (B, D_0)."""

    tokens: list
    attn: list
    cls: Optional[torch.Tensor] = None


class RepresentationTerms:
    """The representation terms of a run beside the denoising loss, from its config's `repa`, `disp` and `reg`
    sections.

    Per step it says what the model must return (`taps`), whether the encoders run (`uses_encoder`), which blocks'
    attention and whether the class token they return, and gives the named unweighted losses and their weighted sum
    (`losses`). `names` are the loss names it logs (`repa_loss` always, so every run's records have it).
    """

    def __init__(self, repa_cfg, disp_cfg, model_depth: int, reg_cfg=None):
        self.repa, self.disp, self.reg_cfg = repa_cfg, disp_cfg, reg_cfg
        self.align = repa_cfg.coeff > 0 and bool(repa_cfg.encoders)
        self.attn = self.align and repa_cfg.attn_coeff > 0
        self.disp_depth = (disp_cfg.depth or max(model_depth // 4, 1)) if disp_cfg.coeff > 0 else 0
        self.reg = self.align and reg_cfg is not None and reg_cfg.coeff > 0
        self.names = (("repa_loss",) + (("attn_loss",) if self.attn else ()) + (("disp_loss",) if self.disp_depth else ())
                      + (("cls_loss",) if self.reg else ()))

    def uses_encoder(self, step: int) -> bool:
        """Whether the encoders run at `step`: while aligning, and at every step of a REG run (its class token is
        an input of the model)."""
        return self.aligning(step) or self.reg

    def aligning(self, step: int) -> bool:
        """Whether the terms that use the encoder (REPA, attention distillation) are on at optimiser step `step`:
        from the start until repa.stop_step (0 = never stop)."""
        return self.align and (self.repa.stop_step <= 0 or step < self.repa.stop_step)

    @property
    def encoder_attn_blocks(self) -> tuple:
        """The 1-indexed encoder blocks whose attention logits the first encoder returns (empty: none)."""
        return tuple(self.repa.attn_encoder_blocks) if self.attn else ()

    def taps(self, step: int, attn_heads: int = 0) -> Optional[Taps]:
        """What the model must return at `step` besides (out, zs); None when nothing (the plain forward)."""
        attn = tuple(self.repa.attn_blocks) if self.attn and self.aligning(step) else ()
        taps = Taps(self.disp_depth, attn, attn_heads if attn else 0)
        return taps if taps else None

    def target_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """An encoder's patch tokens as REPA's target: iREPA's spatial z-score when repa.target_norm asks for it."""
        if self.repa.target_norm == "spatial_zscore":
            return spatial_zscore(tokens.float(), self.repa.target_norm_alpha)
        return tokens

    def losses(self, step: int, zs: Sequence[torch.Tensor], tapped: dict, targets: Optional[EncoderTargets],
               device: Optional[torch.device] = None) -> tuple[torch.Tensor, dict]:
        """(the weighted sum of the terms on at `step`, {name: unweighted 0-d loss} for every name in `names`;
        a term that is off is 0). `targets` is None when the encoders did not run (uses_encoder(step) is False).
        REG's REPA target is the class token followed by the patch tokens, as the model's token 0 is the class
        token; its "cls_loss" is the mean of the objective's per-sample token loss (tapped["cls_loss"])."""
        if device is None:
            device = next(t.device for t in (*zs, tapped.get("hidden"), torch.zeros(())) if t is not None)
        zero = torch.zeros((), device=device)
        values = {name: zero for name in self.names}
        total = zero
        if self.aligning(step):
            if targets is None:
                raise ValueError(f"step {step}: REPA is on but no encoder targets were given")
            tokens = [self.target_tokens(t) for t in targets.tokens]
            if self.reg:
                tokens[0] = torch.cat([targets.cls[:, None].to(tokens[0].dtype), tokens[0]], dim=1)
            values["repa_loss"] = repa_loss(zs, tokens, self.repa.loss, self.repa.ntxent_temperature)
            total = total + self.repa.coeff * values["repa_loss"]
            if self.attn:
                values["attn_loss"] = attention_distillation_loss(tapped["attn"], targets.attn)
                total = total + self.repa.attn_coeff * values["attn_loss"]
        elif self.align and zs:
            # REPA has stopped: its projectors stay in the graph with zero gradient, so every rank's DeepSpeed
            # engine reduces the same parameters whatever the step.
            total = total + 0.0 * sum(z.sum() for z in zs)
        if self.disp_depth:
            values["disp_loss"] = dispersive_loss(tapped["hidden"], self.disp.tau)
            total = total + self.disp.coeff * values["disp_loss"]
        if self.reg:
            values["cls_loss"] = tapped["cls_loss"].mean()
            total = total + self.reg_cfg.coeff * values["cls_loss"]
        return total, values
