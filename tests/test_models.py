"""The causal VAE: shapes, causality (on random open weights, with a non-causal negative control), frame-count
checks (the DiT: tests/test_dit.py)."""

import pytest
import torch

from vae_variants import forward_non_causal, open_vae
from vidiff.models.vae import CausalConv3d, latent_frames


@pytest.fixture(scope="module")
def vae():
    return open_vae()


@pytest.mark.parametrize("frames", [1, 5, 9, 13])
def test_vae_maps_1_plus_4k_frames_to_1_plus_k(vae, frames):
    video = torch.randn(1, 3, frames, 32, 48)
    latent = vae.encode(video)
    assert latent.shape == (1, 8, latent_frames(frames), 4, 6)
    assert vae.decode(latent).shape == video.shape


def _future_leak(vae) -> tuple[float, float, float]:
    """Change frames 5..8 of a 9-frame clip: (change of latents 0-1, which see frames 0..4 only; change of
    latent 2; change of decoded frames 0..4 when latent 2 changes)."""
    video = torch.randn(1, 3, 9, 16, 16, generator=torch.Generator().manual_seed(0))
    later = video.clone()
    later[:, :, 5:] += torch.randn(later[:, :, 5:].shape, generator=torch.Generator().manual_seed(1))
    a, b = vae.encode(video), vae.encode(later)
    changed = a.clone()
    changed[:, :, 2] += 1.0
    decoded, decoded_changed = vae.decode(a), vae.decode(changed)
    return ((a[:, :, :2] - b[:, :, :2]).abs().max().item(), (a[:, :, 2] - b[:, :, 2]).abs().max().item(),
            (decoded[:, :, :5] - decoded_changed[:, :, :5]).abs().max().item())


def test_vae_is_causal_in_time(vae):
    past, present, decoded_past = _future_leak(vae)
    assert past <= 1e-6 and decoded_past <= 1e-6                       # exact up to kernel rounding
    assert present > 1e-2


def test_non_causal_padding_fails_the_causality_check(vae, monkeypatch):
    """Negative control: padding time on both sides lets latents 0-1 and decoded frames 0..4 see the future."""
    monkeypatch.setattr(CausalConv3d, "forward", forward_non_causal)
    past, _, decoded_past = _future_leak(vae)
    assert past > 1e-2 and decoded_past > 1e-2


def test_vae_rejects_bad_frame_counts(vae):
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(torch.randn(1, 3, 8, 16, 16))
