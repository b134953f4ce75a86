"""The causal VAE: shapes, causality, frame-count checks (the DiT: tests/test_dit.py)."""

import pytest
import torch

from vidiff.config import VAEConfig
from vidiff.models.vae import VideoVAE, latent_frames


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return VideoVAE(VAEConfig(latent_channels=4, base_channels=8)).eval()


@pytest.mark.parametrize("frames", [1, 5, 9, 13])
def test_vae_maps_1_plus_4k_frames_to_1_plus_k(vae, frames):
    video = torch.randn(1, 3, frames, 32, 48)
    latent = vae.encode(video)
    assert latent.shape == (1, 4, latent_frames(frames), 4, 6)
    assert vae.decode(latent).shape == video.shape


def test_vae_is_causal_in_time(vae):
    video = torch.randn(1, 3, 9, 16, 16)
    later = video.clone()
    later[:, :, 5:] += 1.0                                            # change frames 5..8 only
    a, b = vae.encode(video), vae.encode(later)
    torch.testing.assert_close(a[:, :, :2], b[:, :, :2])              # latents 0, 1 see frames 0..4
    assert not torch.allclose(a[:, :, 2], b[:, :, 2])


def test_vae_rejects_bad_frame_counts(vae):
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(torch.randn(1, 3, 8, 16, 16))
