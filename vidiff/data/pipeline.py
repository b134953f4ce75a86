"""Training loader: batches of decoded clips for one rank, with a data position that can be saved and resumed.

Each epoch is a seeded permutation of every indexed sample, dealt round-robin to the ranks; the remainder
that does not divide evenly is dropped, so every rank yields the same number of batches (no hang at epoch
end). A sample that cannot be used is skipped and counted by reason, and the next one takes its place.
"""

from __future__ import annotations

import glob
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vidiff.config import DataConfig
from vidiff.data.shards import INDEX_NAME, VIDEO_EXTS, ShardError, scan_tar
from vidiff.data.video import ClipError, decode_clip

_VIDEO_MEMBERS = tuple(ext.lstrip(".") for ext in VIDEO_EXTS)


@dataclass(frozen=True)
class SampleRef:
    shard: Path
    key: str
    members: dict[str, list[int]]     # ext -> [byte offset, size] inside the shard


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
    refs = [SampleRef(path, s["key"], s["members"]) for path, samples in entries for s in samples]
    if not refs:
        raise ShardError(f"data.shards {shards!r} holds no samples (expected a folder of *.tar shards or a glob)")
    return refs


class ShardLoader:
    """Iterator of batches {"video": (B, 3, T, H, W) in [-1, 1], "caption": [str], "key": [str]} for one rank."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, seed: int):
        self.cfg, self.rank, self.world_size, self.seed = cfg, rank, world_size, seed
        self.samples = load_index(cfg.shards)
        self.per_rank = len(self.samples) // world_size
        if self.per_rank < 1:
            raise ShardError(f"{len(self.samples)} samples cannot feed {world_size} ranks; write more samples")
        self.epoch, self.position = 0, 0      # position: samples of this rank's share consumed this epoch
        self.skipped: Counter[str] = Counter()
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(len(self.samples), generator=g).tolist()
        return perm[self.rank::self.world_size][: self.per_rank]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order()

    def _read(self, ref: SampleRef, ext: str) -> bytes:
        offset, size = ref.members[ext]
        with open(ref.shard, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def _load(self, ref: SampleRef) -> tuple[np.ndarray, str]:
        video_ext = next((e for e in _VIDEO_MEMBERS if e in ref.members), None)
        if video_ext is None:
            raise ClipError("no_video", f"sample {ref.key} in {ref.shard.name} has no video member")
        data = self._read(ref, video_ext)
        if not data:
            raise ClipError("empty_member", f"sample {ref.key} in {ref.shard.name} has a zero-byte {video_ext}")
        caption = self._read(ref, "txt").decode("utf-8", errors="replace").strip() if "txt" in ref.members else ""
        cfg = self.cfg
        return decode_clip(data, cfg.frames, cfg.height, cfg.width, cfg.frame_stride), caption

    def _next_sample(self) -> tuple[np.ndarray, str, str]:
        while True:
            if self.position >= self.per_rank:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order()
            ref = self.samples[self._order[self.position]]
            self.position += 1
            try:
                frames, caption = self._load(ref)
                return frames, caption, ref.key
            except ClipError as exc:
                self.skipped[exc.reason] += 1

    def __iter__(self) -> "ShardLoader":
        return self

    def __next__(self) -> dict:
        clips, captions, keys = [], [], []
        for _ in range(self.cfg.batch_size):
            frames, caption, key = self._next_sample()
            clips.append(frames)
            captions.append(caption)
            keys.append(key)
        video = torch.from_numpy(np.stack(clips))                           # (B, T, H, W, 3) uint8
        video = video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0         # (B, 3, T, H, W)
        return {"video": video, "caption": captions, "key": keys}


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3)."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()
