"""Sequence parallelism over a clip's latent frames (parallel.sequence = P ranks per sequence group).

Every rank of a group reads the same batch (parallel/layout.py) and holds T'/P of its latent frames from the
patch embedding to the final layer; the output is gathered so that every rank computes the same loss. Spatial
attention (within a frame), cross attention, the MLP and adaLN (per sample) need no communication.

- dsp (Dynamic Sequence Parallelism, Zhao et al. 2024): around temporal attention the split switches from frames
  to positions, (B, T'/P, N, D) -> (B, T', N/P, D), with one all-to-all, and back after it with another: per
  block 2 x (activation / P) bytes per rank each way.
- ulysses (Jacobs et al. 2023, DeepSpeed's DistributedAttention): around every attention whose sequence crosses
  frames (temporal; spatial too with full attention) q, k and v go from sequence-split to head-split and the output
  back: 4 all-to-alls of activation / P per such attention.

Gradients: each rank's parameter gradients come from its own tokens; summed over the group they are the whole
clip's. DeepSpeed averages over its data-parallel group, which spans data x sequence ranks (the ZeRO partition
group), so the trainer multiplies the loss by P (train/trainer.py) instead of building ZeRO groups of its own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vidiff.models.sequence import Core, Whole
from vidiff.parallel.layout import Layout


def _all_to_all(chunks: torch.Tensor, group) -> torch.Tensor:
    """(P, ...) -> (P, ...): chunk j goes to rank j of the group; slot j of the result came from rank j."""
    chunks = chunks.contiguous()                  # before empty_like, which would keep a permuted layout
    out = torch.empty_like(chunks)
    dist.all_to_all_single(out, chunks, group=group)
    return out


def frames_to_positions(x: torch.Tensor, group, P: int) -> torch.Tensor:
    """(B, T/P, N, D) -> (B, T, N/P, D): this rank's frames of every position -> every frame of its positions."""
    B, t, N, D = x.shape
    chunks = x.reshape(B, t, P, N // P, D).permute(2, 0, 1, 3, 4)         # (P, B, T/P, N/P, D) by position chunk
    return _all_to_all(chunks, group).permute(1, 0, 2, 3, 4).reshape(B, P * t, N // P, D)


def positions_to_frames(x: torch.Tensor, group, P: int) -> torch.Tensor:
    """(B, T, N/P, D) -> (B, T/P, N, D): the inverse of frames_to_positions."""
    B, T, n, D = x.shape
    chunks = x.reshape(B, P, T // P, n, D).permute(1, 0, 2, 3, 4)         # (P, B, T/P, N/P, D) by frame chunk
    return _all_to_all(chunks, group).permute(1, 2, 0, 3, 4).reshape(B, T // P, P * n, D)


class _Switch(torch.autograd.Function):
    """frames_to_positions (to_positions=True) or its inverse, whose backward is the other."""

    @staticmethod
    def forward(ctx, x, group, P: int, to_positions: bool):
        ctx.group, ctx.P, ctx.to_positions = group, P, to_positions
        return (frames_to_positions if to_positions else positions_to_frames)(x, group, P)

    @staticmethod
    def backward(ctx, grad):
        back = positions_to_frames if ctx.to_positions else frames_to_positions
        return back(grad.contiguous(), ctx.group, ctx.P), None, None, None


class _GatherFrames(torch.autograd.Function):
    """All-gather a clip's frames (dim 1) over the group. Backward keeps this rank's slice of the gradient: every
    rank computes the same loss from the gathered clip, so each already holds the whole gradient."""

    @staticmethod
    def forward(ctx, x, group, P: int, rank: int):
        ctx.rank, ctx.t = rank, x.shape[1]
        x = x.contiguous()                            # before empty_like, which would keep another layout
        parts = [torch.empty_like(x) for _ in range(P)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, ctx.rank * ctx.t:(ctx.rank + 1) * ctx.t], None, None, None


class FrameSplit(Whole):
    """This rank's T'/P latent frames; dsp switches to positions around temporal attention, ulysses exchanges
    heads for the whole sequence inside each attention that crosses frames."""

    def __init__(self, group, size: int, rank: int, mode: str):
        self.group, self.size, self.rank = group, size, rank
        self.switches = mode == "dsp"

    def _share(self, n: int) -> slice:
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def frames(self, T: int) -> slice:
        return self._share(T)

    def temporal_grid(self, T: int, N: int) -> tuple[slice, slice]:
        return (slice(0, T), self._share(N)) if self.switches else (self._share(T), slice(0, N))

    def to_positions(self, x: torch.Tensor) -> torch.Tensor:
        return _Switch.apply(x, self.group, self.size, True) if self.switches else x

    def to_frames(self, x: torch.Tensor) -> torch.Tensor:
        return _Switch.apply(x, self.group, self.size, False) if self.switches else x

    def gather_frames(self, x: torch.Tensor) -> torch.Tensor:
        return _GatherFrames.apply(x, self.group, self.size, self.rank)

    def exchange(self, core: Core, crosses_frames: bool) -> Core:
        if self.switches or not crosses_frames:
            return core
        from deepspeed.sequence.layer import DistributedAttention

        def local(q, k, v, attn_mask=None):          # DeepSpeed's layout (B, S, h, d) -> SDPA's (B, h, S, d)
            return core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask).transpose(1, 2)

        # scatter heads (dim 2), gather the sequence (dim 1): (B, S/P, h, d) -> (B, S, h/P, d) and back
        attention = DistributedAttention(local, self.group, scatter_idx=2, gather_idx=1)

        def ulysses(q, k, v, attn_mask=None):
            if attn_mask is not None:
                raise ValueError("ulysses exchanges self-attention only, which has no mask")
            return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0).transpose(1, 2)
        return ulysses


def sequence_split(layout: Layout, rank: int, mode: str) -> Whole:
    """This rank's split (every rank must call: it creates every group's process group, in the same order)."""
    if layout.sequence == 1:
        return Whole()
    mine = None
    for ranks in layout.sequence_groups():
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return FrameSplit(mine, layout.sequence, layout.coordinates(rank).sequence, mode)
