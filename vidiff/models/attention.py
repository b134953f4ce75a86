"""Attention for the spacetime DiT: one multi-head module used as spatial, temporal, full or cross attention,
and the 3D rotary position embedding (RoPE, Su et al. 2021) that all self-attention shares.

Projection names (q, k, v, out) are what tensor parallelism matches: q/k/v split by columns, out by rows.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from vidiff.models.init import xavier_uniform_
from vidiff.models.sequence import Core, sdpa

# Rotations by angle as (cos, sin) pairs, real (..., N, head_dim / 2, 2), broadcastable over (B, heads, N, d/2, 2):
# real rather than complex so that torch.compile generates code for them (it has none for complex operators).
Rope = torch.Tensor


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary dimensions given to (t, h, w): about 1/4 to time and 3/8 to each spatial axis, all even
    (64 -> 16, 24, 24; 72 -> 20, 26, 26)."""
    if head_dim % 2:
        raise ValueError(f"3D RoPE needs an even head dimension, got {head_dim}")
    d_hw = 2 * (head_dim * 3 // 16)
    return head_dim - 2 * d_hw, d_hw, d_hw


def rope_angles(positions: torch.Tensor, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """(N,) integer positions -> (N, dim / 2) angles position * theta^(-2i/dim)."""
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return (positions.double()[:, None] * freqs[None]).float()


def rope_3d(T: int, H: int, W: int, head_dim: int, device: torch.device | None = None) -> Rope:
    """Rotations (cos, sin) of every (t, h, w) token of a T x H x W grid, (T, H * W, head_dim / 2, 2):
    computed per call for any grid, so new frame counts and resolutions need no new tables."""
    d_t, d_h, d_w = rope_axes(head_dim)
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    angles = torch.cat([rope_angles(t.flatten(), d_t), rope_angles(h.flatten(), d_h),
                        rope_angles(w.flatten(), d_w)], dim=1).reshape(T, H * W, head_dim // 2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).to(device)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1) of x (B, heads, N, d), read as complex numbers x0 + i x1, by rope
    (.., N, d/2, 2): the complex product (x0 + i x1)(cos + i sin) in real arithmetic."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)                  # each (B, heads, N, d/2)
    cos, sin = rope.unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear that initializes itself when built: xavier weights and zero bias, or all zeros with zero=True.
    nn.Linear's constructor calls reset_parameters, so the layer is complete before DeepSpeed's zero.Init
    (which shards every module as its constructor returns) takes it, and the draws (made in fp32, see
    models/init.py) match a plain build in any precision."""

    def __init__(self, d_in: int, d_out: int, zero: bool = False):
        self.zero = zero                    # read by reset_parameters, which nn.Linear's constructor calls
        super().__init__(d_in, d_out)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)
        if self.zero:
            nn.init.zeros_(self.weight)
        else:
            xavier_uniform_(self.weight)


class Attention(nn.Module):
    """Multi-head attention with QK-norm (RMSNorm per head) over scaled_dot_product_attention. Heads are
    counted from the projections' width (h = width / head_dim), so a tensor-parallel split of q/k/v by
    whole heads runs unchanged with its share of the heads. zero_out: the output projection starts at zero."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, zero_out: bool = False):
        super().__init__()
        self.head_dim = dim // heads
        self.q = Linear(dim, dim)
        self.k = Linear(context_dim or dim, dim)
        self.v = Linear(context_dim or dim, dim)
        self.out = Linear(dim, dim, zero=zero_out)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.core: Core = sdpa                  # sequence parallelism (ulysses) wraps it: models/sequence.py

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                rope: Rope | None = None) -> torch.Tensor:
        """x (B, N, D); context (B, L, Dc) for cross attention; mask (B, L) True where context is valid;
        rope: rotations of x's token positions for self-attention, (B or 1, 1, N, d/2, 2)."""
        context = x if context is None else context
        q = rearrange(self.q(x), "b n (h d) -> b h n d", d=self.head_dim)
        k = rearrange(self.k(context), "b l (h d) -> b h l d", d=self.head_dim)
        v = rearrange(self.v(context), "b l (h d) -> b h l d", d=self.head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        attn_mask = None if mask is None else mask[:, None, None, :]        # (B, 1, 1, L)
        o = self.core(q, k, v, attn_mask)                                  # (B, h, N, d)
        return self.out(rearrange(o, "b h n d -> b n (h d)"))
