"""Training throughput and MFU of a DiT preset: latent tokens per second and model FLOP utilization.

    python tools/bench_train.py [--preset XL] [--precision bf16] [--ranks 1] [--frames 9 --side 32] [--steps 5]

One optimizer step = one micro-batch per rank through our sharded-layout engine (zero.Init, ZeRO-3, the
run config's DeepSpeed config), on random 16-channel latents of (frames, side, side) with a 2x2 patch and 32
text tokens. The first --warmup steps are not timed. FLOPs follow perf/mfu's convention: the matmuls that run
per token plus attention, per-sample work divided over the tokens (vidiff.models.dit.training_flops_per_token,
within 2% of torch's FlopCounterMode); the peak is the GPU's data sheet figure, or on a CPU a matmul measured in
the same run (so MFU is a ratio to a reference measured side by side). Defaults: XL in bf16 on a GPU, S in fp32
on a CPU. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (LATENT_CHANNELS, TEXT_DIM, TEXT_TOKENS, batch, build_engine,  # noqa: E402
                      forward_backward, launch, parse_with_worker, run_config)

from vidiff.models.dit import count_parameters, training_flops_per_token  # noqa: E402
from vidiff.train.monitor import peak_tflops  # noqa: E402
from vidiff.train.objectives import build_denoiser  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    cfg = run_config(args.preset, args.precision, args.micro_batch, args.checkpointing)
    engine, rank, world = build_engine(cfg)
    latent = (args.frames, args.side, args.side)
    with torch.device("meta"):
        parameters = count_parameters(build_denoiser(cfg, LATENT_CHANNELS, TEXT_DIM))
    pt, ph, pw = cfg.model.patch_size
    grid = (args.frames // pt, args.side // ph, args.side // pw)
    tokens_per_step = args.micro_batch * world * grid[0] * grid[1] * grid[2]
    flops_per_step = tokens_per_step * training_flops_per_token(cfg.model, grid, TEXT_TOKENS, LATENT_CHANNELS, TEXT_DIM)
    times = []
    for step in range(args.warmup + args.steps):
        d = batch(cfg, latent, engine.device, step)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        forward_backward(engine, cfg, d)
        engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = sorted(times[args.warmup:])[len(times[args.warmup:]) // 2]         # median step
    peak, source = peak_tflops(args.precision, None)
    if rank == 0:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        Path(args.out).write_text(json.dumps({
            "preset": args.preset, "precision": args.precision, "device": device, "ranks": world,
            "parameters": parameters, "latent": list(latent), "tokens_per_step": tokens_per_step,
            "step_seconds": round(seconds, 4), "tokens_per_s": round(tokens_per_step / seconds, 1),
            "achieved_tflops_per_rank": round(flops_per_step / seconds / world / 1e12, 4),
            "peak_tflops_per_rank": round(peak, 4), "peak_source": source,
            "mfu": round(flops_per_step / seconds / world / (peak * 1e12), 4)}))


def main() -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="XL" if gpu else "S", choices=["S", "B", "L", "XL"])
    parser.add_argument("--precision", default="bf16" if gpu else "fp32", choices=["fp32", "bf16"])
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=4 if gpu else 1)
    parser.add_argument("--frames", type=int, default=9, help="latent frames (9: a 33-frame clip)")
    parser.add_argument("--side", type=int, default=32, help="latent height and width (32: 256x256 video)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    args = parse_with_worker(parser)
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        forwarded = ["--preset", args.preset, "--precision", args.precision, "--micro-batch", str(args.micro_batch),
                     "--frames", str(args.frames), "--side", str(args.side), "--steps", str(args.steps),
                     "--warmup", str(args.warmup), "--out", str(out)]
        forwarded += ["--checkpointing"] if args.checkpointing else []
        launch(__file__, args.ranks, forwarded)
        result = json.loads(out.read_text())
    if not gpu:
        result["note"] = "no GPU on this machine: CPU fp32 figures, MFU against a matmul measured in the same run"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
