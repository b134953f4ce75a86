"""Random, open weights for property tests: a freshly built VAE or DiT starts with zero residual branches
(the VAE's convolutional residual, adaLN-Zero gates, zero output layers), which makes chunking, causality,
tiling and layout parity trivially true. Tests of those properties randomize every parameter first."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random and non-zero: matrices and kernels ~ N(0, 1 / fan_in) (activations keep their
    scale), vectors (biases, norm weights) ~ N(0, 0.1^2), or N(1, 0.1^2) for norm weights."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() > 1:
            p.copy_(torch.randn(p.shape, generator=generator) * p[0].numel() ** -0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1 + (1.0 if "norm" in name else 0.0))
    return module
