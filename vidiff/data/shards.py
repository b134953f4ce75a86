"""Write webdataset tar shards (clip bytes unchanged, .txt caption, .json metadata) and their index.

The index (`index.json` beside the shards) lists each shard's samples with the byte offset and size of
every member, so the loader can read a sample without scanning the tar and can resume at any sample.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator

import webdataset as wds
from tqdm import tqdm

from vidiff.data.synthetic import make_clips
from vidiff.data.video import ClipError, encode_mp4, probe

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
INDEX_NAME = "index.json"


class ShardError(ValueError):
    """Shard input or output that cannot be used."""


def scan_tar(path: str | Path) -> list[dict]:
    """Samples of one tar in order: [{"key": k, "members": {ext: [offset, size]}}], from its headers only."""
    samples: list[dict] = []
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            name = Path(info.name).name
            key, _, ext = name.partition(".")
            if not samples or samples[-1]["key"] != key:
                samples.append({"key": key, "members": {}})
            samples[-1]["members"][ext] = [info.offset_data, info.size]
    return samples


def write_index(folder: str | Path) -> Path:
    """Scan every *.tar in folder and write index.json; returns its path."""
    folder = Path(folder)
    shards = sorted(folder.glob("*.tar"))
    if not shards:
        raise ShardError(f"no *.tar shards in {folder}")
    index = {"shards": [{"path": s.name, "samples": scan_tar(s)} for s in shards]}
    path = folder / INDEX_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index))
    tmp.replace(path)
    return path


def write_shards(samples: Iterable[dict], out: str | Path, prefix: str = "shard",
                 max_count: int = 10_000, max_bytes: int = 1 << 30, total: int | None = None) -> Path:
    """Write webdataset samples ({"__key__", "mp4", "txt", "json"}) into PREFIX-000000.tar ...; returns the index."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{prefix}-*.tar"):
        old.unlink()
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=max_count, maxsize=max_bytes, verbose=0) as sink:
        for sample in tqdm(samples, total=total, desc="shards", unit="sample"):
            if "." in sample["__key__"]:
                raise ShardError(f"sample key {sample['__key__']!r} contains a dot; webdataset splits keys at dots")
            sink.write(sample)
    return write_index(out)


def synthetic_samples(n: int, height: int, width: int, frames: int, fps: int, seed: int) -> Iterator[dict]:
    """Moving-shapes clips as webdataset samples with captions and metadata."""
    for i, (clip, video) in enumerate(make_clips(n, height, width, frames, seed)):
        meta = {"frames": frames, "fps": fps, "width": width, "height": height,
                "duration": frames / fps, "source": "synthetic", "truth": asdict(clip)}
        yield {"__key__": f"{i:08d}", "mp4": encode_mp4(video, fps), "txt": clip.caption, "json": meta}


def folder_samples(folder: str | Path) -> Iterator[dict]:
    """Videos in a folder, each with a caption sidecar of the same stem (clip.mp4 + clip.txt)."""
    folder = Path(folder)
    videos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTS)
    if not videos:
        raise ShardError(f"no videos ({', '.join(VIDEO_EXTS)}) under {folder}")
    for i, path in enumerate(videos):
        caption_path = path.with_suffix(".txt")
        caption = caption_path.read_text().strip() if caption_path.is_file() else ""
        data = path.read_bytes()
        try:
            info = probe(data)
        except ClipError as exc:
            tqdm.write(f"skipping {path}: {exc}")
            continue
        meta = {**asdict(info), "source": str(path.relative_to(folder))}
        yield {"__key__": f"{i:08d}", path.suffix.lower().lstrip("."): data, "txt": caption, "json": meta}
