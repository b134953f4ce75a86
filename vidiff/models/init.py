"""Parameter initialization that gives the same values whatever dtype or device a parameter is created in.

DeepSpeed's zero.Init (the sharded layout under ZeRO-3) creates parameters directly in the run's precision, and
an in-place `nn.init.uniform_` on a bf16 tensor draws other numbers than on an fp32 one from the same seed
(measured: 10-26% relative difference for most DiT weights), so a bf16 sharded run started from other weights
than the same run in any other layout. Here every draw is made in fp32 on the CPU and copied (rounded) into the
parameter: the consumption of the generator and the values are those of a plain fp32 build.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def uniform_(tensor: torch.Tensor, bound: float) -> torch.Tensor:
    """tensor <- U(-bound, bound), drawn in fp32 on the CPU from the global generator."""
    return tensor.copy_((torch.rand(tensor.shape, dtype=torch.float32) * 2 - 1) * bound)


def xavier_uniform_(weight: torch.Tensor) -> torch.Tensor:
    """Glorot & Bengio 2010: U(+-sqrt(6 / (fan_in + fan_out))) for a (fan_out, fan_in) matrix."""
    fan_out, fan_in = weight.shape
    return uniform_(weight, (6.0 / (fan_in + fan_out)) ** 0.5)


class Conv3d(nn.Conv3d):
    """nn.Conv3d with PyTorch's default initialization (weight and bias U(+-1 / sqrt(fan_in))), drawn by
    `uniform_` so that a zero.Init build in bf16 starts from the weights of a plain build."""

    def reset_parameters(self) -> None:
        bound = self.weight[0].numel() ** -0.5                              # fan_in = c_in x kernel volume
        uniform_(self.weight, bound)
        if self.bias is not None:
            uniform_(self.bias, bound)
