"""The causal VAE and the spacetime DiT: shapes, causality, identity at initialization."""

import pytest
import torch

from vidiff.config import DiTConfig, VAEConfig
from vidiff.diffusion.edm import Precond
from vidiff.models.dit import DiT
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


def _dit(**kw):
    torch.manual_seed(0)
    return DiT(DiTConfig(hidden_size=32, depth=2, num_heads=4, **kw), in_channels=4, text_dim=12)


def _text(b=2, L=5):
    mask = torch.ones(b, L, dtype=torch.bool)
    mask[:, 3:] = False
    return torch.randn(b, L, 12), mask


@pytest.mark.parametrize("shape, patch", [((3, 8, 8), (1, 2, 2)), ((1, 4, 6), (1, 2, 2)), ((4, 4, 4), (2, 1, 1))])
def test_dit_output_shape(shape, patch):
    net = _dit(patch_size=patch)
    x = torch.randn(2, 4, *shape)
    assert net(x, torch.zeros(2), *_text()).shape == x.shape


def test_dit_blocks_are_identity_at_init_and_denoiser_is_c_skip_x():
    net = _dit()
    x = torch.randn(2, 4, 3, 8, 8)
    h = torch.randn(2, 3, 16, 32)
    c = torch.randn(2, 32)
    text = net.text_proj(_text()[0])
    for block in net.blocks:
        torch.testing.assert_close(block(h, c, text, _text()[1]), h)
    sigma = torch.tensor([0.3, 5.0])
    D = Precond(net, 0.5)(x, sigma, text=_text()[0], text_mask=_text()[1])
    c_skip = 0.25 / (sigma**2 + 0.25)
    torch.testing.assert_close(D, c_skip.reshape(2, 1, 1, 1, 1) * x)


def test_every_dit_parameter_is_trained():
    """After one backward every parameter has a gradient (none is left out of the graph); the zero-initialized
    gates open from the output inwards, so after three steps every gradient is non-zero."""
    net = _dit()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x, text = torch.randn(2, 4, 3, 8, 8), _text()
    for step in range(3):
        optimizer.zero_grad()
        (net(x, torch.zeros(2), *text) - x).pow(2).mean().backward()
        if step == 0:
            assert not [n for n, p in net.named_parameters() if p.grad is None]
        optimizer.step()
    assert not [n for n, p in net.named_parameters() if p.grad.abs().sum() == 0]
