"""Latent shards: a shard set encoded once by the frozen VAE (and optionally the text encoder), so the DiT
trainer never runs the VAE. One latent shard per input shard, written atomically, so a restarted job skips
the shards already done; shards are spread over ranks.

A latent sample holds `latent.npy` (float16 (W, z, T', h, w): W windows of the clip, each normalized as
VideoVAE.encode returns it), the caption `.txt`, optionally `text.npy` (float16 (L, Dt) token embeddings) and
`mask.npy` (bool (L,)), and `.json` metadata (the bucket's frames, height, width; the windows' start frames; the
source shard and key).

Windows: a clip longer than its bucket is encoded at up to `windows` start frames, the first at frame 0 and the
others seeded per clip, so a DiT trained on latents sees other parts of its clips, as one trained on pixels with
data.random_start does: the loader picks one window per (seed, epoch, sample) when random_start is on, and the
first otherwise. A clip with no spare frames has one window.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from vidiff.config import ConfigError, RunConfig, TextConfig
from vidiff.data.buckets import frames_needed
from vidiff.data.pipeline import ShardLoader, sample_stride, to_model_input, unit_hash
from vidiff.data.video import ClipError
from vidiff.progress import progress

TEXT_BATCH = 64                                     # captions per text encoder call
TEXT_RECORD = "text_encoder.json"                   # beside latent shards with text: the text.* settings used


class CachedTextError(ConfigError):
    """Token embeddings cached with other text settings than the run's."""


def text_record(text: TextConfig) -> dict:
    """The text settings that decide cached token embeddings."""
    return {"encoder": text.encoder, "layer": text.layer, "max_tokens": text.max_tokens}


def check_cached_text(shards: str, text: TextConfig, name: str = "data.shards") -> None:
    """Latent shards whose token embeddings were cached with other text.* settings than `text` raise
    CachedTextError naming both (and the folder as `name`: data.shards, data.eval_shards, --out); a folder without
    a record (pixel shards, latents without text, or cached before the record existed) passes."""
    path = Path(shards) / TEXT_RECORD
    if not path.is_file():
        return
    cached, wanted = json.loads(path.read_text()), text_record(text)
    if cached != wanted:
        differ = ", ".join(f"text.{k} {cached.get(k)!r} there, {v!r} here" for k, v in wanted.items()
                           if cached.get(k) != v)
        raise CachedTextError(f"{name} {shards}: its token embeddings were cached with other text settings "
                              f"({differ}); cache them again with this config (vidiff cache-latents CONFIG --text "
                              f"--out NEW_FOLDER) or set the run's text.* to match")


def check_stage_shards(shards: str, stage: str, name: str = "data.shards") -> None:
    """A super-resolution stage makes its condition from pixel clips (diffusion/conditions.py): latent shards
    (a folder cache-latents wrote) raise ConfigError naming the folder as `name`."""
    folder = Path(shards)
    if stage != "base" and folder.is_dir() and any(folder.glob("latents-*.tar")):
        raise ConfigError(f"{name} {shards} holds cached latents, but stage {stage!r} makes its condition from "
                          "pixel clips (frames dropped or downsampled, then encoded): train it on the pixel shards "
                          "cache-latents read")


def _write_text_record(out: Path, text: TextConfig) -> None:
    """Record the text settings of this cache (atomically), unless it holds shards of an unrecorded earlier one."""
    if not (out / TEXT_RECORD).is_file() and any(out.glob("latents-*.tar")):
        return
    tmp = out / f".{TEXT_RECORD}.tmp"
    tmp.write_text(json.dumps(text_record(text)))
    tmp.replace(out / TEXT_RECORD)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def window_starts(spare: int, windows: int, seed: int, shard: str, key: str) -> list[int]:
    """Start frames of a clip's cached windows: 0, then seeded starts in [0, spare], without repeats."""
    starts = [0] + [int(unit_hash(seed, "window", shard, key, k) * (spare + 1)) for k in range(1, windows)]
    return sorted(set(starts)) if spare > 0 else [0]


@torch.no_grad()
def cache_latents(cfg: RunConfig, out: str | Path, vae, text_encoder=None, rank: int = 0,
                  world_size: int = 1, windows: int = 4) -> list[Path]:
    """Encode this rank's share of cfg.data.shards into OUT/latents-<shard>.tar, up to `windows` windows per clip;
    returns the shards written. With a text encoder, OUT/text_encoder.json records cfg.text (check_cached_text)."""
    if windows < 1:
        raise ValueError(f"windows must be at least 1, got {windows}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if text_encoder is not None:
        check_cached_text(str(out), cfg.text, "--out")   # every rank: shards finished with other settings stay out
        if rank == 0:
            _write_text_record(out, cfg.text)
    device = next(vae.parameters()).device
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
    for shard in progress(mine, desc=f"cache-latents rank {rank}", unit="shard", disable=rank != 0):
        target = out / f"latents-{shard.stem}.tar"
        if target.is_file():                        # finished by an earlier run
            continue
        tmp = target.with_name(f".{target.name}.tmp")
        samples = []
        for sample_id, bucket in sorted(by_shard[shard], key=lambda e: e[0]):
            ref = loader.samples[sample_id]
            stride = sample_stride(data_cfg, ref.meta)
            spare = 0 if bucket.is_image else ref.meta["frames"] - frames_needed(bucket, stride)
            starts = window_starts(spare, windows, loader.seed, shard.name, ref.key)
            try:
                clips = [reader.load(ref, bucket, epoch=0, start=start) for start in starts]
            except ClipError as exc:
                loader.skipped[exc.reason] += 1
                continue
            latent = torch.cat([vae.encode(to_model_input(torch.from_numpy(clip)[None], device))
                                for clip in clips]).cpu()                     # (W, z, T', h, w)
            caption = reader.caption(ref)
            sample = {"__key__": ref.key, "latent.npy": npy_bytes(latent.half().numpy()), "txt": caption,
                      "json": {"frames": bucket.frames, "height": bucket.height, "width": bucket.width,
                               "fps": ref.meta.get("fps", 0), "windows": starts,
                               "source": f"{shard.name}:{ref.key}"}}
            samples.append(sample)
        if text_encoder is not None:                # in batches: caption by caption it cost as much as the VAE
            for i in range(0, len(samples), TEXT_BATCH):
                batch = samples[i:i + TEXT_BATCH]
                tokens, mask = text_encoder([sample["txt"] for sample in batch])    # (b, L, Dt), (b, L)
                for sample, sample_tokens, sample_mask in zip(batch, tokens.half().cpu().numpy(), mask.cpu().numpy()):
                    sample["text.npy"], sample["mask.npy"] = npy_bytes(sample_tokens), npy_bytes(sample_mask)
        with wds.TarWriter(str(tmp)) as sink:
            for sample in samples:
                sink.write(sample)
        tmp.replace(target)
        written.append(target)
    return written

