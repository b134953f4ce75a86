"""Per-rank training memory under ZeRO-3, at rest and at peak, against the ideal 16 x parameters / ranks (fp32
Adam: 4 bytes of parameter, 4 of gradient, 8 of moments per parameter, each split over the ranks).

    python tools/bench_memory.py [--preset S] [--ranks 1 2 4] [--frames 1 --side 4] [--steps 3]

For each rank count, the DiT of the preset is built under zero.Init and trained through our sharded-layout engine
with the run config's DeepSpeed config (live-parameter limits included). After two warm-up steps (the second
replays ZeRO-3's recorded parameter trace, as every later step does), each rank measures --steps more:

- at rest, before each step: the bytes of every tensor storage the process holds, each storage once (what the
  garbage collector can see): parameter shards and the small parameters ZeRO-3 keeps whole, the gradient buffer,
  Adam's moments, communication buckets, buffers;
- at peak: rest plus the rise of the process's resident memory to its high-water mark during the step's forward,
  backward and optimizer step (the mark reset through /proc/self/clear_refs before each step; glibc's mmap
  threshold fixed at 128 KiB so that a freed tensor leaves resident memory at once). It counts everything the
  step allocates beyond what it frees: gathered parameters, activations, gradient reduction buffers, the
  optimizer's work, and non-tensor memory. On a GPU: torch.cuda.memory_allocated before the step and
  torch.cuda.max_memory_allocated over it.

One JSON line: each rank count's largest rank at rest and at peak (the largest of its steps), and their ratios to
the ideal (targets: rest <= 1.05 x, peak <= 1.3 x at 4 ranks). The batch is one 32x32 image per rank (1 x 4 x 4
latents, 4 tokens after patchify), so that activations, which grow with the batch and are not model state, do not
hide how the model state is held; they are part of the peak all the same.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import batch, build_engine, forward_backward, launch, parse_with_worker, run_config  # noqa: E402

from vidiff.device import resident_kib  # noqa: E402
from vidiff.models.dit import count_parameters  # noqa: E402

TARGET_REST, TARGET_PEAK = 1.05, 1.3


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage this process holds, each storage once (what the garbage collector sees:
    every tensor reachable from Python)."""
    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            if storage.nbytes():
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def one_step(engine, cfg, d) -> None:
    forward_backward(engine, cfg, d)
    engine.step()


def worker(args: argparse.Namespace) -> None:
    cfg = run_config(args.preset, "fp32", micro_batch=1)
    engine, rank, world = build_engine(cfg)
    d = batch(cfg, (args.frames, args.side, args.side), engine.device)
    for _ in range(2):                              # warm-up: Adam's state, ZeRO-3's parameter trace
        one_step(engine, cfg, d)
    rest = peak = 0
    for _ in range(args.steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            step_rest = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            one_step(engine, cfg, d)
            torch.cuda.synchronize()
            step_peak = torch.cuda.max_memory_allocated()
        else:
            step_rest = live_tensor_bytes()
            before = resident_kib()["VmRSS"]
            Path("/proc/self/clear_refs").write_text("5")     # VmHWM := VmRSS
            one_step(engine, cfg, d)
            step_peak = step_rest + (resident_kib()["VmHWM"] - before) * 1024
        rest, peak = max(rest, step_rest), max(peak, step_peak)
    figures = torch.tensor([rest, peak], dtype=torch.float64, device=engine.device)
    everyone = [torch.zeros_like(figures) for _ in range(world)]
    torch.distributed.all_gather(everyone, figures)
    if rank == 0:
        with torch.device("meta"):
            from vidiff.train.objectives import build_denoiser
            parameters = count_parameters(build_denoiser(cfg, 16, 384))
        zero = engine._config.zero_config
        Path(args.out).write_text(json.dumps({
            "parameters": parameters, "per_rank": [[int(v) for v in t.tolist()] for t in everyone],
            "live_limits": {"stage3_max_live_parameters": zero.max_live_parameters,
                            "stage3_max_reuse_distance": zero.max_reuse_distance}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="S", choices=["S", "B", "L", "XL"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--frames", type=int, default=1, help="latent frames per clip")
    parser.add_argument("--side", type=int, default=4, help="latent height and width")
    parser.add_argument("--steps", type=int, default=3, help="measured steps after two warm-up steps")
    args = parse_with_worker(parser)
    if args.worker:
        return worker(args)
    results, parameters = {}, 0
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"        # the ranks' freed tensors leave their resident memory
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            out = Path(tmp) / f"{ranks}.json"
            launch(__file__, ranks, ["--preset", args.preset, "--frames", str(args.frames), "--side", str(args.side),
                                     "--steps", str(args.steps), "--out", str(out)])
            found = json.loads(out.read_text())
            parameters = found["parameters"]
            ideal = 16 * parameters / ranks
            rest, peak = (max(r[i] for r in found["per_rank"]) for i in range(2))
            results[ranks] = {"ideal_bytes": round(ideal), "rest_bytes": rest, "peak_bytes": peak,
                              "rest_ratio_to_ideal": round(rest / ideal, 4),
                              "peak_ratio_to_ideal": round(peak / ideal, 4), "live_limits": found["live_limits"]}
            print(f"{ranks} ranks: rest {rest / 2**20:.1f} MiB (x{rest / ideal:.3f}), peak {peak / 2**20:.1f} MiB "
                  f"(x{peak / ideal:.3f}) of ideal {ideal / 2**20:.1f} MiB per rank", file=sys.stderr)
    worst = results[max(results)]
    peak_ratio, rest_ratio = worst["peak_ratio_to_ideal"], worst["rest_ratio_to_ideal"]
    print(json.dumps({"benchmark": "zero3_memory", "preset": args.preset, "parameters": parameters,
                      "latent": [args.frames, args.side, args.side], "micro_batch": 1, "ranks": results,
                      "peak_ratio_at_max_ranks": peak_ratio, "rest_ratio_at_max_ranks": rest_ratio,
                      "targets": {"rest": TARGET_REST, "peak": TARGET_PEAK},
                      "met": peak_ratio <= TARGET_PEAK and rest_ratio <= TARGET_REST}))


if __name__ == "__main__":
    main()
