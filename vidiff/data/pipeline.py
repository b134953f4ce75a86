"""Training loader: bucketed batches of decoded clips and images for one rank, with an exact data position.

The data of a stream (videos, images) is cut, epoch by epoch, into a deterministic plan of batches: shards in
a seeded order, samples shuffled within each shard, each sample put in its bucket, a batch emitted whenever
a bucket fills (the epoch's last partial batch of each bucket included, so every usable sample is in the
epoch exactly once). Optimizer step s trains on one stream (image or video, by data.image_fraction) for all of
its micro-batches: each of its `accumulation` micro-steps takes the next `world_size` batches of that stream,
rank r the r-th of them, so every layout that trains the same global batch sees the same batches. A rank's
batches go to its workers in turn. The data position is therefore a few integers shared by all
ranks, and a restart with another world size or worker count continues with exactly the batches not yet
consumed. A sample that cannot be used is skipped and counted by reason; nothing is ever unpickled.
"""

from __future__ import annotations

import glob
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import multiprocessing.forkserver
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vidiff.config import DataConfig
from vidiff.data.buckets import (SPATIAL_FACTOR, TEMPORAL_FACTOR, Bucket, assign_bucket, frames_needed,
                                  make_buckets)
from vidiff.data.shards import INDEX_NAME, PICKLE_EXTS, ShardError, media_kind, scan_tar
from vidiff.data.video import ClipError, decode_clip, decode_image

STREAMS = ("video", "image")
# Why a sample is skipped while decoding (reasons found in the index alone are in ShardLoader.excluded).
SKIP_REASONS = ("undecodable", "undecodable_image", "undecodable_latent", "undecodable_text", "too_short")
TEXT_MEMBERS = ("text.npy", "mask.npy")         # cached token embeddings of a latent sample (cache-latents --text)


@dataclass(frozen=True)
class SampleRef:
    shard: Path
    key: str
    members: dict[str, list[int]]     # ext -> [byte offset, size] inside the shard
    meta: dict                        # frames, fps, width, height (empty when the media was unusable)


def load_index(shards: str) -> list[SampleRef]:
    """Every sample of a shard folder (its index.json, or a scan of its tars) or of a glob of tars."""
    folder = Path(shards)
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        entries = [(folder / s["path"], s["samples"]) for s in index["shards"]]
    else:
        paths = sorted(folder.glob("*.tar")) if folder.is_dir() else sorted(Path(p) for p in glob.glob(shards))
        entries = [(p, scan_tar(p)) for p in paths]
    refs = [SampleRef(path, s["key"], s["members"], s.get("meta", {})) for path, samples in entries for s in samples]
    if not refs:
        raise ShardError(f"data.shards {shards!r} holds no samples (expected a folder of *.tar shards or a glob)")
    return refs


def load_npy(data: bytes, reason: str = "undecodable_latent") -> np.ndarray:
    """An array from a shard, read with allow_pickle=False: never unpickled; unreadable bytes raise
    ClipError(reason)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise ClipError(reason, str(exc)) from None


def sample_name(ref: SampleRef) -> str:
    """A sample's name in its data set: "<shard file>/<key>" (keys alone may repeat across shards)."""
    return f"{ref.shard.name}/{ref.key}"


def unit_hash(*parts: object) -> float:
    """A number in [0, 1) fixed by its inputs: the same on every rank, worker and restart."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def sample_stride(cfg: DataConfig, meta: dict) -> int:
    if cfg.fps is not None and meta.get("fps"):
        return max(1, round(meta["fps"] / cfg.fps))
    return cfg.frame_stride


def has_text(ref: SampleRef) -> bool:
    """Whether a latent sample carries cached token embeddings (both members, non-empty)."""
    return all(ref.members.get(m, (0, 0))[1] > 0 for m in TEXT_MEMBERS)


def classify(samples: list[SampleRef], cfg: DataConfig, buckets: list[Bucket], text_cached: bool = False
             ) -> tuple[dict[str, list[tuple[int, Bucket]]], Counter]:
    """Usable samples per stream with their bucket, and the count of unusable ones by reason. text_cached: the
    latent samples carry token embeddings, so one without them (or with half of them) is unusable."""
    streams: dict[str, list[tuple[int, Bucket]]] = {s: [] for s in STREAMS}
    excluded: Counter[str] = Counter()
    for i, ref in enumerate(samples):
        kind, ext = media_kind(ref.members)
        if any(e.lower() in PICKLE_EXTS for e in ref.members):
            excluded["pickle_member"] += 1
        elif kind is None:
            excluded["no_media"] += 1
        elif ref.members[ext][1] == 0:
            excluded["empty_member"] += 1
        elif "txt" not in ref.members or ref.members["txt"][1] == 0:
            excluded["missing_caption"] += 1
        elif not ref.meta:
            excluded["undecodable" if kind == "video" else f"undecodable_{kind}"] += 1
        elif kind == "latent" and text_cached and not has_text(ref):
            excluded["missing_text"] += 1
        elif kind == "latent":                        # cached at a bucket's size: only that bucket takes it
            m = ref.meta
            bucket = next((b for b in buckets if (b.frames, b.height, b.width) == (m["frames"], m["height"],
                                                                                  m["width"])), None)
            if bucket is None:
                excluded["latent_without_bucket"] += 1
            else:
                streams["image" if bucket.is_image else "video"].append((i, bucket))
        else:
            m = ref.meta
            bucket = assign_bucket(buckets, kind == "image", m["width"], m["height"], m["frames"],
                                   sample_stride(cfg, m))
            if bucket is None:
                excluded["too_short"] += 1
            else:
                streams[kind].append((i, bucket))
    return streams, excluded


class EpochPlanner:
    """The batches of each epoch of one stream, a pure function of (samples, buckets, seed, epoch)."""

    def __init__(self, entries: list[tuple[int, Bucket]], samples: list[SampleRef], buckets: list[Bucket],
                 seed: int, stream: str):
        self.buckets, self.seed, self.stream_id = buckets, seed, STREAMS.index(stream)
        self.by_shard: dict[Path, list[tuple[int, Bucket]]] = {}
        for sample_id, bucket in entries:
            self.by_shard.setdefault(samples[sample_id].shard, []).append((sample_id, bucket))
        self.shards = sorted(self.by_shard)

    @lru_cache(maxsize=4)
    def plan(self, epoch: int) -> list[tuple[Bucket, tuple[int, ...]]]:
        rng = np.random.default_rng([self.seed, epoch, self.stream_id])
        open_batches: dict[Bucket, list[int]] = {b: [] for b in self.buckets}
        batches = []
        for shard_i in rng.permutation(len(self.shards)):
            entries = self.by_shard[self.shards[shard_i]]
            for entry_i in rng.permutation(len(entries)):
                sample_id, bucket = entries[entry_i]
                pending = open_batches[bucket]
                pending.append(sample_id)
                if len(pending) == bucket.batch_size:
                    batches.append((bucket, tuple(pending)))
                    open_batches[bucket] = []
        batches.extend((b, tuple(p)) for b, p in open_batches.items() if p)   # the epoch's remainder
        return batches

    def locate(self, epoch: int, index: int) -> tuple[int, int]:
        """Normalize a position that may run past the end of its epoch."""
        while index >= len(self.plan(epoch)):
            index -= len(self.plan(epoch))
            epoch += 1
        return epoch, index


def image_steps(fraction: float, start: int, stop: int) -> int:
    """Image steps among steps [start, stop): step s is one when floor((s+1) f) > floor(s f)."""
    return math.floor(stop * fraction) - math.floor(start * fraction)


def stream_of(fraction: float, step: int) -> str:
    """The stream that optimizer step `step` trains on."""
    return "image" if image_steps(fraction, step, step + 1) else "video"


def image_micro_batches(fraction: float, accumulation: int, micro: int) -> int:
    """Image micro-steps among the first `micro` micro-steps of a run (every micro-step of an optimizer step
    reads the step's stream)."""
    step, within = divmod(micro, accumulation)
    return accumulation * image_steps(fraction, 0, step) + (within if stream_of(fraction, step) == "image" else 0)


class _RankBatches(IterableDataset):
    """This rank's batches from a fixed position on; in DataLoader workers, worker w takes every W-th."""

    def __init__(self, loader: "ShardLoader", offset: int = 0):
        self.offset = offset                        # local micro-steps to skip (taken by the loader's process)
        self.cfg, self.samples, self.planners = loader.cfg, loader.samples, loader.planners
        self.text_cached = loader.text_cached
        self.rank, self.world_size, self.seed = loader.rank, loader.world_size, loader.seed
        self.accumulation, self.micro, self.cursors = loader.accumulation, loader.micro_steps, dict(loader.cursors)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        j = self.offset + worker
        while True:
            yield self.batch_at(j)
            j += workers

    def position(self, j: int) -> tuple[str, int, int]:
        """(stream, epoch, index in that epoch's plan) of this rank's batch for local micro-step j."""
        fraction, accumulation = self.cfg.image_fraction, self.accumulation
        micro = self.micro + j
        stream = stream_of(fraction, micro // accumulation)
        before = (image_micro_batches(fraction, accumulation, micro)
                  - image_micro_batches(fraction, accumulation, self.micro))
        if stream == "video":
            before = j - before
        epoch, index = self.cursors[stream]
        return (stream, *self.planners[stream].locate(epoch, index + before * self.world_size + self.rank))

    def batch_at(self, j: int) -> dict:
        stream, epoch, index = self.position(j)
        bucket, sample_ids = self.planners[stream].plan(epoch)[index]
        clips, captions, keys, texts, used, skipped, skipped_ids = [], [], [], [], [], Counter(), []
        for sample_id in sample_ids:
            ref = self.samples[sample_id]
            try:                                    # everything of a sample is read before any of it is kept
                clip = self.load(ref, bucket, epoch)
                text = self.text(ref, texts[0][0].shape if texts else None) if self.text_cached else None
            except ClipError as exc:
                skipped[exc.reason] += 1
                skipped_ids.append(sample_name(ref))
                continue
            clips.append(clip)
            if text is not None:
                texts.append(text)
            caption = self.caption(ref)
            drop = unit_hash(self.seed, epoch, ref.shard.name, ref.key, "caption") < self.cfg.caption_dropout
            captions.append("" if drop else caption)
            keys.append(ref.key)
            used.append(sample_id)
        padding = not clips                 # every sample failed: a zero-weight batch keeps ranks in step
        if padding:
            clips = [np.zeros((bucket.frames, bucket.height, bucket.width, 3), np.uint8)]
            captions = [""]
        batch = {"caption": captions, "key": keys, "epoch": epoch, "stream": stream, "bucket": bucket.name,
                 "padding": padding, "skipped": dict(skipped), "ids": [sample_name(self.samples[i]) for i in used],
                 "skipped_ids": skipped_ids}
        stacked = torch.from_numpy(np.stack(clips))
        if stacked.dtype == torch.uint8:
            batch["video"] = stacked                                        # (B, T, H, W, 3)
        else:
            batch["latent"] = stacked.float()                               # (B, z, T', h, w) from cache-latents
        if texts:                                                           # one per clip (text_cached)
            batch["text"] = torch.from_numpy(np.stack([t for t, _ in texts])).float()   # (B, L, Dt)
            batch["text_mask"] = torch.from_numpy(np.stack([m for _, m in texts]))
        return batch

    def read(self, ref: SampleRef, ext: str) -> bytes:
        offset, size = ref.members[ext]
        with open(ref.shard, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def text(self, ref: SampleRef, shape: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray]:
        """Cached token embeddings (L, Dt) and mask (L,) of a latent sample; raises ClipError("undecodable_text")
        when unreadable, inconsistent, or not of the batch's shape."""
        tokens, mask = (load_npy(self.read(ref, m), "undecodable_text") for m in TEXT_MEMBERS)
        if tokens.ndim != 2 or mask.shape != tokens.shape[:1] or (shape is not None and tokens.shape != shape):
            raise ClipError("undecodable_text", f"text.npy {tokens.shape} and mask.npy {mask.shape} of {ref.key} do "
                            f"not make (L, Dt) and (L,){'' if shape is None else f' with (L, Dt) = {shape}'}")
        return tokens, mask.astype(bool)

    def caption(self, ref: SampleRef) -> str:
        return self.read(ref, "txt").decode("utf-8", errors="replace").strip()

    def load(self, ref: SampleRef, bucket: Bucket, epoch: int, start: int | None = None) -> np.ndarray:
        """uint8 (T, H, W, 3) at the bucket's size, from frame `start` (default: seeded with data.random_start,
        else 0); or a latent (z, T', h, w) from latent shards (one of its windows, chosen the same way)."""
        kind, ext = media_kind(ref.members)
        data = self.read(ref, ext)
        if kind == "latent":
            return self.latent(ref, load_npy(data), bucket, epoch)
        if kind == "image":
            frames = decode_image(data, bucket.height, bucket.width)
        else:
            stride = sample_stride(self.cfg, ref.meta)
            spare = ref.meta["frames"] - frames_needed(bucket, stride)
            if start is None:
                start = self.pick(ref, epoch, "start", spare + 1) if spare > 0 else 0
            frames = decode_clip(data, bucket.frames, bucket.height, bucket.width, stride, start,
                                 self.cfg.decode_threads)
        return self.augmented(frames, ref, epoch)

    def pick(self, ref: SampleRef, epoch: int, what: str, n: int) -> int:
        """One of n choices for a sample in an epoch: seeded with data.random_start, else the first."""
        return int(unit_hash(self.seed, epoch, ref.shard.name, ref.key, what) * n) if self.cfg.random_start else 0

    def latent(self, ref: SampleRef, latent: np.ndarray, bucket: Bucket, epoch: int) -> np.ndarray:
        """(z, T', h, w): one window of a cached (W, z, T', h, w) latent (a 4-D latent is one window)."""
        expected = (1 + (bucket.frames - 1) // TEMPORAL_FACTOR, bucket.height // SPATIAL_FACTOR,
                    bucket.width // SPATIAL_FACTOR)
        if latent.ndim == 4:
            latent = latent[None]
        if latent.ndim != 5 or latent.shape[2:] != expected or not len(latent):
            raise ClipError("undecodable_latent", f"latent.npy of {ref.key} has shape {latent.shape}; bucket "
                            f"{bucket.name} needs (windows, z, {', '.join(map(str, expected))})")
        return latent[self.pick(ref, epoch, "window", len(latent))]

    def augmented(self, frames: np.ndarray, ref: SampleRef, epoch: int) -> np.ndarray:
        """(T, H, W, 3) with each of data.augment applied on a seeded coin flip per (epoch, sample)."""
        axes = {"hflip": 2, "vflip": 1, "reverse": 0}
        for name in self.cfg.augment:
            if unit_hash(self.seed, epoch, ref.shard.name, ref.key, name) >= 0.5:
                continue
            frames = np.rot90(frames, axes=(1, 2)) if name == "rot90" else np.flip(frames, axes[name])
        return np.ascontiguousarray(frames)


def _worker_context() -> multiprocessing.context.BaseContext:
    """forkserver: workers fork from a clean single-threaded server, never from a trainer full of threads (gloo,
    OpenMP, FFmpeg), where a lock held by another thread at fork() time deadlocks the child. The server imports
    this module once, so each worker starts in milliseconds."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _start_worker_server() -> None:
    """Start the forkserver now, in the background: its imports (torch, PyAV) overlap whatever the trainer does
    until the first batch, instead of delaying it by a few seconds."""
    _worker_context()
    multiprocessing.forkserver.ensure_running()


class ShardLoader:
    """Iterator of micro-batches (batch_size clips in the first bucket) {"video": uint8 (B, T, H, W, 3), "caption",
    "key", "epoch", "stream", "bucket", "padding", "skipped"} for one data-parallel rank of `world_size`, with
    `accumulation` micro-batches per optimizer step; state_dict() is the data position (the same on every rank).
    Videos stay uint8 (4x less to move between processes and to the GPU): see `to_model_input`."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, seed: int, *, batch_size: int,
                 accumulation: int = 1):
        self.cfg, self.rank, self.world_size, self.accumulation = cfg, rank, world_size, accumulation
        self.seed = cfg.seed if cfg.seed is not None else seed
        self.samples = load_index(cfg.shards)
        self.buckets = make_buckets(cfg, batch_size)
        latents = [r for r in self.samples if media_kind(r.members)[0] == "latent"]
        self.text_cached = any(has_text(r) for r in latents)     # cache-latents --text: every sample needs it
        streams, self.excluded = classify(self.samples, cfg, self.buckets, self.text_cached)
        latent = latents[0] if latents else None
        if cfg.augment and latent is not None:
            raise ShardError(f"data.augment {cfg.augment} transforms pixels, but {latent.shard} holds latents "
                             "(cache-latents output); set data.augment: [] for latent shards")
        self.planners = {s: EpochPlanner(streams[s], self.samples, self.buckets, self.seed, s) for s in STREAMS}
        for stream, used in (("video", cfg.image_fraction < 1), ("image", cfg.image_fraction > 0)):
            if used and not streams[stream]:
                raise ShardError(
                    f"data.shards {cfg.shards!r} has no usable {stream} samples for buckets {cfg.buckets} "
                    f"(image_fraction {cfg.image_fraction}); unusable samples by reason: {dict(self.excluded)}")
        self.step = 0                                    # optimizer steps completed
        self.micro = 0                                   # micro-batches of the current step already taken
        self.cursors = {s: (0, 0) for s in STREAMS}    # (epoch, batch index) of the next batch of each stream
        self.skipped: Counter[str] = Counter()           # runtime skips on this rank
        self._batches: Iterator[dict] | None = None
        if cfg.num_workers:
            _start_worker_server()

    def dataset(self, offset: int = 0) -> "_RankBatches":
        """This rank's batches from the current position, `offset` micro-steps on (also a reader of single
        samples)."""
        return _RankBatches(self, offset)

    def steps_per_epoch(self, stream: str = "video") -> int:
        """Steps that consume one epoch of a stream (the last may reach into the next epoch)."""
        return math.ceil(len(self.planners[stream].plan(0)) / self.world_size)

    @property
    def micro_steps(self) -> int:
        """Micro-steps taken since the run began, counted at the current accumulation."""
        return self.step * self.accumulation + self.micro

    def state_dict(self) -> dict:
        """The data position: optimizer steps done, micro-batches of the next step taken, one cursor per stream.
        Saved between optimizer steps (micro 0), it continues exactly at any world size and accumulation."""
        return {"step": self.step, "micro": self.micro, "cursors": {s: list(c) for s, c in self.cursors.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.micro = int(state["step"]), int(state.get("micro", 0))
        if self.micro >= self.accumulation:
            raise ValueError(f"data position {state} is {self.micro} micro-batches into a step, but this run "
                             f"accumulates {self.accumulation} per step; resume from a checkpoint between steps")
        self.cursors = {s: tuple(state["cursors"][s]) for s in STREAMS}
        self._batches = None

    def _start(self) -> Iterator[dict]:
        dataset = self.dataset()
        if self.cfg.num_workers == 0:
            return iter(dataset)
        # The first batch is read in this process, while the worker server started with the loader finishes its
        # imports (_start_worker_server); the workers fork from it when the second batch is asked for.
        first = dataset.batch_at(0)
        workers = DataLoader(self.dataset(offset=1), batch_size=None, num_workers=self.cfg.num_workers,
                             prefetch_factor=2, multiprocessing_context=_worker_context())
        return itertools.chain([first], workers)

    def __iter__(self) -> "ShardLoader":
        return self

    def __next__(self) -> dict:
        if self._batches is None:
            self._batches = self._start()
        batch = next(self._batches)
        stream = stream_of(self.cfg.image_fraction, self.step)
        epoch, index = self.cursors[stream]
        self.cursors[stream] = self.planners[stream].locate(epoch, index + self.world_size)
        self.micro += 1
        if self.micro == self.accumulation:
            self.step, self.micro = self.step + 1, 0
        self.skipped.update(batch["skipped"])
        return batch


def to_model_input(video: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (B, T, H, W, 3) from the loader -> float (B, 3, T, H, W) in [-1, 1] on the device."""
    video = video.to(device, non_blocking=True).permute(0, 4, 1, 2, 3)     # (B, 3, T, H, W)
    return video.float() / 127.5 - 1.0


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3)."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()
