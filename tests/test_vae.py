"""The causal VAE's Encoder interface, on random open weights (a fresh VAE's residual is zero, which would make
chunking and tiling trivially exact): chunked == whole, memory flat in clip length, tiles ~ whole frames. Each
property has a negative control: the same check on a deliberately broken VAE (no frame cache, no tile
blending) must fail."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from datasets import write_mixed
from vae_variants import forward_without_cache, open_vae, tiled_without_blending
from vidiff.config import load_config
from vidiff.data.pipeline import ShardLoader, to_model_input
from vidiff.models import vae as vae_module
from vidiff.models.vae import CausalConv3d, VideoVAE, block_pca, chunk_bounds, pca_reconstruction, to_blocks
from vidiff.train.objectives import VAEObjective


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (-10 * torch.log10(((a - b) / 2).pow(2).mean())).item()


def test_chunk_bounds():
    assert chunk_bounds(1, 8) == [(0, 1)]
    assert chunk_bounds(33, 8) == [(0, 9), (9, 17), (17, 25), (25, 33)]
    assert chunk_bounds(21, 8) == [(0, 9), (9, 17), (17, 21)]


# Measured on these open weights: chunked and whole differ by at most 2e-6 (fp32 summation order); without the
# frame cache by about 1 (every chunk restarts the causal padding).
CHUNK_TOLERANCE = 1e-5


def _chunked_vs_whole(frames: int, chunk: int) -> tuple[float, float]:
    """Largest |chunked - whole| of encode (posterior mean) and decode, with more than one chunk each way."""
    vae = open_vae(chunk_frames=chunk)
    assert len(chunk_bounds(frames, chunk)) > 1 and len(chunk_bounds(1 + (frames - 1) // 4, chunk // 4)) > 1
    video = torch.rand(2, 3, frames, 32, 32, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        whole_latent = vae.moments(video)[0]
        whole_video = vae.decoder(whole_latent)
    chunked_latent = vae.encode(video)                          # shift 0, scale 1: the raw posterior mean
    assert chunked_latent.shape == whole_latent.shape == (2, 8, 1 + (frames - 1) // 4, 4, 4)
    return ((chunked_latent - whole_latent).abs().max().item(),
            (vae.decode(whole_latent) - whole_video).abs().max().item())


@pytest.mark.parametrize("frames, chunk", [(9, 4), (21, 8), (33, 8)])
def test_chunked_encode_and_decode_equal_whole(frames, chunk):
    encode_error, decode_error = _chunked_vs_whole(frames, chunk)
    assert encode_error <= CHUNK_TOLERANCE and decode_error <= CHUNK_TOLERANCE, (encode_error, decode_error)


def test_chunking_without_the_frame_cache_fails_the_check(monkeypatch):
    """Negative control: chunks that each pad with their own first frame instead of the previous chunk's."""
    monkeypatch.setattr(CausalConv3d, "forward", forward_without_cache)
    encode_error, decode_error = _chunked_vs_whole(21, 8)
    assert encode_error > 100 * CHUNK_TOLERANCE and decode_error > 100 * CHUNK_TOLERANCE


def test_an_image_is_a_one_frame_video():
    vae = open_vae()
    image = torch.rand(3, 3, 1, 40, 24) * 2 - 1
    latent = vae.encode(image)
    assert latent.shape == (3, 8, 1, 5, 3)
    assert vae.decode(latent).shape == image.shape


# Measured on these open weights at 160x224, 128-pixel tiles, 64 of overlap: 41.4-41.7 dB tiled vs untiled over
# three clips; pasting tiles without blending: 16.2-16.5 dB; averaging them uniformly: 19.9 dB.
TILED_MIN_PSNR_DB = 39.0


def _tiled_vs_untiled_psnr() -> float:
    video = torch.rand(1, 3, 5, 160, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    whole, tiles = open_vae(), open_vae(tile_size=128, tile_overlap=64)
    reference = whole.decode(whole.encode(video))
    tiled = tiles.decode(tiles.encode(video))
    assert tiled.shape == reference.shape
    return _psnr(tiled, reference)


def test_tiled_reconstruction_matches_untiled():
    assert _tiled_vs_untiled_psnr() >= TILED_MIN_PSNR_DB


def test_tiles_without_blending_fail_the_check(monkeypatch):
    """Negative control: each tile pasted over its neighbours, its context-starved border included."""
    monkeypatch.setattr(vae_module, "tiled", tiled_without_blending)
    assert _tiled_vs_untiled_psnr() < TILED_MIN_PSNR_DB - 10


_PEAK_RSS = """
import sys, torch
from vidiff.config import VAEConfig
from vidiff.device import resident_kib
from vidiff.models.vae import VideoVAE
frames, chunk = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
vae = VideoVAE(VAEConfig(latent_channels=8, base_channels=32, chunk_frames=chunk)).eval()
vae.encode(torch.zeros(1, 3, frames, 256, 256))
print(resident_kib()["VmHWM"])
"""


def _peak_rss_kib(frames: int, chunk: int) -> int:
    """Peak RSS of encoding a clip, from the child's own VmHWM: getrusage's ru_maxrss keeps the forking parent's
    peak across exec (a pytest process grown past 1.2 GB made all three figures equal). glibc's malloc raises its
    mmap threshold as large blocks are freed and then keeps freed chunk tensors in its heap, so without a fixed
    threshold peak RSS also counts memory the process holds for reuse, and grows with the number of chunks
    (measured: 1.2-1.4x for 4x the chunks, 1.07x with it)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(frames), str(chunk)], capture_output=True,
                         text=True, check=True, cwd=REPO, timeout=300, env=env)
    return int(out.stdout.split()[-1])


def test_memory_stays_flat_as_the_clip_grows():
    short, long = _peak_rss_kib(17, 8), _peak_rss_kib(65, 8)
    whole = _peak_rss_kib(65, 64)                               # one chunk: what chunking saves
    assert long <= 1.3 * short, json.dumps({"17 frames": short, "65 frames": long})
    assert whole > 1.3 * short, "the clip is too small for this test to tell chunked from whole"


def test_a_pca_initialized_vae_starts_as_the_best_linear_code(tmp_path):
    shards = write_mixed(tmp_path / "s", n_image=0)
    run = tmp_path / "run"
    cfg = load_config(REPO / "configs/vae/demo.yaml", [f"data.shards={shards}", "data.buckets=[[9,32,32]]",
                                                        f"out_dir={run}", "vae.pca_init_batches=4"])
    vae = VAEObjective(cfg).build_model().eval()
    loader = ShardLoader(cfg.data, 0, 1, cfg.seed, batch_size=cfg.parallel.micro_batch)
    videos = [to_model_input(next(loader)["video"]) for _ in range(4)]      # the batches the PCA was fitted on
    mean, U = block_pca(videos, cfg.vae.latent_channels)                     # (768,), (768, z)
    torch.manual_seed(0)
    random_init = VideoVAE(cfg.vae).eval()
    with torch.no_grad():
        for video in videos:
            recon = vae(video)[0]
            # Every block after frame 0 (frame 0's block repeats one frame) is its PCA projection.
            blocks = to_blocks(video).movedim(1, -1)[:, 1:]                  # (B, T' - 1, h, w, 768)
            torch.testing.assert_close(to_blocks(recon).movedim(1, -1)[:, 1:], (blocks - mean) @ U @ U.T + mean,
                                       atol=1e-4, rtol=0)
            torch.testing.assert_close(recon, pca_reconstruction(video, (mean, U)), atol=1e-4, rtol=0)   # all frames
            assert _psnr(recon, video) > _psnr(random_init(video)[0], video) + 3.0
    assert VAEObjective(cfg, fresh=False).pca is None               # a resumed run loads its weights

    # The linear path stays the PCA: frozen, on a fresh build and on a resumed one (same optimizer groups).
    def trainable(model):
        return [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable(vae) == trainable(VAEObjective(cfg).build_model())
    assert not any(".patch." in name for name in trainable(vae)) and "encoder.patch.weight" in dict(
        vae.named_parameters())
