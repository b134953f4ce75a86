"""Tensor parallelism for the DiT's layer names (Megatron-LM's split, Shoeybi et al. 2019).

In each attention the q, k, v projections are split by output (whole heads per rank: their rows are laid out
(heads, head_dim)) and `out` by input, so a rank computes its heads end to end and one all-reduce joins
them; the MLP splits fc1 by output and fc2 by input the same way. Everything else (adaLN, norms, embeddings,
the final layer) is replicated and gets the same gradient on every tensor-parallel rank, except the per-head
QK norms: each rank sees only its heads, so their gradients are summed over the tensor-parallel ranks.

Two users: the sharded layout hands `autotp_layer_specs()` to DeepSpeed AutoTP; the pipeline layout, which
AutoTP does not support, swaps in `ColumnParallelLinear` / `RowParallelLinear` with `split_block`.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# Module names (as in models/dit.py and models/attention.py) of the split projections and the head norms.
HEAD_NORMS = r".*\.(?:attn_s|attn_t|cross)\.(?:q_norm|k_norm)"
COLUMN = r".*\.(?:attn_s|attn_t|cross)\.(?:q|k|v)|.*\.mlp\.fc1"
ROW = r".*\.(?:attn_s|attn_t|cross)\.out|.*\.mlp\.fc2"


def autotp_layer_specs() -> list[dict]:
    """DeepSpeed AutoTP partition specs for the DiT's projections (AutoTP matches parameter names)."""
    return [{"patterns": [rf"(?:{COLUMN})\.weight$"], "partition_type": "column"},
            {"patterns": [rf"(?:{ROW})\.weight$"], "partition_type": "row"},
            {"patterns": [rf"{HEAD_NORMS}\.weight$"], "partition_type": "skip", "grad_allreduce": True}]


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; backward sums the input gradient over the tensor-parallel ranks (each rank's
    column-parallel slice contributes part of it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """Sum of the ranks' partial outputs forward; identity backward (every rank needs the whole gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _mark_split(*params: nn.Parameter) -> None:
    """DeepSpeed counts a parameter with model_parallel=True on every tensor-parallel rank in the gradient
    norm (each holds a different slice); the others (replicated) once."""
    for p in params:
        p.model_parallel = True
        p.tensor_model_parallel = True


class ColumnParallelLinear(nn.Module):
    """This rank's slice of a Linear's output features: (..., d_in) -> (..., d_out / size)."""

    def __init__(self, full: nn.Linear, group, rank: int, size: int):
        super().__init__()
        rows = full.out_features // size
        self.group = group
        self.weight = nn.Parameter(full.weight.detach()[rank * rows:(rank + 1) * rows].clone())
        self.bias = nn.Parameter(full.bias.detach()[rank * rows:(rank + 1) * rows].clone())
        _mark_split(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_CopyToTensorParallel.apply(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """This rank's slice of a Linear's input features; the partial products are summed over the ranks and the
    (replicated) bias added once: (..., d_in / size) -> (..., d_out)."""

    def __init__(self, full: nn.Linear, group, rank: int, size: int):
        super().__init__()
        cols = full.in_features // size
        self.group = group
        self.weight = nn.Parameter(full.weight.detach()[:, rank * cols:(rank + 1) * cols].clone())
        self.bias = nn.Parameter(full.bias.detach().clone())
        _mark_split(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReduceFromTensorParallel.apply(F.linear(x, self.weight), self.group) + self.bias


class HeadNorm(nn.Module):
    """The per-head RMSNorm of this rank's heads: the weight is replicated, its gradient summed over the
    tensor-parallel ranks (each contributes its heads' part)."""

    def __init__(self, norm: nn.RMSNorm, group):
        super().__init__()
        self.group, self.eps = group, norm.eps
        self.weight = nn.Parameter(norm.weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _CopyToTensorParallel.apply(self.weight, self.group)
        return F.rms_norm(x, self.weight.shape, weight, self.eps)


def split_dim(name: str) -> int | None:
    """0 for column-parallel weights and biases, 1 for row-parallel weights, None for replicated ones."""
    module, _, kind = name.rpartition(".")
    if re.fullmatch(COLUMN, "." + module):
        return 0
    if re.fullmatch(ROW, "." + module) and kind == "weight":
        return 1
    return None


def split_block(block: nn.Module, group, rank: int, size: int) -> nn.Module:
    """Swap a DiT block's projections for this rank's column/row-parallel slices (in place)."""
    for attention in (block.attn_s, block.attn_t, block.cross):
        for name in ("q", "k", "v"):
            setattr(attention, name, ColumnParallelLinear(getattr(attention, name), group, rank, size))
        attention.out = RowParallelLinear(attention.out, group, rank, size)
        attention.q_norm, attention.k_norm = HeadNorm(attention.q_norm, group), HeadNorm(attention.k_norm, group)
    block.mlp.fc1 = ColumnParallelLinear(block.mlp.fc1, group, rank, size)
    block.mlp.fc2 = RowParallelLinear(block.mlp.fc2, group, rank, size)
    return block
