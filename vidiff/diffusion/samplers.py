"""Samplers for the probability-flow ODE of EDM (Karras et al. 2022): schedule, Euler, Heun (Algorithm 2), CFG.

Every sampler shares one signature: sampler(denoise, x, sigmas, generator=None, callback=None) -> x_0,
where x starts as noise already scaled by sigmas[0] and sigmas ends with 0.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from vidiff.diffusion.edm import Denoiser

Callback = Callable[[int, torch.Tensor, float], None]   # (step index, x, sigma)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then 0."""
    if n < 1:
        raise ValueError(f"need at least 1 step, got {n}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])          # (n + 1,)


def _denoise(denoise: Denoiser, x: torch.Tensor, sigma: float, **cond: Any) -> torch.Tensor:
    return denoise(x, torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float32), **cond)


@torch.no_grad()
def sample_euler(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator | None = None,
                 callback: Callback | None = None, **cond: Any) -> torch.Tensor:
    """First-order Euler steps along dx/dsigma = (x - D(x; sigma)) / sigma; N evaluations for N steps."""
    for i in range(len(sigmas) - 1):
        t_cur, t_next = float(sigmas[i]), float(sigmas[i + 1])
        d_cur = (x - _denoise(denoise, x, t_cur, **cond)) / t_cur
        x = x + (t_next - t_cur) * d_cur
        if callback is not None:
            callback(i, x, t_next)
    return x


@torch.no_grad()
def sample_heun(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator | None = None,
                callback: Callback | None = None, S_churn: float = 0.0, S_tmin: float = 0.0,
                S_tmax: float = float("inf"), S_noise: float = 1.0, **cond: Any) -> torch.Tensor:
    """EDM Algorithm 2: Heun's 2nd-order method with optional stochastic churn; 2N - 1 evaluations."""
    n = len(sigmas) - 1
    for i in range(n):
        t_cur, t_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_tmin <= t_cur <= S_tmax else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            # Drawn on the generator's device (the CPU by default) and moved: the same churn on any device.
            eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device) * S_noise
            x = x + math.sqrt(t_hat**2 - t_cur**2) * eps
        d_cur = (x - _denoise(denoise, x, t_hat, **cond)) / t_hat
        x_next = x + (t_next - t_hat) * d_cur
        if t_next > 0:                                            # 2nd-order correction
            d_prime = (x_next - _denoise(denoise, x_next, t_next, **cond)) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
        if callback is not None:
            callback(i, x, t_next)
    return x


def guided(denoise: Denoiser, cond: dict[str, Any], uncond: dict[str, Any], guidance: float) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022): D_uncond + w (D_cond - D_uncond); w = 1 is conditional.

    Conditional and unconditional inputs go through the network as one batch.
    """
    def guided_denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if guidance == 1.0:
            return denoise(x, sigma, **cond)
        both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
        D_cond, D_uncond = denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        return D_uncond + guidance * (D_cond - D_uncond)
    return guided_denoise
