"""How the DiT's tokens lie over the ranks of a sequence group: what the model calls, and Whole, one rank holding
every token (the default). parallel/sequence.py splits them (parallel.sequence > 1): each rank holds an equal
share of the latent frames, so spatial attention, cross attention and the MLP stay local.

The model sees x (B, T', N, D) as this rank's frames; `frames` and `temporal_grid` say which true (t, n)
coordinates its RoPE rotations take; `to_positions` / `to_frames` switch the split around temporal attention
(dsp); `exchange` wraps the attention core of every self-attention that crosses frames (ulysses).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# The attention core: q, k, v (B, h, S, d) and an optional mask -> (B, h, S, d).
Core = Callable[..., torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class Whole:
    """Every token on this rank: the identity of each operation."""

    size = 1
    switches = False               # dsp: the block switches to positions around temporal attention

    def frames(self, T: int) -> slice:
        """This rank's latent frames of T."""
        return slice(0, T)

    def temporal_grid(self, T: int, N: int) -> tuple[slice, slice]:
        """The (frames, positions) temporal attention runs over on this rank."""
        return slice(0, T), slice(0, N)

    def to_positions(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T'/P, N, D) -> (B, T', N/P, D)."""
        return x

    def to_frames(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T', N/P, D) -> (B, T'/P, N, D)."""
        return x

    def gather_frames(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T'/P, ...) -> (B, T', ...): every rank ends with the whole clip."""
        return x

    def exchange(self, core: Core, crosses_frames: bool) -> Core:
        """The attention core of a self-attention (crosses_frames: its sequences span frames)."""
        return core


WHOLE = Whole()
