"""Write webdataset tar shards (clip or image bytes unchanged, .txt caption, .json metadata) and their index.

Inputs: a folder of videos/images with caption sidecars, a CSV/JSONL manifest of (path, caption), existing
video2dataset-style shards, or the synthetic generator. The index (`index.json` beside the shards) lists
each shard's samples with the byte offset and size of every member and the media metadata, so the loader
plans buckets without decoding and reads any sample with one seek.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import asdict
from multiprocessing import Pool
from pathlib import Path
from typing import Iterable, Iterator

import webdataset as wds
from tqdm import tqdm

from vidiff.config import InputError
from vidiff.data.synthetic import Split, make_clips
from vidiff.data.video import ClipError, encode_mp4, probe, probe_image
from vidiff.progress import progress

VIDEO_EXTS = ("mp4", "mov", "mkv", "webm", "avi")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
# Members that webdataset or torch would unpickle: never read, the sample is skipped.
PICKLE_EXTS = ("pyd", "pickle", "pkl", "pth", "pt")
INDEX_NAME = "index.json"
META_KEYS = ("frames", "fps", "width", "height")


class ShardError(InputError, ValueError):
    """Shard input or output that cannot be used."""


LATENT_MEMBER = "latent.npy"


def media_kind(members: Iterable[str]) -> tuple[str | None, str | None]:
    """("video" | "image" | "latent" | None, the media member's extension) of a sample's member extensions."""
    members = list(members)
    if LATENT_MEMBER in members:
        return "latent", LATENT_MEMBER
    for ext in members:
        if ext.lower() in VIDEO_EXTS:
            return "video", ext
    for ext in members:
        if ext.lower() in IMAGE_EXTS:
            return "image", ext
    return None, None


def probe_media(kind: str, data: bytes) -> dict:
    info = probe(data) if kind == "video" else probe_image(data)
    return {k: getattr(info, k) for k in (*META_KEYS, "duration")}


def _sample_meta(tar: tarfile.TarFile, infos: dict[str, tarfile.TarInfo]) -> dict:
    """Metadata of one sample: its .json member when that has frames/fps/width/height, else a PyAV probe."""
    kind, ext = media_kind(infos)
    if kind is None or any(e.lower() in PICKLE_EXTS for e in infos) or infos[ext].size == 0:
        return {}
    meta = {}
    if "json" in infos and infos["json"].size:
        try:
            meta = json.loads(tar.extractfile(infos["json"]).read())
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
    if kind == "image":
        meta = {**meta, "frames": 1, "fps": 0.0}
    if kind == "latent":                         # written by cache-latents: the json is the only source
        return {k: meta[k] for k in META_KEYS} if all(k in meta for k in META_KEYS) else {}
    if not all(isinstance(meta.get(k), (int, float)) for k in META_KEYS):
        try:
            meta = {**meta, **probe_media(kind, tar.extractfile(infos[ext]).read())}
        except ClipError:
            return {}
    return {k: meta[k] for k in META_KEYS}


def scan_tar(path: str | Path) -> list[dict]:
    """Samples of one tar in order: [{"key", "members": {ext: [offset, size]}, "meta": {...}}]."""
    samples: list[dict] = []
    infos: list[dict[str, tarfile.TarInfo]] = []
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = Path(info.name).name.partition(".")
            if not samples or samples[-1]["key"] != key:
                samples.append({"key": key, "members": {}})
                infos.append({})
            samples[-1]["members"][ext] = [info.offset_data, info.size]
            infos[-1][ext] = info
        for sample, members in zip(samples, infos):
            sample["meta"] = _sample_meta(tar, members)
    return samples


def write_index(folder: str | Path) -> Path:
    """Scan every *.tar in folder and write index.json (atomically); returns its path."""
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
                 max_count: int = 100_000, max_bytes: int = 1 << 30, total: int | None = None) -> Path:
    """Write webdataset samples ({"__key__", media, "txt", "json"}) into PREFIX-000000.tar ...; returns the index."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{prefix}-*.tar"):
        old.unlink()
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=max_count, maxsize=max_bytes, verbose=0) as sink:
        for sample in progress(samples, total=total, desc="shards", unit="sample"):
            if "." in sample["__key__"]:
                raise ShardError(f"sample key {sample['__key__']!r} contains a dot; webdataset splits keys at dots")
            sink.write(sample)
    return write_index(out)


def synthetic_samples(n: int, height: int, width: int, frames: int, fps: int, seed: int, split: Split = "train",
                      second_object: float = 0.0, texture: float = 0.0) -> Iterator[dict]:
    """Moving-shapes clips as webdataset samples with captions and metadata (the clip's truth under "truth")."""
    for i, (clip, video) in enumerate(make_clips(n, height, width, frames, seed, split, second_object, texture)):
        meta = {"frames": frames, "fps": fps, "width": width, "height": height,
                "duration": frames / fps, "source": "synthetic", "truth": asdict(clip)}
        yield {"__key__": f"{i:08d}", "mp4": encode_mp4(video, fps), "txt": clip.caption, "json": meta}


def _probe_file(item: tuple[int, str, str]) -> dict | None:
    """(index, path, caption) -> a webdataset sample, or None (with a note) when the file is unusable."""
    i, path, caption = item
    ext = Path(path).suffix.lower().lstrip(".")
    kind = "video" if ext in VIDEO_EXTS else "image" if ext in IMAGE_EXTS else None
    try:
        data = Path(path).read_bytes()
        if kind is None:
            raise ClipError("unsupported", f"extension .{ext} is neither video {VIDEO_EXTS} nor image {IMAGE_EXTS}")
        meta = {**probe_media(kind, data), "source": str(path)}
    except (ClipError, OSError) as exc:
        tqdm.write(f"skipping {path}: {exc}")
        return None
    sample = {"__key__": f"{i:08d}", ext: data, "json": meta}
    if caption:                                  # no caption, no .txt: the loader skips it as missing_caption
        sample["txt"] = caption
    return sample


def _probed(items: list[tuple[int, str, str]], workers: int) -> Iterator[dict]:
    """Probe files with PyAV across processes, in input order."""
    with Pool(workers) as pool:
        for sample in pool.imap(_probe_file, items, chunksize=4):
            if sample is not None:
                yield sample


def folder_samples(folder: str | Path, workers: int = 1) -> Iterator[dict]:
    """Videos and images under a folder, each with a caption sidecar of the same stem (clip.mp4 + clip.txt)."""
    folder = Path(folder)
    media = sorted(p for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in VIDEO_EXTS + IMAGE_EXTS)
    if not media:
        raise ShardError(f"no videos ({', '.join(VIDEO_EXTS)}) or images ({', '.join(IMAGE_EXTS)}) under {folder}")
    items = []
    for i, path in enumerate(media):
        sidecar = path.with_suffix(".txt")
        items.append((i, str(path), sidecar.read_text().strip() if sidecar.is_file() else ""))
    return _probed(items, workers)


def manifest_samples(manifest: str | Path, workers: int = 1) -> Iterator[dict]:
    """Rows of a CSV (header with path, caption) or JSONL ({"path", "caption"}) manifest; relative paths
    are taken from the manifest's folder."""
    manifest = Path(manifest)
    text = manifest.read_text()
    if manifest.suffix.lower() in (".jsonl", ".json"):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    items = []
    for i, row in enumerate(rows):
        if "path" not in row:
            raise ShardError(f"{manifest} row {i + 1} has no 'path' (columns: path, caption); got {sorted(row)}")
        path = Path(row["path"])
        items.append((i, str(path if path.is_absolute() else manifest.parent / path), str(row.get("caption", ""))))
    return _probed(items, workers)


def webdataset_samples(shards: list[str | Path]) -> Iterator[dict]:
    """Samples of existing (e.g. video2dataset) shards, media bytes unchanged, metadata probed where missing.
    Members are copied as bytes; nothing is decoded or unpickled, and pickle members are dropped."""
    n = 0
    for shard in shards:
        with tarfile.open(shard, "r:") as tar:
            for sample in scan_tar(shard):
                if not sample["meta"]:
                    tqdm.write(f"skipping {shard}:{sample['key']}: no usable video or image")
                    continue
                out = {"__key__": f"{n:08d}"}
                for ext, (offset, size) in sample["members"].items():
                    if ext.lower() in PICKLE_EXTS:
                        continue
                    tar.fileobj.seek(offset)
                    out[ext] = tar.fileobj.read(size)
                try:
                    old = json.loads(out["json"]) if "json" in out else {}
                except (json.JSONDecodeError, UnicodeDecodeError):
                    old = {}
                out["json"] = {**old, **sample["meta"], "source": f"{Path(shard).name}:{sample['key']}"}
                if "txt" not in out and old.get("caption"):
                    out["txt"] = str(old["caption"])
                n += 1
                yield out
