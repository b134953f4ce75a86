"""Checkpoint save and load throughput against a plain sequential write and read of the same bytes, same disk.

    python tools/bench_checkpoint.py [--preset B] [--ranks 2] [--out runs/bench-checkpoint]

The DiT of the preset is built under zero.Init and trained one step through our sharded-layout engine (ZeRO-3,
fp32) with an EMA, on --ranks ranks. Then, timed on every rank and reported for the slowest:
- save: vidiff's whole checkpoint (train/checkpoint.save): DeepSpeed's files of every rank, the gathered
  model.safetensors and ema.safetensors, each rank's EMA part, everything flushed to disk (fsync), `latest` moved;
- load: restoring it into the engine (train/resume.restore_engine, weights-only) and the EMA parts;
- plain write: the same number of bytes written sequentially by rank 0 to one file in the same folder, flushed;
- plain read: that file read back.
--rounds rounds of the four, alternating, each figure the median of its rounds. Both reads come from the page
cache when the machine has the memory (the checkpoint was just written too). One JSON line: bytes, seconds and
GB/s of each, and the ratios save / plain write (target >= 0.5) and load / plain read; the save's parts
(DeepSpeed's files, one gathered export) are timed separately, once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import batch, build_engine, forward_backward, launch, parse_with_worker, run_config  # noqa: E402

from vidiff.parallel.layout import make_layout  # noqa: E402
from vidiff.train import checkpoint  # noqa: E402
from vidiff.train.ema import EMA  # noqa: E402
from vidiff.train.resume import restore_engine  # noqa: E402

TARGET = 0.5
CHUNK = 64 << 20


def plain_write(path: Path, size: int) -> float:
    """Seconds to write `size` bytes sequentially and flush them to disk."""
    block = os.urandom(CHUNK)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for offset in range(0, size, CHUNK):
            f.write(block[:min(CHUNK, size - offset)])
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


def plain_read(path: Path) -> float:
    start = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(CHUNK):
            pass
    return time.perf_counter() - start


def slowest(seconds: float, device) -> float:
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def worker(args: argparse.Namespace) -> None:
    cfg = run_config(args.preset, "fp32", micro_batch=1)
    engine, rank, world = build_engine(cfg)
    layout = make_layout(cfg, world)
    forward_backward(engine, cfg, batch(cfg, (1, 8, 8), engine.device))
    engine.step()
    ema = EMA(engine.module, 0.99)
    ema.update()
    run = Path(args.run)
    dist.barrier()

    start = time.perf_counter()
    engine.save_checkpoint(str(run / "parts"), tag="deepspeed", save_latest=False)
    deepspeed_s = slowest(time.perf_counter() - start, engine.device)
    start = time.perf_counter()
    checkpoint._export(engine, run / "parts" / checkpoint.WEIGHTS_NAME, layout)
    export_s = slowest(time.perf_counter() - start, engine.device)
    if rank == 0:
        shutil.rmtree(run / "parts")

    saves, loads, writes, reads = [], [], [], []
    for round_ in range(args.rounds):            # alternate, so both see the same state of the disk and cache
        dist.barrier()
        start = time.perf_counter()
        tag = checkpoint.save(engine, run, 1 + round_, {"samples_seen": 0}, layout, ema, keep_last=1)
        saves.append(slowest(time.perf_counter() - start, engine.device))
        size = sum(p.stat().st_size for p in tag.rglob("*") if p.is_file())
        start = time.perf_counter()
        restore_engine(engine, tag)
        ema.load(checkpoint.ema_path(tag, rank))
        loads.append(slowest(time.perf_counter() - start, engine.device))
        if rank == 0:
            plain = run / "plain.bin"
            writes.append(plain_write(plain, size))
            reads.append(plain_read(plain))
            plain.unlink()
        dist.barrier()
    if rank == 0:
        save_s, load_s, write_s, read_s = (statistics.median(v) for v in (saves, loads, writes, reads))
        gb = size / 1e9
        Path(args.out).write_text(json.dumps({
            "benchmark": "checkpoint", "preset": args.preset, "ranks": world, "bytes": size, "rounds": args.rounds,
            "save_s": round(save_s, 2), "save_gb_per_s": round(gb / save_s, 3),
            "save_parts_s": {"deepspeed_files": round(deepspeed_s, 2), "gathered_export_each": round(export_s, 2)},
            "load_s": round(load_s, 2), "load_gb_per_s": round(gb / load_s, 3),
            "plain_write_s": round(write_s, 2), "plain_write_gb_per_s": round(gb / write_s, 3),
            "plain_read_s": round(read_s, 2), "plain_read_gb_per_s": round(gb / read_s, 3),
            "save_ratio_to_plain_write": round(write_s / save_s, 3),
            "load_ratio_to_plain_read": round(read_s / load_s, 3),
            "each_round_s": {"save": [round(v, 2) for v in saves], "plain_write": [round(v, 2) for v in writes]},
            "target_save_ratio": TARGET}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="B", choices=["S", "B", "L", "XL"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--dir", default="runs", help="the disk to measure: a scratch folder is made under it")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of save, load, plain write, plain read")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parse_with_worker(parser)
    if args.worker:
        return worker(args)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-checkpoint-") as tmp:
        out = Path(tmp) / "result.json"
        launch(__file__, args.ranks, ["--preset", args.preset, "--rounds", str(args.rounds), "--run",
                                      str(Path(tmp) / "run"), "--out", str(out)])
        result = json.loads(out.read_text())
    print(json.dumps({**result, "met": result["save_ratio_to_plain_write"] >= TARGET}))


if __name__ == "__main__":
    main()
