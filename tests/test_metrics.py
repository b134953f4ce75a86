"""PSNR and SSIM against values known in closed form."""

import math

import pytest
import torch

from vidiff.eval.metrics import psnr, ssim


def test_psnr_of_a_known_error():
    x = torch.zeros(1, 3, 2, 8, 8)
    y = x + 0.2                                     # error 0.1 on the [0, 1] scale: 20 dB
    assert psnr(y, x).item() == pytest.approx(20.0, abs=1e-4)


def test_ssim_is_one_for_identical_and_falls_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 3, 32, 32, generator=g) * 2 - 1
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    small = ssim(x + 0.05 * torch.randn(x.shape, generator=g), x).item()
    large = ssim(x + 0.5 * torch.randn(x.shape, generator=g), x).item()
    assert 1.0 > small > large > 0.0


def test_ssim_of_a_constant_offset_follows_the_luminance_term():
    x = torch.full((1, 1, 1, 16, 16), -0.5)        # 0.25 on [0, 1]
    y = torch.full((1, 1, 1, 16, 16), 0.0)         # 0.5
    c1 = 0.01**2
    expected = (2 * 0.25 * 0.5 + c1) / (0.25**2 + 0.5**2 + c1)      # contrast/structure terms are 1
    assert ssim(y, x).item() == pytest.approx(expected, rel=1e-4)
    assert not math.isnan(ssim(y, x).item())
