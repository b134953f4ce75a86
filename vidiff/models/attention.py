"""Attention for the spacetime DiT: one multi-head module used as spatial, temporal or cross attention.

Projection names (q, k, v, out) are what tensor parallelism matches: q/k/v split by columns, out by rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class Attention(nn.Module):
    """Multi-head attention with QK-norm (RMSNorm per head) over scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(context_dim or dim, dim)
        self.v = nn.Linear(context_dim or dim, dim)
        self.out = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D); context (B, L, Dc) for cross attention; mask (B, L) True where context is valid."""
        context = x if context is None else context
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        k = rearrange(self.k(context), "b l (h d) -> b h l d", h=self.heads)
        v = rearrange(self.v(context), "b l (h d) -> b h l d", h=self.heads)
        q, k = self.q_norm(q), self.k_norm(k)
        attn_mask = None if mask is None else mask[:, None, None, :]        # (B, 1, 1, L)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)   # (B, h, N, d)
        return self.out(rearrange(o, "b h n d -> b n (h d)"))


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) positions -> (N, dim) sin/cos features at geometric frequencies (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half, 1))
    angles = positions.float()[:, None] * freqs[None]                      # (N, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_3d(T: int, H: int, W: int, dim: int) -> torch.Tensor:
    """Fixed (T, H*W, dim) position features, dim split over (t, h, w); any size, no tables to resize."""
    d_h = d_w = 2 * (dim // 6)
    d_t = dim - d_h - d_w
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    feats = torch.cat([sincos_1d(t.flatten(), d_t), sincos_1d(h.flatten(), d_h), sincos_1d(w.flatten(), d_w)], 1)
    if feats.shape[1] < dim:                                               # odd d_t leaves one column
        feats = F.pad(feats, (0, dim - feats.shape[1]))
    return feats.reshape(T, H * W, dim)
