"""The EDM core against exact answers: preconditioning, loss weight, schedule, and samplers on a Gaussian mixture."""

import math

import pytest
import torch
from torch import nn

from gmm import toy_mixture
from vidiff.diffusion.edm import Precond, edm_loss, loss_weight, sample_noise, sample_sigma
from vidiff.diffusion.samplers import guided, karras_sigmas, sample_euler, sample_heun


class Recorder(nn.Module):
    """A raw net that returns a constant and records what it was given."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x_in, c_noise):
        self.x_in, self.c_noise = x_in, c_noise
        return torch.full_like(x_in, self.value)


def test_preconditioning_matches_table_1():
    sd, sigma = 0.5, torch.tensor([0.1, 2.0, 40.0])
    net = Recorder(value=3.0)
    x = torch.ones(3, 2)
    D = Precond(net, sd)(x, sigma)
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
    c_in = 1 / (sigma**2 + sd**2).sqrt()
    torch.testing.assert_close(D, (c_skip + 3.0 * c_out)[:, None].expand(3, 2))
    torch.testing.assert_close(net.x_in, c_in[:, None].expand(3, 2))
    torch.testing.assert_close(net.c_noise, sigma.log() / 4)


def test_loss_weight_and_training_sigmas():
    sigma = torch.tensor([0.5])
    assert loss_weight(sigma, 0.5).item() == pytest.approx((0.25 + 0.25) / 0.0625)
    ln_sigma = sample_sigma(200_000, -1.2, 1.2, torch.Generator().manual_seed(0)).log()
    assert ln_sigma.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert ln_sigma.std().item() == pytest.approx(1.2, abs=0.01)


def test_weighted_loss_of_the_exact_denoiser_is_one():
    """For data N(0, sigma_data^2), lambda(sigma) times the posterior variance is exactly 1 at every sigma."""
    sd = 0.5
    x0 = torch.randn(4096, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sd

    def exact(x, sigma):
        return x * (sd**2 / (sd**2 + sigma.double()[:, None] ** 2))

    sigma, noise = sample_noise(x0, list(range(len(x0))), -1.2, 1.2)
    loss = edm_loss(exact, x0, sigma, noise, sd)
    assert loss.shape == (len(x0),) and loss.mean().item() == pytest.approx(1.0, abs=0.05)


def test_noise_draws_follow_the_sample_not_the_batch():
    x0 = torch.zeros(6, 3)
    sigma, noise = sample_noise(x0, [10, 11, 12, 13, 14, 15], -1.2, 1.2)
    half_sigma, half_noise = sample_noise(x0[3:], [13, 14, 15], -1.2, 1.2)      # another rank's micro-batch
    torch.testing.assert_close(sigma[3:], half_sigma)
    torch.testing.assert_close(noise[3:], half_noise)
    assert len(set(sigma.tolist())) == 6


def test_karras_schedule():
    sigmas = karras_sigmas(18, 0.002, 80.0, rho=7.0)
    assert len(sigmas) == 19 and sigmas[-1] == 0
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[-2].item() == pytest.approx(0.002)
    assert bool((sigmas[:-1].diff() < 0).all())
    i, n = 5, 18
    expected = (80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert sigmas[i].item() == pytest.approx(expected)


def _noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 80.0


def test_heun_18_steps_reproduces_the_mixture():
    """Heun, 18 steps = 35 evaluations, from 40k noise draws. Tolerances: component weights within 0.015
    (sampling noise is ~0.003), means within 0.1 (component stds 0.2-0.5), variances within 15%."""
    gmm = toy_mixture()
    calls = []

    def counted(x, sigma):
        calls.append(1)
        return gmm.denoise(x, sigma)

    x = sample_heun(counted, _noise(40_000, 0), karras_sigmas(18, 0.002, 80.0))
    assert len(calls) == 35
    err = gmm.stats_error(x)
    assert err["weight"] < 0.015 and err["mean"] < 0.1 and err["var_rel"] < 0.15, err


def test_heun_beats_euler_at_equal_evaluations():
    """Distance to the exact ODE solution (Heun with 512 steps): Heun 18 steps vs Euler 35 steps."""
    gmm = toy_mixture()
    x_T = _noise(4000, 1)
    reference = sample_heun(gmm.denoise, x_T, karras_sigmas(512, 0.002, 80.0))
    heun = sample_heun(gmm.denoise, x_T, karras_sigmas(18, 0.002, 80.0))
    euler = sample_euler(gmm.denoise, x_T, karras_sigmas(35, 0.002, 80.0))
    err_heun = (heun - reference).norm(dim=1).mean().item()
    err_euler = (euler - reference).norm(dim=1).mean().item()
    assert err_heun < 0.7 * err_euler, (err_heun, err_euler)


def test_stochastic_heun_still_reproduces_the_mixture():
    gmm = toy_mixture()
    x = sample_heun(gmm.denoise, _noise(20_000, 2), karras_sigmas(32, 0.002, 80.0),
                    generator=torch.Generator().manual_seed(3), S_churn=10.0, S_tmin=0.05, S_tmax=50.0)
    err = gmm.stats_error(x)
    assert err["weight"] < 0.02 and err["mean"] < 0.1 and err["var_rel"] < 0.2, err


def test_guidance_one_is_the_conditional_denoiser_and_larger_guidance_sharpens():
    gmm = toy_mixture()
    n = 4000
    cond = {"label": torch.nn.functional.one_hot(torch.full((n,), 1), 3).double()}
    uncond = {"label": torch.zeros(n, 3, dtype=torch.float64)}         # no label: the whole mixture
    sigmas = karras_sigmas(18, 0.002, 80.0)
    x_T = _noise(n, 4)
    conditional = sample_heun(gmm.denoise, x_T, sigmas, **cond)
    w1 = sample_heun(guided(gmm.denoise, cond, uncond, 1.0), x_T, sigmas)
    torch.testing.assert_close(w1, conditional)
    assert (gmm.assign(w1) == 1).float().mean() > 0.99
    w4 = sample_heun(guided(gmm.denoise, cond, uncond, 4.0), x_T, sigmas)
    assert (gmm.assign(w4) == 1).float().mean() > 0.99
    # Guidance pushes away from the unconditional mixture: samples land farther from its mean.
    global_mean = (gmm.weights[:, None] * gmm.means).sum(0)
    assert (w4 - global_mean).norm(dim=1).mean() > (w1 - global_mean).norm(dim=1).mean()
    assert math.isfinite(w4.abs().max().item())
