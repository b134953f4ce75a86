"""Latent shards: what cache-latents writes is what the loader reads back; a rerun skips finished shards."""

import pytest
import torch

from conftest import REPO
from datasets import write_mixed
from vidiff.config import load_config
from vidiff.data.latents import cache_latents
from vidiff.data.pipeline import ShardLoader, to_model_input
from vidiff.data.shards import ShardError, write_index
from vidiff.models.vae import VideoVAE


def test_latent_shards_round_trip_and_resume(tmp_path):
    shards = write_mixed(tmp_path / "clips", n_video=9, n_image=0, max_count=3)
    cfg = load_config(REPO / "configs/demo.yaml", [f"data.shards={shards}", "data.buckets=[[9,32,32]]",
                                                    "vae.checkpoint=unused", "data.caption_dropout=0"])
    torch.manual_seed(0)
    vae = VideoVAE(cfg.vae.model_copy(update={"latent_channels": 4, "base_channels": 8})).eval()
    out = tmp_path / "latents"
    written = cache_latents(cfg, out, vae)
    assert len(written) == 3                                   # one latent shard per input shard
    write_index(out)

    batch = cfg.parallel.micro_batch
    raw = ShardLoader(cfg.data.model_copy(update={"random_start": False}), 0, 1, seed=0, batch_size=batch)
    cached = ShardLoader(cfg.data.model_copy(update={"shards": str(out)}), 0, 1, seed=0, batch_size=batch)
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
