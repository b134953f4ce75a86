"""Latent shards: a shard set encoded once by the frozen VAE (and optionally the text encoder), so the DiT
trainer never runs the VAE. One latent shard per input shard, written atomically, so a restarted job skips
the shards already done; shards are spread over ranks.

A latent sample holds `latent.npy` (float16 (z, T', h, w), normalized as VideoVAE.encode returns it), the
caption `.txt`, optionally `text.npy` (float16 (L, Dt) token embeddings) and `mask.npy` (bool (L,)), and
`.json` metadata (the bucket's frames, height, width; the source shard and key).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from vidiff.config import RunConfig
from vidiff.data.pipeline import ShardLoader, to_model_input
from vidiff.data.video import ClipError


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@torch.no_grad()
def cache_latents(cfg: RunConfig, out: str | Path, vae, text_encoder=None, rank: int = 0,
                  world_size: int = 1) -> list[Path]:
    """Encode this rank's share of cfg.data.shards into OUT/latents-<shard>.tar; returns the shards written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_cfg = cfg.data.model_copy(update={"random_start": False, "caption_dropout": 0.0, "num_workers": 0,
                                         "augment": []})
    loader = ShardLoader(data_cfg, 0, 1, cfg.seed, batch_size=cfg.parallel.micro_batch)
    reader = loader.dataset()
    by_shard: dict[Path, list] = {}                  # usable samples of both streams, by input shard
    for planner in loader.planners.values():
        for shard, entries in planner.by_shard.items():
            by_shard.setdefault(shard, []).extend(entries)
    written = []
    mine = sorted(by_shard)[rank::world_size]
    for shard in tqdm(mine, desc=f"cache-latents rank {rank}", unit="shard", disable=rank != 0):
        target = out / f"latents-{shard.stem}.tar"
        if target.is_file():                        # finished by an earlier run
            continue
        tmp = target.with_name(f".{target.name}.tmp")
        with wds.TarWriter(str(tmp)) as sink:
            for sample_id, bucket in sorted(by_shard[shard], key=lambda e: e[0]):
                ref = loader.samples[sample_id]
                try:
                    clip = reader.load(ref, bucket, epoch=0)
                except ClipError as exc:
                    loader.skipped[exc.reason] += 1
                    continue
                latent = vae.encode(to_model_input(torch.from_numpy(clip)[None]))[0]      # (z, T', h, w)
                caption = reader.caption(ref)
                sample = {"__key__": ref.key, "latent.npy": npy_bytes(latent.half().numpy()), "txt": caption,
                          "json": {"frames": bucket.frames, "height": bucket.height, "width": bucket.width,
                                   "fps": ref.meta.get("fps", 0), "source": f"{shard.name}:{ref.key}"}}
                if text_encoder is not None:
                    tokens, mask = text_encoder([caption])
                    sample["text.npy"] = npy_bytes(tokens[0].half().numpy())
                    sample["mask.npy"] = npy_bytes(mask[0].numpy())
                sink.write(sample)
        tmp.replace(target)
        written.append(target)
    return written

