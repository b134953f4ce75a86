"""Latent shards: what cache-latents writes is what the loader reads back, several windows of each clip; a rerun
skips finished shards."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from conftest import REPO, run_vidiff
from datasets import write_mixed
from vidiff.config import load_config, save_config
from vidiff.data.latents import cache_latents
from vidiff.data.pipeline import ShardLoader, to_model_input
from vidiff.data.shards import ShardError, write_index
from vidiff.models.vae import VideoVAE


def _clips_and_vae(tmp_path, max_count: int):
    """9 video clips (9 and 13 frames) in shards of max_count, a config reading them in a 9x32x32 bucket, and a
    small random VAE (seed 0)."""
    shards = write_mixed(tmp_path / "clips", n_video=9, n_image=0, max_count=max_count)
    cfg = load_config(REPO / "configs/demo.yaml", [f"data.shards={shards}", "data.buckets=[[9,32,32]]",
                                                    "vae.checkpoint=unused", "data.caption_dropout=0"])
    torch.manual_seed(0)
    return cfg, VideoVAE(cfg.vae.model_copy(update={"latent_channels": 4, "base_channels": 8})).eval()


def test_latent_shards_round_trip_and_resume(tmp_path):
    cfg, vae = _clips_and_vae(tmp_path, max_count=3)
    out = tmp_path / "latents"
    written = cache_latents(cfg, out, vae)
    assert len(written) == 3                                   # one latent shard per input shard
    write_index(out)

    batch = cfg.parallel.micro_batch
    raw = ShardLoader(cfg.data.model_copy(update={"random_start": False}), 0, 1, seed=0, batch_size=batch)
    cached = ShardLoader(cfg.data.model_copy(update={"shards": str(out), "random_start": False}), 0, 1, seed=0,
                         batch_size=batch)
    assert cached.steps_per_epoch() == raw.steps_per_epoch()
    a, b = next(raw), next(cached)
    assert a["key"] == b["key"] and a["caption"] == b["caption"]
    assert "video" not in b and b["latent"].shape == (4, 4, 3, 4, 4)
    torch.testing.assert_close(b["latent"], vae.encode(to_model_input(a["video"])), atol=2e-3, rtol=2e-3)

    first = written[0]
    stamp = first.stat().st_mtime_ns
    written[1].unlink()
    again = cache_latents(cfg, out, vae)
    assert again == [written[1]] and first.stat().st_mtime_ns == stamp     # only the missing shard redone

    with pytest.raises(ShardError, match=r"data.augment \['hflip'\] transforms pixels.*holds latents"):
        ShardLoader(cfg.data.model_copy(update={"shards": str(out), "augment": ["hflip"]}), 0, 1, seed=0,
                    batch_size=batch)


def test_cached_text_embeddings_are_each_captions_own(tmp_path, monkeypatch):
    """cache-latents --text encodes captions in batches (TEXT_BATCH): each sample's text.npy and mask.npy equal its
    own caption encoded alone, at float16 precision, with batches that end mid-shard."""
    from vidiff.data import latents
    from vidiff.models.text import TextEncoder

    cfg, vae = _clips_and_vae(tmp_path, max_count=9)
    text = TextEncoder(cfg.text)
    monkeypatch.setattr(latents, "TEXT_BATCH", 4)              # 9 captions: batches of 4, 4 and 1
    (written,) = cache_latents(cfg, tmp_path / "latents", vae, text)
    with tarfile.open(written) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    keys = sorted({name.split(".", 1)[0] for name in members})
    captions = [members[f"{key}.txt"].decode() for key in keys]
    assert len(keys) == 9 and len(set(captions)) > 1
    for key, caption in zip(keys, captions):
        tokens, mask = text([caption])
        cached = np.load(io.BytesIO(members[f"{key}.text.npy"]), allow_pickle=False)
        assert np.array_equal(np.load(io.BytesIO(members[f"{key}.mask.npy"]), allow_pickle=False), mask[0].numpy())
        torch.testing.assert_close(torch.from_numpy(cached).float(), tokens[0], atol=1e-2, rtol=1e-2)


def test_cached_text_settings_are_checked_before_launch(tmp_path):
    """cache-latents --text records text.* beside the shards: a DiT run whose text.layer differs is refused by
    `vidiff check` (exit 2, naming both values) and caching into the folder with other settings is refused; the
    same settings pass."""
    from vidiff.data.latents import CachedTextError
    from vidiff.models.text import TextEncoder

    cfg, vae = _clips_and_vae(tmp_path, max_count=9)
    out = tmp_path / "latents"
    cache_latents(cfg, out, vae, TextEncoder(cfg.text))
    write_index(out)
    config = tmp_path / "dit.yaml"
    save_config(cfg.model_copy(update={"data": cfg.data.model_copy(update={"shards": str(out)}),
                                       "out_dir": str(tmp_path / "run")}), config)
    same = run_vidiff("check", str(config), "--world-size", "1")
    assert same.returncode == 0, same.stderr
    other = run_vidiff("check", str(config), "--world-size", "1", "text.layer=0")
    assert other.returncode == 2 and "text.layer -1 there, 0 here" in other.stderr, other.stderr
    with pytest.raises(CachedTextError, match="text.layer -1 there, 0 here"):
        cache_latents(load_config(config, ["text.layer=0"]), out, vae, TextEncoder(cfg.text))


def test_clips_are_cached_at_several_windows_and_the_loader_picks_one_per_epoch(tmp_path):
    """A 13-frame clip in a 9-frame bucket has 5 possible starts: cache-latents encodes frame 0 and seeded starts
    (each window equals encoding the clip from that frame); with data.random_start the loader's choice changes
    across epochs, without it the loader always gives the frame-0 window."""
    cfg, vae = _clips_and_vae(tmp_path, max_count=3)
    out = tmp_path / "latents"
    cache_latents(cfg, out, vae, windows=4)
    index = json.loads(write_index(out).read_text())
    samples = {s["key"]: (shard["path"], s) for shard in index["shards"] for s in shard["samples"]}
    reader = ShardLoader(cfg.data, 0, 1, seed=0, batch_size=1).dataset()
    by_key = {r.key: r for r in reader.samples}
    long_keys = [k for k, r in by_key.items() if r.meta["frames"] == 13]
    assert long_keys
    for key in long_keys:
        path, sample = samples[key]
        with tarfile.open(out / path) as tar:
            members = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar if m.name.startswith(key)}
        latent = np.load(io.BytesIO(members["latent.npy"]), allow_pickle=False)           # (W, z, T', h, w)
        starts = json.loads(members["json"])["windows"]
        assert starts[0] == 0 and len(starts) == len(latent) > 1 and starts == sorted(set(starts))
        for start, window in zip(starts, latent):
            clip = reader.load(by_key[key], reader.planners["video"].buckets[0], epoch=0, start=start)
            expected = vae.encode(to_model_input(torch.from_numpy(clip)[None]))[0]
            torch.testing.assert_close(torch.from_numpy(window).float(), expected, atol=2e-3, rtol=2e-3)

    def windows_seen(random_start: bool) -> dict[str, set[float]]:
        """The distinct latents each 13-frame clip came as, over 6 epochs."""
        loader = ShardLoader(cfg.data.model_copy(update={"shards": str(out), "random_start": random_start}), 0, 1,
                             seed=0, batch_size=1)
        seen: dict[str, set[float]] = {key: set() for key in long_keys}
        for _ in range(6 * loader.steps_per_epoch()):
            batch = next(loader)
            if batch["key"][0] in seen:
                seen[batch["key"][0]].add(round(float(batch["latent"].sum()), 3))
        return seen
    assert all(len(v) == 1 for v in windows_seen(random_start=False).values())
    assert sum(len(v) for v in windows_seen(random_start=True).values()) > len(long_keys)
