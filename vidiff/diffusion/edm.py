"""EDM training recipe: Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models".

The raw network F never sees noise-level scalings; `Precond` wraps it (Table 1, "Ours" column):
    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

# A denoiser D(x, sigma, **cond) -> estimate of the clean x, sigma of shape (B,).
Denoiser = Callable[..., torch.Tensor]


def _bcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def scalings(sigma: torch.Tensor, x: torch.Tensor, sigma_data: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """c_skip, c_out, c_in (broadcast to x) and c_noise (B,) of Table 1 for noise levels sigma (B,)."""
    sigma = sigma.to(torch.float32).reshape(-1)                           # (B,)
    s, sd = _bcast(sigma, x), sigma_data
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / (s**2 + sd**2).sqrt()
    c_in = 1 / (sd**2 + s**2).sqrt()
    return c_skip, c_out, c_in, sigma.log() / 4


class Precond(nn.Module):
    """Wraps a raw net F(x_in, c_noise, **cond) into the EDM denoiser D(x, sigma, **cond)."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = scalings(sigma, x, self.sigma_data)
        F_x = self.net(c_in * x, c_noise, **cond)
        return c_skip * x + c_out * F_x.to(x.dtype)


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 (Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_sigma(n: int, P_mean: float, P_std: float, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Training noise levels: ln(sigma) ~ N(P_mean, P_std^2) (Table 1)."""
    return (P_mean + P_std * torch.randn(n, generator=generator, device=device)).exp()


def sample_noise(x0: torch.Tensor, seeds: list[int], P_mean: float, P_std: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Training noise level sigma (B,) and noise n like x0, each sample drawn from its own seed: a sample gets
    the same draw however the batch is split over ranks and micro-batches."""
    sigmas, noises = [], []
    for seed, x in zip(seeds, x0):
        generator = torch.Generator().manual_seed(seed)
        sigmas.append(sample_sigma(1, P_mean, P_std, generator))
        noises.append(torch.randn(x.shape, generator=generator))
    return torch.cat(sigmas).to(x0.device), torch.stack(noises).to(x0.device, x0.dtype)


def noised(x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return x0 + _bcast(sigma, x0) * noise


def weighted_error(D_x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) || D_x - x0 ||^2 per sample, averaged over its elements (Eq. 2, 8): (B,). The trainer
    averages over the usable samples of the global batch."""
    per_sample = (D_x - x0).pow(2).flatten(1).mean(1)                                 # (B,)
    return loss_weight(sigma, sigma_data) * per_sample


def edm_loss(denoise: Denoiser, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, sigma_data: float,
             **cond: Any) -> torch.Tensor:
    """lambda(sigma) || D(x0 + sigma n; sigma) - x0 ||^2 per sample (B,), for given draws (sample_noise); its mean
    over samples estimates E_sigma,n of Eq. 2."""
    return weighted_error(denoise(noised(x0, sigma, noise), sigma, **cond), x0, sigma, sigma_data)
