"""The cost curve of factorized vs full 3D attention: forward + backward time of the S-sized DiT.

    python tools/bench_attention.py [--frames 2 4 8 16 32] [--repeats 5] [--device cpu|cuda] [--dtype fp32|bf16]

Both modes have the same parameters (model.attention: factorized | full); latents of 32x32 with a 2x2 patch
give 256 tokens per frame, T' latent frames, batch 1, 8 text tokens. At each T', after one warm-up run of each
mode, the two modes run alternately --repeats times (factorized, full, factorized, ...), so a change in the
machine's load falls on both; each figure is the median of its mode's runs. The table goes to stderr; stdout
gets one JSON line with the log-log slope of each mode (time ~ T'^slope, least squares over all T') and the full
/ factorized ratio at the largest T' (targets: factorized slope <= 1.2, ratio >= 4).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

from vidiff.config import DiTConfig
from vidiff.models.dit import DiT

LATENT_CHANNELS, LATENT_SIDE, TEXT_TOKENS, TEXT_DIM = 16, 32, 8, 384
MODES = ("factorized", "full")


def step_seconds(net: DiT, frames: int, device: torch.device, dtype: torch.dtype) -> float:
    """Wall time of one forward + backward over (1, 16, frames, 32, 32) latents."""
    x = torch.randn(1, LATENT_CHANNELS, frames, LATENT_SIDE, LATENT_SIDE, device=device)
    text = torch.randn(1, TEXT_TOKENS, TEXT_DIM, device=device)
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.bool, device=device)
    net.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = net(x, torch.zeros(1, device=device), text, mask).float().pow(2).mean()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def loglog_slope(xs: list[int], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[2, 4, 8, 16, 32], help="latent frames T'")
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs of each mode per T'")
    parser.add_argument("--preset", default="S")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    nets = {}
    for mode in MODES:
        torch.manual_seed(0)
        nets[mode] = DiT(DiTConfig(preset=args.preset, attention=mode), LATENT_CHANNELS, TEXT_DIM).to(device)
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for t in args.frames:
        for mode in MODES:                                   # warm-up: allocator and kernels at this size
            step_seconds(nets[mode], t, device, dtype)
        runs: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                runs[mode].append(step_seconds(nets[mode], t, device, dtype))
        for mode in MODES:
            seconds[mode].append(statistics.median(runs[mode]))

    tokens = (LATENT_SIDE // 2) ** 2
    print(f"{args.preset} DiT forward+backward seconds, {tokens} tokens per frame, {args.device} {args.dtype}",
          file=sys.stderr)
    print(f"{'T_prime':>8}{'tokens':>8}{'factorized':>12}{'full':>12}{'full/fact':>11}", file=sys.stderr)
    for i, t in enumerate(args.frames):
        f, g = seconds["factorized"][i], seconds["full"][i]
        print(f"{t:>8}{t * tokens:>8}{f:>12.3f}{g:>12.3f}{g / f:>11.2f}", file=sys.stderr)
    slopes = {mode: round(loglog_slope(args.frames, s), 3) for mode, s in seconds.items()}
    print(json.dumps({
        "benchmark": "attention_cost_curve", "preset": args.preset, "device": args.device, "dtype": args.dtype,
        "tokens_per_frame": tokens, "frames": args.frames, "repeats": args.repeats, "statistic": "median",
        "seconds": {mode: [round(s, 4) for s in v] for mode, v in seconds.items()},
        "slope_factorized": slopes["factorized"], "slope_full": slopes["full"],
        "full_over_factorized_at_max_frames": round(seconds["full"][-1] / seconds["factorized"][-1], 2),
        "targets": {"slope_factorized_max": 1.2, "ratio_min": 4.0},
    }))


if __name__ == "__main__":
    main()
