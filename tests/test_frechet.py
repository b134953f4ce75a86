"""The Fréchet distance's feature network is deterministic and cached; the distance of a set to itself is ~0
and grows with the strength of a corruption."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vidiff.data.synthetic import heldout_clips
from vidiff.eval.frechet import ClipNetConfig, accuracy, cache_dir, clip_features, frechet_distance, load_clipnet, \
    train_clipnet

SMALL = ClipNetConfig(channels=(8, 16, 32, 32), clips=1024, epochs=4, batch=16, lr=3e-3)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VIDIFF_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield load_clipnet(SMALL)


@pytest.fixture(scope="module")
def heldout():
    return heldout_clips(48, 48, 9, per_combo=2, seed=5)


def test_the_network_trains_deterministically_and_is_cached(tmp_path, monkeypatch):
    tiny = ClipNetConfig(channels=(4, 8, 8), clips=64, epochs=1, batch=16)
    a, b = train_clipnet(tiny).state_dict(), train_clipnet(tiny).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = train_clipnet(ClipNetConfig(channels=(4, 8, 8), clips=64, epochs=1, batch=16, seed=1)).state_dict()
    assert not all(torch.equal(a[k], other[k]) for k in a)                # the seed matters: not a constant
    monkeypatch.setenv("VIDIFF_CACHE", str(tmp_path))
    cached = load_clipnet(tiny)
    path = cache_dir() / f"clipnet-{tiny.key}.safetensors"
    assert path.is_file() and all(torch.equal(load_file(path)[k], a[k]) for k in a)
    assert all(torch.equal(cached.state_dict()[k], a[k]) for k in a)
    assert ClipNetConfig(clips=65).key != ClipNetConfig().key


def test_the_features_know_colour_shape_and_motion(net, heldout):
    scores = accuracy(net, [c for c, _ in heldout], [v for _, v in heldout])
    assert min(scores.values()) > 0.85, scores          # chance: 1/4, 1/3, 1/4


def test_distance_of_a_set_to_itself_is_zero_and_grows_with_corruption(net, heldout):
    videos = [v for _, v in heldout]
    real = clip_features(net, videos)
    assert abs(frechet_distance(real, real)) < 1e-6 * np.trace(np.cov(real, rowvar=False))
    rng = np.random.default_rng(0)
    noise = [rng.normal(0, 1, v.shape) for v in videos]                    # one draw, scaled: strength alone varies
    distances = [frechet_distance(real, clip_features(
        net, [np.clip(v + s * n, 0, 255).astype(np.uint8) for v, n in zip(videos, noise)])) for s in (15, 30, 60, 120)]
    assert all(a < b for a, b in zip(distances, distances[1:])), distances
    assert distances[0] > 0
