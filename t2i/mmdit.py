"""MMDiT (Esser et al., SD3) with joint text-image attention and REPA projectors, and its size presets.

Each block has two streams, caption tokens and image tokens, each with its own adaLN modulation, QKV and MLP; their
queries, keys and values are concatenated into one attention over text + image tokens, so each stream sees the
other. The last block may keep only the text stream's pre-attention part (it feeds keys/values to the image stream
and its output is not used). The REPA paper's App. K trains this family on MS-COCO (hidden 768, depth 24).
"""
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from core.layers import (FinalLayer, Mlp, PatchEmbed, TimestepEmbedder, attention, attention_logits,
                         get_2d_sincos_pos_embed, modulate, unpatchify)
from core.repa import BlockOutputs, Taps, build_projector

MMDIT_PRESETS: dict[str, dict] = {
    "tiny": dict(depth=4, hidden_size=128, num_heads=4, patch_size=2),
    # App. K: the COCO 256 px model (hidden 768, depth 24); 24 heads of 32 as the official REPA MMDiT, which sets
    # num_heads = depth. Same parameters and FLOPs as 12 x 64, but another attention.
    "base": dict(depth=24, hidden_size=768, num_heads=24, patch_size=2),
    "large": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2),  # for 512 px (64x64 latents)
}


class Stream(nn.Module):
    """One stream's half of a joint block: adaLN modulation, QKV (+ optional QK RMSNorm), output projection, MLP.

    pre_only: only the pre-attention part (norm, modulation shift/scale, QKV), for the text stream of the last block.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool):
        super().__init__()
        self.num_heads, self.head_dim, self.pre_only = num_heads, hidden_size // num_heads, pre_only
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (2 if pre_only else 6) * hidden_size))
        if not pre_only:
            self.proj = nn.Linear(hidden_size, hidden_size)
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def qkv_heads(self, x: torch.Tensor, c: torch.Tensor):
        """x: (B, N, D) -> q, k, v each (B, heads, N, head_dim), and the modulation chunks for `finish`."""
        mods = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=1)
        B, N, D = x.shape
        qkv = self.qkv(modulate(self.norm1(x), mods[0], mods[1]))
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v, mods

    def finish(self, x: torch.Tensor, attn: torch.Tensor, mods) -> torch.Tensor:
        """Residual updates from this stream's attention output attn: (B, N, D)."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa.unsqueeze(1) * self.proj(attn)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """x: (B, N, D) image tokens, ctx: (B, L, D) text tokens, c: (B, D) -> (x, ctx or None after a pre-only text),
    and with logit_heads > 0 also the image stream's image-to-image attention logits (B, logit_heads, N, N) (the
    student maps of HASTE's MMDiT: the text keys are left out)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, last: bool):
        super().__init__()
        self.context_block = Stream(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=last)
        self.x_block = Stream(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=False)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, c: torch.Tensor, logit_heads: int = 0):
        qc, kc, vc, mods_c = self.context_block.qkv_heads(ctx, c)
        qx, kx, vx, mods_x = self.x_block.qkv_heads(x, c)
        L = ctx.shape[1]
        out = attention(torch.cat([qc, qx], 2), torch.cat([kc, kx], 2), torch.cat([vc, vx], 2))
        out = out.transpose(1, 2).flatten(2)  # (B, L + N, D)
        x_out = self.x_block.finish(x, out[:, L:], mods_x)
        ctx = None if self.context_block.pre_only else self.context_block.finish(ctx, out[:, :L], mods_c)
        return (x_out, ctx, attention_logits(qx, kx, logit_heads)) if logit_heads else (x_out, ctx)


class MMDiT(nn.Module):
    """Text-conditional latent transformer with REPA projectors on the image tokens of block `repa_depth`.

    forward(x: (B, in_channels, input_size, input_size) latents, t: (B,) float time (t = 1 noise), context:
    (B, L, text_dim) caption token embeddings, the empty caption's for the null condition) -> (velocity (B,
    in_channels, H, W), zs: one (B, N, encoder_dims[k]) per encoder, N = (input_size / patch_size)**2); with `taps`
    (core.repa.Taps) (velocity, zs, tapped), the tapped hidden states and attention maps of the image tokens.
    pooled_text: also add an MLP of the mean caption token to the timestep embedding (SD3 adds a pooled vector).
    projector, projector_kernel: REPA's MLP or iREPA's conv over the image token grid (core.repa.build_projector).
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 768,
                 depth: int = 24, num_heads: int = 12, mlp_ratio: float = 4.0, text_dim: int = 768,
                 repa_depth: int = 8, encoder_dims: Sequence[int] = (768,), projector_dim: int = 2048,
                 qk_norm: bool = False, pooled_text: bool = False, pre_only_last: bool = True,
                 grad_checkpointing: bool = False, projector: str = "mlp", projector_kernel: int = 3):
        super().__init__()
        if hidden_size % num_heads or input_size % patch_size:
            raise ValueError(f"MMDiT: hidden_size {hidden_size} must divide by num_heads {num_heads} and input_size "
                             f"{input_size} by patch_size {patch_size}")
        if encoder_dims and not 1 <= repa_depth <= depth:
            raise ValueError(f"MMDiT: repa_depth {repa_depth} must be within the {depth} blocks (1-indexed)")
        self.input_size, self.patch_size, self.in_channels, self.text_dim = input_size, patch_size, in_channels, text_dim
        self.out_channels, self.repa_depth, self.grad_checkpointing = in_channels, repa_depth, grad_checkpointing
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.context_embedder = nn.Linear(text_dim, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.pooled_embedder = (nn.Sequential(nn.Linear(text_dim, hidden_size), nn.SiLU(),
                                              nn.Linear(hidden_size, hidden_size)) if pooled_text else None)
        self.register_buffer("pos_embed", get_2d_sincos_pos_embed(hidden_size, input_size // patch_size)[None])
        self.blocks = nn.ModuleList(
            JointBlock(hidden_size, num_heads, mlp_ratio, qk_norm, last=pre_only_last and i == depth - 1)
            for i in range(depth))
        self.projectors = nn.ModuleList(build_projector(hidden_size, projector_dim, d, projector, projector_kernel)
                                        for d in encoder_dims)
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """As SiT/DiT: xavier Linear layers, N(0, 0.02) timestep MLP, zero adaLN (identity blocks), zero output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            for stream in (block.context_block, block.x_block):
                nn.init.zeros_(stream.adaLN_modulation[-1].weight)
                nn.init.zeros_(stream.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)

    def _check(self, x: torch.Tensor, context: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(f"MMDiT expects latents (B, {self.in_channels}, {self.input_size}, {self.input_size}), "
                             f"got {tuple(x.shape)}")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != self.text_dim:
            raise ValueError(f"MMDiT expects context (B={x.shape[0]}, L, {self.text_dim}), got {tuple(context.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, taps: Optional[Taps] = None):
        self._check(x, context)
        dtype = self.x_embedder.proj.weight.dtype  # DeepSpeed's native bf16 casts weights, not inputs
        h = self.x_embedder(x.to(dtype))
        h = h + self.pos_embed.to(h.dtype)
        ctx = self.context_embedder(context.to(dtype))
        c = self.t_embedder(t)
        if self.pooled_embedder is not None:
            c = c + self.pooled_embedder(context.to(dtype).mean(dim=1))
        outputs = BlockOutputs(self.projectors, self.repa_depth, taps)
        for i, block in enumerate(self.blocks, 1):
            heads = outputs.heads(i)
            if self.grad_checkpointing and torch.is_grad_enabled():
                outs = checkpoint(block, h, ctx, c, heads, use_reentrant=False)
            else:
                outs = block(h, ctx, c, heads)
            h, ctx = outs[0], outs[1]
            outputs.after(i, h, outs[2] if heads else None)
        return outputs.result(unpatchify(self.final_layer(h, c), self.patch_size, self.out_channels))


def build_mmdit(kwargs: dict, **extra) -> MMDiT:
    """MMDiT from full keyword arguments (as recorded in checkpoints)."""
    kwargs = {**kwargs, **extra}
    kwargs["encoder_dims"] = tuple(kwargs.get("encoder_dims", ()))
    return MMDiT(**kwargs)
