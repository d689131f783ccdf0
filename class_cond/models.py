"""SiT (and DiT: same backbone) with REPA projectors, and its size presets.

Parameter names and init follow SiT/DiT `models.py` and the REPA release, so their checkpoints load unchanged.
"""
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from core.layers import (
    Attention,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    block_mlp,
    block_norm,
    get_2d_sincos_pos_embed,
    modulate,
    rope_2d_tables,
    unpatchify,
)
from core.repa import BlockOutputs, Taps, build_projector


class SiTBlock(nn.Module):
    """adaLN-Zero transformer block. x: (B, N, hidden), c: (B, hidden) conditioning -> (B, N, hidden)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 norm: str = "layernorm", mlp: str = "gelu"):
        super().__init__()
        self.norm1 = block_norm(norm, hidden_size)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm, norm=norm)
        self.norm2 = block_norm(norm, hidden_size)
        self.mlp = block_mlp(mlp, hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, logit_heads: int = 0,
                rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        """-> x, or with logit_heads > 0 (x, the attention logits (B, logit_heads, N, N) of the first heads).
        rope: the 2-D rotary tables of the token grid, or None."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        attn = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), logit_heads, rope)
        attn, logits = attn if logit_heads else (attn, None)
        x = x + gate_msa.unsqueeze(1) * attn
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return (x, logits) if logit_heads else x


class SiT(nn.Module):
    """Class-conditional latent transformer with REPA projectors on block `repa_depth` (1-indexed).

    forward(x: (B, in_channels, input_size, input_size) latents, t: (B,) float time, y: (B,) long labels, label
    `num_classes` = null) -> (out: (B, out_channels, input_size, input_size), zs: one (B, N, encoder_dims[k]) per
    encoder, N = (input_size / patch_size)**2). out_channels doubles with learn_sigma (DiT's variance head).
    With `taps` (core.repa.Taps: what a REPA-family loss needs) it returns (out, zs, tapped) instead.
    projector: "mlp" (REPA's) or "conv" (iREPA's, kernel projector_kernel); see core.repa.build_projector.

    reg_dim > 0 makes it REG's model (Wu et al., arXiv 2507.01467): forward(x, t, y, cls=...) also takes a noised
    encoder class token cls (B, reg_dim), embedded (Linear, then an affine LayerNorm) as token 0 with an all-zero
    position row, and always returns (out, zs, extras) with extras["cls"] (B, reg_dim) the token's velocity
    (a zero-initialised head on the final layer). zs then cover token 0 as well: (B, 1 + N, encoder_dims[k]).
    Its parameter names (cls_projectors2, wg_norm, final_layer.linear_cls) are REG's, so its checkpoints load.

    LightningDiT's architecture switches (Yao et al., arXiv 2501.01423; hustvl/LightningDiT models/lightningdit.py),
    each independent, parameter names as there: norm="rmsnorm" (RMSNorm with a learnt scale for the blocks' and
    the final layer's norms, and for q/k with qk_norm), mlp="swiglu" (its SwiGLU, w12/w3), rope=True (EVA-02's
    2-D rotary embedding of q and k, after their norm, besides the fixed sin-cos position embedding).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        repa_depth: int = 8,
        encoder_dims: Sequence[int] = (768,),
        projector_dim: int = 2048,
        qk_norm: bool = False,
        grad_checkpointing: bool = False,
        projector: str = "mlp",
        projector_kernel: int = 3,
        reg_dim: int = 0,
        norm: str = "layernorm",
        mlp: str = "gelu",
        rope: bool = False,
    ):
        super().__init__()
        _check_config(input_size, patch_size, hidden_size, depth, num_heads, repa_depth, encoder_dims)
        if rope and reg_dim:
            raise ValueError("SiT: rope=True places tokens on the grid, and REG's class token has no place there")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.repa_depth, self.reg_dim = repa_depth, reg_dim
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        pos = get_2d_sincos_pos_embed(hidden_size, input_size // patch_size).unsqueeze(0)
        if reg_dim:  # REG: the class token's position row is all zeros
            pos = torch.cat([pos.new_zeros(1, 1, hidden_size), pos], dim=1)
        # Persistent so "pos_embed" is in the state dict like the reference (a frozen Parameter there).
        self.register_buffer("pos_embed", pos, persistent=True)
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, norm, mlp)
                                    for _ in range(depth))
        self.rope = rope
        if rope:  # not persistent: rebuilt from the recorded arguments, so state dicts stay LightningDiT's
            cos, sin = rope_2d_tables(hidden_size // num_heads, input_size // patch_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.projectors = nn.ModuleList(build_projector(hidden_size, projector_dim, d, projector, projector_kernel)
                                        for d in encoder_dims)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, token_dim=reg_dim, norm=norm)
        if reg_dim:
            self.cls_projectors2 = nn.Linear(reg_dim, hidden_size)
            self.wg_norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """SiT/DiT init: xavier Linear layers (projectors too, as REPA), N(0, 0.02) embeddings, adaLN-Zero."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over flattened patches
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for mod in [*self.blocks, self.final_layer]:
            nn.init.zeros_(mod.adaLN_modulation[-1].weight)
            nn.init.zeros_(mod.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.reg_dim:  # REG: the token's head starts at zero; its embedding is a xavier Linear like the rest
            nn.init.zeros_(self.final_layer.linear_cls.weight)
            nn.init.zeros_(self.final_layer.linear_cls.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"SiT expects latents of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")

    def _block(self, block: SiTBlock, x: torch.Tensor, c: torch.Tensor, logit_heads: int = 0):
        rope = (self.rope_cos, self.rope_sin) if self.rope else None
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, c, logit_heads, rope, use_reentrant=False)
        return block(x, c, logit_heads, rope)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, taps: Optional[Taps] = None,
                cls: Optional[torch.Tensor] = None):
        """See the class docstring for shapes."""
        self._check_input(x)
        dtype = self.x_embedder.proj.weight.dtype  # a bf16 model (DeepSpeed native bf16) takes fp32 latents
        h = self.x_embedder(x.to(dtype))
        if self.reg_dim:
            if cls is None or cls.shape != (x.shape[0], self.reg_dim):
                raise ValueError(f"this REG model takes the noised class token cls of shape ({x.shape[0]}, "
                                 f"{self.reg_dim}), got {None if cls is None else tuple(cls.shape)}")
            h = torch.cat([self.wg_norm(self.cls_projectors2(cls.to(dtype)))[:, None], h], dim=1)
        elif cls is not None:
            raise ValueError("cls is the class token of a REG model (reg_dim > 0); this model has none")
        h = h + self.pos_embed.to(h.dtype)  # the fixed buffer stays fp32 when ZeRO-3 casts the weights
        c = self.t_embedder(t) + self.y_embedder(y)
        outputs = BlockOutputs(self.projectors, self.repa_depth, taps, prefix=1 if self.reg_dim else 0)
        for i, block in enumerate(self.blocks, 1):
            heads = outputs.heads(i)
            h, logits = self._block(block, h, c, heads) if heads else (self._block(block, h, c), None)
            outputs.after(i, h, logits)
        if not self.reg_dim:
            return outputs.result(unpatchify(self.final_layer(h, c), self.patch_size, self.out_channels))
        out, v_cls = self.final_layer.with_token(h, c)
        out, zs, *tapped = outputs.result(unpatchify(out, self.patch_size, self.out_channels))
        return out, zs, {**(tapped[0] if tapped else {"hidden": None, "attn": []}), "cls": v_cls}


def _check_config(
    input_size: int,
    patch_size: int,
    hidden_size: int,
    depth: int,
    num_heads: int,
    repa_depth: int,
    encoder_dims: Sequence[int],
) -> None:
    """Raise ValueError naming the offending SiT arguments."""
    if input_size % patch_size:
        raise ValueError(f"SiT: input_size {input_size} is not divisible by patch_size {patch_size}")
    if hidden_size % num_heads:
        raise ValueError(f"SiT: hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if encoder_dims and not 1 <= repa_depth <= depth:
        raise ValueError(f"SiT: repa_depth {repa_depth} must be in [1, depth={depth}] (1-indexed block)")


_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}

# Architecture only; input size, classes and REPA settings come from the run config.
SIT_PRESETS: dict[str, dict] = {
    # /1: on an f16 VAE (VA-VAE, REPA-E's E2E-VAE) SiT-XL/1 has the tokens SiT-XL/2 has on the f8 SD-VAE
    **{f"{size}/{p}": {**arch, "patch_size": p} for size, arch in _SIZES.items() for p in (1, 2, 4, 8)},
    "tiny": dict(depth=4, hidden_size=128, num_heads=4, patch_size=2),  # CPU tests and debug runs
    "tiny/1": dict(depth=4, hidden_size=128, num_heads=4, patch_size=1),
}


def build_sit(kwargs: dict, **extra) -> SiT:
    """SiT from the full keyword arguments recorded in a checkpoint (`model.kwargs` of state.json)."""
    kwargs = {**kwargs, **extra}
    kwargs["encoder_dims"] = tuple(kwargs.get("encoder_dims", ()))
    return SiT(**kwargs)


def build_model(preset: str, **overrides) -> SiT:
    """SiT from a preset name in SIT_PRESETS ("XL/2", "tiny", ...); overrides are SiT keyword arguments."""
    if preset not in SIT_PRESETS:
        raise ValueError(f"unknown SiT preset {preset!r}; valid presets: {', '.join(SIT_PRESETS)}")
    return SiT(**{**SIT_PRESETS[preset], **overrides})
