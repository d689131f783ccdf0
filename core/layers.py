"""Transformer building blocks shared by the SiT/DiT backbone and the MMDiT.

Module and parameter names follow timm and facebookresearch/DiT so that reference checkpoints load unchanged.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation. x: (B, N, D) tokens; shift, scale: (B, D). Returns (B, N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """DiT's sinusoidal embedding of scalar times. t: (B,) float. Returns (B, dim) float32, [cos | sin] halves."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Time t (B,) -> (B, hidden_size): sinusoidal features, then a 2-layer MLP. t is used as given (SiT: [0, 1])."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # The features are float32; cast so a bf16/fp16 model gets its own dtype.
        t_freq = timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype)
        return self.mlp(t_freq)


class LabelEmbedder(nn.Module):
    """Class label y (B,) long -> (B, hidden_size). Label `num_classes` is the null class used for CFG.

    No label dropout here: the training task replaces labels by the null class with its own RNG.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if y.device.type == "cpu":  # on a GPU this check would stall every step; the task checks host labels instead
            check_labels(y, self.num_classes)
        return self.embedding_table(y)


def check_labels(y: torch.Tensor, num_classes: int) -> None:
    """ValueError naming the labels of `y` outside [0, num_classes] (label `num_classes` is the null class).
    Reads the values: call it on host tensors, before they go to the device."""
    bad = (y < 0) | (y > num_classes)
    if bad.any():
        raise ValueError(
            f"class labels {y[bad].unique().tolist()} out of range [0, {num_classes}] "
            f"({num_classes} classes, label {num_classes} is the null class)"
        )


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention via SDPA. q: (B, heads, Nq, head_dim); k, v: (B, heads, Nk, head_dim) -> like q."""
    return F.scaled_dot_product_attention(q, k, v)


def attention_logits(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """The pre-softmax attention logits (q / sqrt(head_dim)) k^T of the first `heads` heads (HASTE's student
    maps, the scale applied to q first as there). q, k: (B, H, N, head_dim) -> (B, heads, N, N)."""
    q, k = q[:, :heads], k[:, :heads]
    return (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)


class RMSNorm(nn.Module):
    """RMSNorm with a learnt scale (`weight`, ones at init), as LightningDiT's models/rmsnorm.py: normalised in
    float32, cast back to the input's dtype, then scaled. x: (..., dim) -> like x."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


NORMS = ("layernorm", "rmsnorm")


def block_norm(kind: str, dim: int) -> nn.Module:
    """A transformer block's pre-norm: DiT's LayerNorm without affine parameters, or LightningDiT's RMSNorm."""
    if kind not in NORMS:
        raise ValueError(f"norm {kind!r} is not one of {', '.join(NORMS)}")
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6) if kind == "layernorm" else RMSNorm(dim)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """EVA-02's rotation of interleaved pairs: (x_2i, x_2i+1) -> (-x_2i+1, x_2i)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rope_2d_tables(head_dim: int, grid: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (grid**2, head_dim) of the 2-D rotary embedding LightningDiT takes from EVA-02
    (VisionRotaryEmbeddingFast with dim = head_dim / 2): head_dim / 4 frequencies 1 / theta^(2k / (head_dim / 2)),
    each on an interleaved pair; the first half of head_dim rotates by the token's row, the second by its column
    (row-major tokens, integer positions computed as there: arange(grid) / grid * grid)."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
    dim = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    pos = torch.arange(grid) / grid * grid
    per_axis = torch.einsum("i,f->if", pos, freqs).repeat_interleave(2, dim=-1)  # (grid, dim), pairs interleaved
    rows = per_axis[:, None, :].expand(grid, grid, dim)
    cols = per_axis[None, :, :].expand(grid, grid, dim)
    angles = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x: (B, heads, N, head_dim) rotated by the tables (N, head_dim) of rope_2d_tables."""
    cos, sin = rope
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Multi-head self-attention, timm parameter names (qkv, q_norm, k_norm, proj). x: (B, N, dim) -> (B, N, dim).
    qk_norm: a norm of each head's queries and keys (timm's affine LayerNorm, or RMSNorm with norm="rmsnorm", as
    LightningDiT); forward's `rope`: 2-D rotary tables (rope_2d_tables) applied to them after it."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 norm: str = "layernorm"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        make = (lambda: nn.LayerNorm(self.head_dim)) if norm == "layernorm" else (lambda: RMSNorm(self.head_dim))
        self.q_norm = make() if qk_norm else nn.Identity()
        self.k_norm = make() if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, logit_heads: int = 0, rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        """-> the output, or with logit_heads > 0 (output, the attention logits of the first logit_heads heads)."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # in float32 tables, then the dtype SDPA would cast to anyway
            q, k = apply_rope(q, rope).to(v.dtype), apply_rope(k, rope).to(v.dtype)
        out = self.proj(attention(q, k, v).transpose(1, 2).reshape(B, N, D))
        return (out, attention_logits(q, k, logit_heads)) if logit_heads else out


class Mlp(nn.Module):
    """Two-layer MLP with tanh-GELU, timm key names (fc1, fc2). x: (..., in_features) -> (..., in_features)."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """LightningDiT's SwiGLU MLP (models/swiglu_ffn.py): one fused input Linear `w12` split into the SiLU half and
    the gate, then `w3`; hidden width int(2/3 * hidden_features), so its cost is the GELU MLP's.
    x: (..., in_features) -> (..., in_features)."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        hidden = int(2 / 3 * hidden_features)
        self.w12 = nn.Linear(in_features, 2 * hidden)
        self.w3 = nn.Linear(hidden, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


MLPS = ("gelu", "swiglu")


def block_mlp(kind: str, dim: int, hidden: int) -> nn.Module:
    """A transformer block's MLP: DiT's tanh-GELU Mlp, or LightningDiT's SwiGLU."""
    if kind not in MLPS:
        raise ValueError(f"mlp {kind!r} is not one of {', '.join(MLPS)}")
    return Mlp(dim, hidden) if kind == "gelu" else SwiGLU(dim, hidden)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens. x: (B, C, H, W) -> (B, (H/p)*(W/p), embed_dim), row-major as timm."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def _sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos: (M,) float64 -> (M, embed_dim) as [sin | cos] halves (MAE)."""
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2))
    out = pos[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding of MAE/DiT. Returns (grid_size**2, embed_dim) float32, row-major tokens.

    Computed in float64 like DiT's numpy version; as there, the first half encodes the column (w) coordinate and
    the second half the row (h) coordinate (numpy meshgrid's 'xy' order).
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    idx = torch.arange(grid_size * grid_size)
    col, row = (idx % grid_size).double(), (idx // grid_size).double()
    return torch.cat([_sincos_1d(embed_dim // 2, col), _sincos_1d(embed_dim // 2, row)], dim=1).float()


class FinalLayer(nn.Module):
    """adaLN-modulated norm + linear head. x: (B, N, hidden), c: (B, hidden) -> (B, N, patch_size**2 * out_channels).

    token_dim > 0 adds REG's head for a leading class token (`linear_cls`, REG's name): `with_token` maps the
    first token to (B, token_dim) and the others through `linear`.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, token_dim: int = 0,
                 norm: str = "layernorm"):
        super().__init__()
        self.norm_final = block_norm(norm, hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        if token_dim:
            self.linear_cls = nn.Linear(hidden_size, token_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def _modulated(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return modulate(self.norm_final(x), shift, scale)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.linear(self._modulated(x, c))

    def with_token(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 1 + N, hidden) -> ((B, N, patch_size**2 * out_channels), (B, token_dim) of token 0)."""
        x = self._modulated(x, c)
        return self.linear(x[:, 1:]), self.linear_cls(x[:, 0])


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of DiT's patchify. x: (B, N, p*p*C) with N = h*w square, row-major -> (B, C, h*p, w*p)."""
    B, N, _ = x.shape
    h = math.isqrt(N)
    if h * h != N:
        raise ValueError(f"unpatchify expects a square token grid, got {N} tokens")
    p = patch_size
    x = x.reshape(B, h, h, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, h * p, h * p)
